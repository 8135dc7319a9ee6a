"""Position information data2vec 2.0 adds to its encoders.

- ``sincos_2d``: fixed (not trained) 2-D sine-cosine position embeddings over a patch grid (2.0
  images). Computed on the fly for any grid, so they carry no state and any image size works.
- ``alibi_slopes`` / ``alibi_bias``: ALiBi attention biases (2.0 audio): for head ``h`` the score of
  query ``i`` on key ``j`` gets ``-slope_h * scale_h * |p_i - p_j|``, where ``p`` are the tokens'
  positions in the *unmasked* sequence, so a student that encodes only kept frames sees the true
  distances. ``scale_h`` is a learned per-head multiplier (init 1, clamped at 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sincos_1d", "sincos_2d", "alibi_slopes", "alibi_bias"]


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``(n,)`` positions -> ``(n, dim)``: sines in the first half, cosines in the second
    (frequencies ``1 / 10000 ** (i / (dim / 2))``, the MAE / transformer convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embeddings need an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """Fixed 2-D sin-cos embeddings ``(1, rows*cols, dim)`` for a row-major patch grid.

    The first half of the channels encodes the column, the second half the row (MAE's layout).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a dimension divisible by 4, got {dim}")
    rows, cols = grid
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.cat([sincos_1d(dim // 2, c), sincos_1d(dim // 2, r)], dim=1).unsqueeze(0)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's geometric per-head slopes (Press et al.): ``2^(-8/n), 2^(-16/n), ...`` for a power of
    two ``n``; otherwise those of the next lower power of two, then every other slope of the double."""

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(low)
    if low < num_heads:
        slopes += powers(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes)


def alibi_bias(positions: Tensor, slopes: Tensor, scale: Tensor | None = None) -> Tensor:
    """Additive attention bias ``(batch, heads, n, n)`` for tokens at ``positions`` ``(batch, n)``
    (or ``(1, heads, n, n)`` from ``(n,)``).

    Args:
        positions: each token's index in the full (unmasked) sequence.
        slopes: ``(heads,)`` from ``alibi_slopes``.
        scale: optional learned ``(heads,)`` multiplier, clamped at 0 (a negative scale would make
            far tokens *more* attractive).
    """
    if positions.ndim == 1:
        positions = positions.unsqueeze(0)
    pos = positions.to(torch.float32)
    dist = (pos.unsqueeze(-1) - pos.unsqueeze(-2)).abs()  # (B, n, n)
    per_head = slopes.to(device=dist.device, dtype=torch.float32)
    if scale is not None:
        per_head = per_head * scale.float().clamp(min=0.0)
    return -dist.unsqueeze(1) * per_head.view(1, -1, 1, 1)
