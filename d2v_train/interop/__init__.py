"""Import and export at the boundary with other tools (transformers directories, fairseq files)."""

from .fairseq import load_fairseq
from .heads import load_transformers_task, save_transformers_task
from .hub import push_to_hub, write_hub_files
from .native import load_encoder, save_encoder
from .transformers import load_transformers, save_transformers

__all__ = [
    "load_encoder",
    "load_fairseq",
    "load_transformers",
    "load_transformers_task",
    "push_to_hub",
    "save_encoder",
    "save_transformers",
    "save_transformers_task",
    "write_hub_files",
]
