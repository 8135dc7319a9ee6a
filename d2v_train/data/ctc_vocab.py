"""The character vocabulary of CTC heads (blank first, `|` between words)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CharVocab"]


class CharVocab:
    """Character vocabulary for CTC: index 0 is the blank/pad, `|` marks word boundaries."""

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = ["<blank>", *symbols]
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @staticmethod
    def tokens(text: str) -> list[str]:
        """`.ltr` lines are already space-separated letters; plain text becomes letters + `|`."""
        parts = text.split()
        if parts and all(len(p) == 1 for p in parts):
            return parts
        return list("|".join(parts))

    @classmethod
    def build(cls, transcripts: Sequence[str]) -> CharVocab:
        return cls(sorted({c for t in transcripts for c in cls.tokens(t)}))

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in self.tokens(text) if c in self.index], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.symbols)
