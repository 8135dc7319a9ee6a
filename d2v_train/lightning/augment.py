"""Fine-tuning-time input augmentation: mixup / cutmix with label smoothing (images),
wav2vec 2.0-style time and channel masking (audio), and BERT-style token masking (masked LM).

Everything draws from an explicit ``torch.Generator`` so a seeded run is repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v_train.objective.masking import mask_tokens, span_mask

__all__ = ["MixupConfig", "mixup_cutmix", "soft_cross_entropy", "time_mask", "channel_mask", "mask_for_mlm"]


@dataclass
class MixupConfig:
    """timm's ``Mixup`` knobs (BEiT / data2vec image fine-tuning: 0.8 / 1.0 / prob 1 / switch 0.5)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def _beta(alpha: float, generator: torch.Generator) -> float:
    # Beta(a, a) from two Gammas, drawn with torch so the generator decides it
    g1 = torch._standard_gamma(torch.tensor([alpha]), generator=generator)
    g2 = torch._standard_gamma(torch.tensor([alpha]), generator=generator)
    return float(g1 / (g1 + g2))


def _one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.long().view(-1, 1), 1.0 - smoothing + off
    )


def mixup_cutmix(
    images: Tensor, labels: Tensor, num_classes: int, cfg: MixupConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(mixed images, soft targets) for a batch, mixing each image with the batch flipped (timm's
    ``mode="batch"``). Cutmix pastes a box whose area follows ``1 - lam`` and corrects ``lam`` to
    the box actually pasted; without mixing, targets are just label-smoothed one-hots."""
    targets = _one_hot(labels, num_classes, cfg.label_smoothing)
    if not cfg.active or float(torch.rand(1, generator=generator)) >= cfg.prob:
        return images, targets
    use_cutmix = cfg.cutmix_alpha > 0 and (
        cfg.mixup_alpha <= 0 or float(torch.rand(1, generator=generator)) < cfg.switch_prob
    )
    lam = _beta(cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha, generator)
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        ratio = math.sqrt(1.0 - lam)
        ch, cw = int(h * ratio), int(w * ratio)
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (mixup / label smoothing), averaged over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def time_mask(
    shape: tuple[int, int],
    prob: float,
    length: int,
    min_masks: int,
    padding_mask: Optional[Tensor],
    generator: torch.Generator,
    device: torch.device,
) -> Optional[Tensor]:
    """Frames to replace by the mask embedding: data2vec's span masking (``span_mask``) at the
    fine-tuning probability, never on padding; None when nothing is masked."""
    if prob <= 0:
        return None
    length = max(1, min(int(length), shape[1]))
    mask = span_mask(
        shape, prob, length, min_masks=min_masks, padding_mask=padding_mask,
        require_same_masks=True, generator=generator, device=device,
    )  # fmt: skip
    return mask if bool(mask.any()) else None


def channel_mask(
    batch: int, channels: int, prob: float, length: int, generator: torch.Generator, device: torch.device
) -> Optional[Tensor]:
    """``(batch, channels)`` feature channels to zero for every frame (fairseq ``mask_channel_*``,
    transformers ``mask_feature_*``); spans of ``length`` channels, no minimum."""
    if prob <= 0:
        return None
    length = max(1, min(int(length), channels))
    mask = span_mask(
        (batch, channels), prob, length, min_masks=0, require_same_masks=False,
        generator=generator, device=device,
    )  # fmt: skip
    return mask if bool(mask.any()) else None


def mask_for_mlm(
    inputs: Tensor,
    padding_mask: Optional[Tensor],
    special_token_ids: Mapping[str, int],
    vocab_size: int,
    prob: float,
    leave_unmasked_prob: float,
    random_token_prob: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """(masked ids, labels) for masked-LM fine-tuning, with the pretraining masker (``mask_tokens``,
    fairseq / BERT semantics): ``prob`` of the real tokens are selected (at least one per sequence),
    of which ``leave_unmasked_prob`` stay, ``random_token_prob`` become a random non-special token,
    the rest ``<mask>``. Labels are the original ids at selected positions, -100 elsewhere; special
    tokens and padding are never selected."""
    specials = torch.tensor(sorted(set(int(v) for v in special_token_ids.values())), device=inputs.device)
    maskable = ~torch.isin(inputs, specials)
    if padding_mask is not None:
        maskable &= ~padding_mask
    keep = torch.ones(vocab_size, dtype=torch.bool, device=inputs.device)
    keep[specials[specials < vocab_size]] = False
    out = mask_tokens(
        inputs, mask_id=int(special_token_ids["mask"]), maskable=maskable, random_token_ids=keep.nonzero().flatten(),
        mask_prob=prob, min_masks=1, leave_unmasked_prob=leave_unmasked_prob, random_token_prob=random_token_prob,
        generator=generator,
    )  # fmt: skip
    return out.input_ids, inputs.masked_fill(~out.selected, -100)
