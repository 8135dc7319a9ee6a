"""Teacher targets: normalise each of the top-K layer tensors, average them, optionally normalise again.

All maths runs in fp32 (the reference casts with ``.float()`` before every norm) and every norm is
parameter-free, "so the model doesn't learn to favor a particular layer" (fairseq issue 4199).
Instance norm and batch norm take their statistics over valid (non-padding) positions only; the
reference includes padded frames, which only matters if padding is enabled, and is a known flaw.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NORMS", "normalize", "instance_norm", "batch_norm", "layer_norm", "build_targets"]

NORMS = ("instance", "layer", "batch", "none")
EPS = 1e-5


def _weights(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """(B, T, 1) float weights: 1 on valid positions, 0 on padding."""
    if padding_mask is None:
        return torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
    return (~padding_mask).to(x.dtype).unsqueeze(-1)


def instance_norm(x: Tensor, padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Normalise every channel of every sample over time (``F.instance_norm`` without affine),
    with mean and biased variance taken over the sample's valid positions only.

    Args:
        x: ``(batch, time, dim)``.
        padding_mask: ``(batch, time)``, True = padding.
    """
    x = x.float()
    if padding_mask is None:
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    w = _weights(x, padding_mask)
    n = w.sum(1, keepdim=True).clamp(min=1.0)
    mean = (x * w).sum(1, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + eps)) * w


def batch_norm(x: Tensor, padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Normalise every channel over all valid positions of the batch (``F.batch_norm`` in training
    mode, no running stats, no affine)."""
    x = x.float()
    w = _weights(x, padding_mask)
    n = w.sum((0, 1), keepdim=True).clamp(min=1.0)
    mean = (x * w).sum((0, 1), keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum((0, 1), keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + eps)) * w


def layer_norm(x: Tensor, padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Normalise every position over its channels (``F.layer_norm`` without affine)."""
    del padding_mask  # per-position statistics: padding cannot leak in
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def normalize(x: Tensor, kind: str, padding_mask: Tensor | None = None) -> Tensor:
    """Apply the parameter-free norm ``kind`` (one of ``NORMS``) in fp32."""
    if kind == "instance":
        return instance_norm(x, padding_mask)
    if kind == "layer":
        return layer_norm(x, padding_mask)
    if kind == "batch":
        return batch_norm(x, padding_mask)
    if kind in ("none", None):
        return x.float()
    raise ValueError(f"unknown target norm {kind!r}; valid: {', '.join(NORMS)}")


def build_targets(
    layer_outputs: Sequence[Tensor],
    top_k: int,
    *,
    layer_norm: str = "instance",
    final_norm: str = "none",
    padding_mask: Tensor | None = None,
) -> Tensor:
    """data2vec regression targets from the teacher's per-block tensors.

    Args:
        layer_outputs: one ``(batch, time, dim)`` tensor per block, bottom to top (extra tokens such
            as CLS already removed).
        top_k: how many of the top blocks to average (8 audio, 10 text, 6 vision for v1 base).
        layer_norm: norm applied to each layer before averaging (``instance``/``layer``/``batch``/``none``).
        final_norm: norm applied to the average.
        padding_mask: ``(batch, time)``, True = padding.
    Returns:
        fp32 ``(batch, time, dim)`` targets.
    """
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"top_k={top_k} but the teacher has {len(layer_outputs)} blocks")
    selected = layer_outputs[-top_k:]
    acc = normalize(selected[0], layer_norm, padding_mask)
    for y in selected[1:]:  # K (<= 24) layers, not tokens
        acc = acc + normalize(y, layer_norm, padding_mask)
    acc = acc / top_k
    return normalize(acc, final_norm, padding_mask)
