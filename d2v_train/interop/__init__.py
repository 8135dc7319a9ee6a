"""Import and export at the boundary with other tools (transformers directories, fairseq files)."""

from .fairseq import load_fairseq
from .native import load_encoder, save_encoder
from .transformers import load_transformers, save_transformers

__all__ = ["load_encoder", "load_fairseq", "save_encoder", "load_transformers", "save_transformers"]
