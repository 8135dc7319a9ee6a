"""Import and export at the boundary with other tools (transformers directories, fairseq files)."""

from .fairseq import load_fairseq
from .transformers import load_transformers, save_transformers

__all__ = ["load_fairseq", "load_transformers", "save_transformers"]
