"""Gather / scatter of the kept (unmasked) tokens, for encoders that contextualise only those
(data2vec 2.0's student).

Every row must keep the same number of tokens, so the kept tokens form a dense ``(batch, kept, dim)``
tensor with no padding through the encoder; the 2.0 mask generators guarantee exact counts. Kept
tokens stay in their original order (a stable sort of the mask), so position-dependent parts (ALiBi,
the decoder's convolutions after scattering back) see the true layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["keep_index", "gather_tokens", "scatter_tokens"]


def keep_index(mask: Tensor) -> Tensor:
    """Indices ``(batch, kept)`` of the unmasked positions of ``mask`` ``(batch, time)`` (True =
    masked), in increasing order. Raises when rows keep different numbers of tokens."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool (batch, time) tensor, got {mask.dtype} {tuple(mask.shape)}")
    counts = (~mask).sum(1)
    lo_hi = torch.stack([counts.min(), counts.max()]).tolist() if mask.shape[0] else [mask.shape[1]] * 2
    if lo_hi[0] != lo_hi[1]:
        raise ValueError(
            f"encoding only the kept tokens needs the same number of masked tokens in every row, got "
            f"{mask.shape[1] - lo_hi[1]} to {mask.shape[1] - lo_hi[0]}: use a mask kind with exact counts "
            "(inverse_block, block_1d, random) and masking.require_same_masks=true"
        )
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    return order[:, : int(lo_hi[0])]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``(batch, time, ...)`` at ``index`` ``(batch, kept)`` -> ``(batch, kept, ...)``."""
    idx = index.view(*index.shape, *([1] * (x.ndim - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def scatter_tokens(kept: Tensor, index: Tensor, fill: Tensor) -> Tensor:
    """Puts ``kept`` ``(batch, kept, dim)`` back at ``index`` of a copy of ``fill``
    ``(batch, time, dim)`` (the values the other positions get). Differentiable in ``kept``."""
    idx = index.unsqueeze(-1).expand(*index.shape, kept.shape[-1])
    return fill.to(kept.dtype).scatter(1, idx, kept)


def gather_padding(padding_mask: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
    """The padding mask of the kept tokens (None stays None)."""
    return None if padding_mask is None else padding_mask.gather(1, index)
