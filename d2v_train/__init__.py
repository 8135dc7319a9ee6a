"""d2v_train: data2vec self-supervised pretraining for speech, text and images."""

from .interop.native import load_encoder

__version__ = "0.1.0"

__all__ = ["load_encoder"]
