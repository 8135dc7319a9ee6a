"""Regression loss on masked positions and the distributed statistics data2vec needs.

The reference (fairseq) sums the per-position losses and divides gradients by the number of masked
positions over *all* ranks; ``masked_regression_loss`` returns a local loss whose DDP-averaged
gradient equals exactly that, and the global value for logging.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskedLoss", "regression_loss", "masked_regression_loss", "all_reduce_sum", "world_size", "global_std", "objective_outputs"]


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all ranks (a no-op copy when not distributed); never carries gradient."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def regression_loss(
    pred: Tensor,
    target: Tensor,
    *,
    loss_beta: float = 0.0,
    loss_scale: float | None = None,
    channel_reduction: str = "sum",
) -> Tensor:
    """Per-position data2vec loss, in fp32.

    Args:
        pred, target: ``(positions, dim)``.
        loss_beta: 0 = L2 (squared error), > 0 = smooth L1 with this beta.
        loss_scale: multiplier; ``None`` = 1/sqrt(dim) (the reference default).
        channel_reduction: ``sum`` over channels (fairseq) or ``mean`` (v1 vision's
            ``F.smooth_l1_loss`` with mean reduction).
    Returns:
        ``(positions,)`` losses.
    """
    pred, target = pred.float(), target.float()
    if loss_beta == 0:
        per = F.mse_loss(pred, target, reduction="none")
    else:
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=loss_beta)
    if channel_reduction == "sum":
        per = per.sum(-1)
    elif channel_reduction == "mean":
        per = per.mean(-1)
    else:
        raise ValueError(f"channel_reduction must be 'sum' or 'mean', got {channel_reduction!r}")
    scale = 1.0 / math.sqrt(pred.shape[-1]) if loss_scale is None else float(loss_scale)
    return per * scale


class MaskedLoss(NamedTuple):
    """``loss``: for backward; ``global_loss``: detached mean over all ranks (same on every rank);
    ``count``: masked positions over all ranks; ``local_sum``: detached sum on this rank."""

    loss: Tensor
    global_loss: Tensor
    count: Tensor
    local_sum: Tensor


def masked_regression_loss(pred: Tensor, target: Tensor, **kwargs: object) -> MaskedLoss:
    """Mean loss over the masked positions of all ranks.

    Returns:
        ``MaskedLoss``: ``loss`` (for backward) is the local sum
        times ``world_size / global_count``, so after DDP's gradient averaging the gradient is that
        of (sum over all ranks) / (masked positions over all ranks). ``global_loss`` is the detached
        value of that mean, identical on every rank, for logging.
    """
    per = regression_loss(pred, target, **kwargs)  # type: ignore[arg-type]
    local_sum = per.sum()
    count = all_reduce_sum(torch.tensor(float(per.shape[0]), device=per.device))
    denom = count.clamp(min=1.0)
    loss = local_sum * (world_size() / denom)
    global_loss = all_reduce_sum(local_sum) / denom
    return MaskedLoss(loss, global_loss, count, local_sum.detach())


def global_std(x: Tensor) -> Tensor:
    """Mean over channels of the per-channel std of ``x`` (``(positions, dim)``) over all ranks.

    Why: the collapse monitor of the reference (``compute_var``) watches this for targets and
    predictions; it is all-reduced so every rank takes the same stop decision.
    """
    x = x.detach().float().reshape(-1, x.shape[-1])
    stats = torch.stack([x.sum(0), (x * x).sum(0)])
    n = all_reduce_sum(torch.tensor(float(x.shape[0]), device=x.device))
    stats = all_reduce_sum(stats)
    if n.item() < 2:
        return torch.zeros((), device=x.device)
    s, ss = stats[0], stats[1]
    var = (ss - s * s / n) / (n - 1)
    return torch.sqrt(var.clamp(min=0.0) + 1e-6).mean()


def objective_outputs(
    res: MaskedLoss, mask: Tensor, valid_tokens: Tensor, pred: Tensor, target: Tensor
) -> dict[str, Tensor]:
    """What one objective evaluation hands to the training module (v1 and 2.0 alike): ``loss`` to
    backpropagate, the all-reduced ``global_loss``, and detached statistics. ``valid_tokens`` is this
    rank's count of non-padding tokens the masks were drawn over."""
    valid = all_reduce_sum(valid_tokens.float())
    return {
        "loss": res.loss,
        "global_loss": res.global_loss,
        "local_sum": res.local_sum,
        "local_count": mask.sum(),
        "masked": res.count,
        "tokens": valid,
        "mask_frac": res.count / valid.clamp(min=1.0),
        "target_std": global_std(target),
        "pred_std": global_std(pred),
        "mask": mask,
    }
