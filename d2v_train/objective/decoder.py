"""Regression heads that map the student's output at masked positions to the target space.

data2vec v1: a linear layer (audio, vision; "one Linear with bias", fairseq issue 4199) or the text
recipe's 2-layer MLP D -> 2D -> D with GELU (``head_layers: 2``). The data2vec 2.0 conv decoders
belong to the 2.0 work and will live here too.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["RegressionHead"]


class RegressionHead(nn.Module):
    """``linear``: Linear(D, D). ``mlp``: Linear(D, mult*D) -> GELU -> Linear(mult*D, D)."""

    def __init__(self, dim: int, kind: str = "linear", hidden_mult: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.kind = kind
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(dim, out_dim)
        elif kind == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(dim, hidden_mult * dim), nn.GELU(), nn.Linear(hidden_mult * dim, out_dim)
            )
        else:
            raise ValueError(f"unknown head {kind!r}; valid: linear, mlp")

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., out_dim)``."""
        return self.proj(x)

