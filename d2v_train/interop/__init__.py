"""Import and export at the boundary with other tools (transformers directories, weight files)."""

from .transformers import load_transformers, save_transformers

__all__ = ["load_transformers", "save_transformers"]
