"""The pooled loss: a sequence-level term beside data2vec's per-token regression (off by default).

Why it exists: on the small text preset the per-token targets are mostly position (a fit of each
position's mean explains about 80% of their variance), which a student can predict from its own
position embedding without reading the sentence. The mean of a sequence's targets over its tokens
cancels most of that, and normalising those means over the batch keeps what tells one sequence from
another: its content. So the student's mean-pooled output, through its own linear head, regresses
the teacher's mean target, normalised over the batch. With ``objective.pooled_weights=idf`` (text)
that mean weighs each token by its inverse document frequency, so that it is about the sequence's
rarer words rather than the ones every sequence has. It is this project's addition, not part of
data2vec v1 or 2.0; the nearest reference piece is 2.0's image CLS loss (CLS output vs the image's
mean target, without the batch norm or a head). The published recipes leave it off.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from d2v_train.models.transformer import mean_pool

from .loss import all_reduce_sum, world_size
from .targets import batch_norm

__all__ = ["pooled_targets", "pooled_loss", "add_pooled_loss"]


@torch.no_grad()
def pooled_targets(targets: Tensor, padding_mask: Optional[Tensor] = None, weights: Optional[Tensor] = None) -> Tensor:
    """Each sample's mean target, every channel normalised over this rank's batch (fp32).

    Args:
        targets: the per-token targets ``(B, T, D)`` (extra tokens such as CLS removed).
        padding_mask: ``(B, T)``, True = padding.
        weights: ``(B, T)`` token weights (``objective.pooled_weights=idf``); a weighted mean then.
    """
    pooled = mean_pool(targets.float(), padding_mask, weights)
    return batch_norm(pooled.unsqueeze(1)).squeeze(1)


def pooled_loss(head: nn.Module, hidden: Tensor, padding_mask: Optional[Tensor], target: Tensor) -> Tensor:
    """Mean squared error between ``head`` of the student's mean-pooled ``hidden`` ``(N, T, D)`` and
    ``target`` ``(N, D)`` (``pooled_targets``, repeated per 2.0 copy), averaged over samples and
    channels."""
    pred = head(mean_pool(hidden, padding_mask))
    return (pred.float() - target).pow(2).mean()


def add_pooled_loss(
    out: dict[str, Any],
    weight: float,
    head: nn.Module,
    hidden: Tensor,
    hidden_padding: Optional[Tensor],
    target: Tensor,
) -> None:
    """Adds ``weight`` x the pooled loss to an objective's outputs (``loss``, the all-reduced
    ``global_loss``) and logs it unweighted as ``pooled_loss``.

    Args:
        hidden: the student's last layer without extra tokens, ``(N, T', D)``: every position for
            v1, the kept ones of each masked copy for 2.0.
        hidden_padding: True = leave out of the mean (padding; text also leaves out its special tokens).
        target: ``pooled_targets`` ``(N, D)``, one row per row of ``hidden`` (2.0 repeats it per copy).
    """
    local = pooled_loss(head, hidden, hidden_padding, target)
    out["loss"] = out["loss"] + weight * local
    mean = all_reduce_sum(local) / world_size()
    out["global_loss"] = out["global_loss"] + weight * mean
    out["pooled_loss"] = mean
