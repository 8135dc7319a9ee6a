"""The data2vec 2.0 training objective (multi-mask, visible-only student, conv decoder).

One step for a batch of ``B`` samples and ``M = objective.clones``:

1. The student embeds each sample once (audio CNN, text embeddings with learned positions, image
   patches); the embedded tokens are repeated M times (``repeat_interleave``, clone ``j`` of sample
   ``b`` is row ``b*M + j``) and every copy gets its own mask with exactly the same number of masked
   tokens per row.
2. The student encodes only the kept tokens (``contextualize(..., drop_masked=True)``).
3. The teacher runs once per sample on the full input; its top-K targets are indexed M times
   (``clone_targets``), never recomputed.
4. The student outputs are scattered back to their positions, N(0, std) noise fills the masked
   ones (``decoder_input``), the conv decoder predicts every position, the loss is taken on the
   masked ones. Images add the CLS loss: the student's CLS output regresses the mean target of
   its image.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from d2v_train.models.visible import scatter_tokens

from .config import ObjectiveConfig
from .loss import all_reduce_sum, masked_regression_loss, objective_outputs, regression_loss, world_size
from .masking import MaskingConfig, compute_mask
from .pooled import add_pooled_loss, pooled_targets
from .targets import build_targets

__all__ = ["EXACT_MASK_KINDS", "repeat_clones", "clone_targets", "decoder_input", "teacher_targets", "d2v2_objective"]

# mask kinds whose rows all mask the same number of tokens (needed to gather the kept ones densely)
EXACT_MASK_KINDS = ("inverse_block", "block_1d", "random", "span")


def repeat_clones(x: Optional[Tensor], clones: int) -> Optional[Tensor]:
    """``(B, ...)`` -> ``(B*M, ...)``, the M copies of each sample adjacent (None stays None)."""
    if x is None or clones == 1:
        return x
    return x.repeat_interleave(clones, dim=0)


def clone_targets(targets: Tensor, mask: Tensor, clones: int) -> Tensor:
    """The targets at the masked positions of every clone, ``(masked, dim)``, in ``mask``'s row-major
    order, read from the per-sample ``targets`` ``(B, T, dim)`` without materialising M copies."""
    rows, cols = mask.nonzero(as_tuple=True)
    return targets[torch.div(rows, clones, rounding_mode="floor"), cols]


def decoder_input(
    kept: Tensor,
    kept_index: Tensor,
    num_tokens: int,
    noise_std: float,
    generator: Optional[torch.Generator] = None,
    padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """``(B, T, D)``: the student's outputs ``kept`` ``(B, K, D)`` at their positions, N(0, std)
    vectors at the masked ones (no mask token, no positions), zeros at padding."""
    shape = (kept.shape[0], num_tokens, kept.shape[-1])
    gen_dev = generator.device if generator is not None else kept.device
    noise = torch.randn(shape, generator=generator, device=gen_dev).to(kept.device) * noise_std
    x = scatter_tokens(kept, kept_index, noise)
    if padding_mask is not None:
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return x


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    obj: ObjectiveConfig,
    inputs: Tensor,
    tokens: Tensor,
    padding_mask: Optional[Tensor],
    token_padding: Optional[Tensor],
    num_prefix: int,
) -> Tensor:
    """Per-sample targets ``(B, T, D)`` (fp32) from one teacher pass over the full input: on the
    student's embedded tokens (``teacher_input: embed``; audio CNN features, text embeddings) or on
    the raw input (``raw``; images re-embed with the teacher's own patch embedding)."""
    if obj.teacher_input == "embed":
        out = teacher.contextualize(tokens.detach(), token_padding, layer_targets=obj.layer_targets)
    else:
        out = teacher(inputs, padding_mask=padding_mask, layer_targets=obj.layer_targets)
    layers = [y[:, num_prefix:] for y in out.layer_targets]
    return build_targets(layers, obj.top_k, layer_norm=obj.layer_norm, final_norm=obj.final_norm, padding_mask=token_padding)


def d2v2_objective(
    student: nn.Module,
    teacher: nn.Module,
    decoder: nn.Module,
    obj: ObjectiveConfig,
    masking: MaskingConfig,
    inputs: Tensor,
    padding_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    pooled_head: Optional[nn.Module] = None,
    pooled_weights: Optional[Tensor] = None,
) -> dict[str, Any]:
    """One data2vec 2.0 loss evaluation (see the module docstring).

    Args:
        student / teacher: encoders of the same architecture (the teacher is the EMA copy, eval mode).
        decoder: ``ConvDecoder``.
        inputs: waveforms ``(B, samples)``, token ids ``(B, T)`` or pixels ``(B, C, H, W)``.
        padding_mask: input padding (True = padding); for text the token padding.
        generator: draws the masks and the decoder noise.
        pooled_head: the linear head of ``objective.pooled_loss`` (when it is > 0).
        pooled_weights: ``(B, T)`` token weights of the pooled term's target mean (None: uniform).
    Returns:
        ``loss`` (for backward) and detached statistics, the keys of the v1 objective plus
        ``cls_loss``, ``pairs`` (sample x mask pairs) and ``encoded`` (tokens the student encoded).
    """
    clones = int(obj.clones)
    num_prefix = int(getattr(student, "num_prefix_tokens", 0))
    if masking.kind not in EXACT_MASK_KINDS or (masking.kind != "inverse_block" and not masking.require_same_masks):
        raise ValueError(
            f"data2vec 2.0 needs the same number of masked tokens in every row: masking.kind must be one of "
            f"{', '.join(EXACT_MASK_KINDS)} with masking.require_same_masks=true, got {masking.kind!r}"
        )
    # the audio teacher reads the projected features before the student's feature-projection dropout
    tokens, clean_tokens, token_pad = student.embed_with_clean(inputs, padding_mask)
    batch, length = tokens.shape[0], tokens.shape[1]
    infer = getattr(student, "infer_grid", None)
    grid = tuple(infer(length)) if infer is not None else None
    pad_rep = repeat_clones(token_pad, clones)
    mask = compute_mask(
        masking, (batch * clones, length), grid=grid, padding_mask=pad_rep, generator=generator, device=tokens.device
    )
    out = student.contextualize(repeat_clones(tokens, clones), pad_rep, mask=mask, drop_masked=True)
    targets = teacher_targets(teacher, obj, inputs, clean_tokens, padding_mask, token_pad, num_prefix)

    hidden = out.last_hidden_state
    kept_padding = None if out.padding_mask is None else out.padding_mask[:, num_prefix:]
    dec_in = decoder_input(
        hidden[:, num_prefix:], out.kept_index, length, obj.decoder.mask_noise_std, generator, pad_rep
    )
    pred_all = decoder(dec_in, grid, mask)
    pred = pred_all[mask]
    target = clone_targets(targets, mask, clones)
    kwargs = dict(loss_beta=obj.loss_beta, loss_scale=obj.loss_scale, channel_reduction=obj.channel_reduction)
    res = masked_regression_loss(pred, target, **kwargs)
    loss, global_loss = res.loss, res.global_loss
    cls_loss = torch.zeros((), device=hidden.device)
    if obj.cls_loss > 0:
        if num_prefix < 1:
            raise ValueError("objective.cls_loss needs an encoder with a CLS token (images)")
        cls_target = repeat_clones(targets.mean(dim=1), clones)
        per = regression_loss(hidden[:, 0], cls_target, **kwargs)  # type: ignore[arg-type]
        # the reference weights it by the masked-token count and then divides by that count again:
        # cls_loss x (sum over this rank's clones), on top of the mean masked-token loss
        local = obj.cls_loss * per.sum() * mask.sum()
        denom = res.count.clamp(min=1.0)
        loss = loss + local * (world_size() / denom)
        cls_loss = all_reduce_sum(local.detach()) / denom
        global_loss = global_loss + cls_loss
    valid = (~pad_rep).sum() if pad_rep is not None else torch.tensor(mask.numel(), device=mask.device)
    out = objective_outputs(res, mask, valid, pred, target)
    out.update(loss=loss, global_loss=global_loss, cls_loss=cls_loss, pairs=batch * clones,
               encoded=hidden.shape[0] * hidden.shape[1])  # fmt: skip
    if obj.pooled_loss > 0:
        if pooled_head is None:
            raise ValueError("objective.pooled_loss > 0 needs its pooled_head")
        target_means = repeat_clones(pooled_targets(targets, token_pad, pooled_weights), clones)
        add_pooled_loss(out, obj.pooled_loss, pooled_head, hidden[:, num_prefix:], kept_padding, target_means)
    return out
