"""d2v_train: data2vec self-supervised pretraining for speech, text and images."""

__version__ = "0.1.0"
