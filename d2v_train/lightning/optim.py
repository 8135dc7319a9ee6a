"""AdamW parameter groups and the learning-rate schedules of the data2vec recipes.

Schedules are multipliers of the peak lr, per optimizer update (``LambdaLR``, interval ``step``):
- ``cosine``: linear warmup 0 -> peak, then cosine to ``min_lr`` (fairseq ``cosine``; BEiT).
- ``tri_stage``: warmup from ``init_lr_scale * peak``, hold, then *exponential* decay to
  ``final_lr_scale * peak`` (fairseq's code; the paper says linear), phases given as ratios.
- ``polynomial``: linear warmup, then ``(1 - progress) ** power`` down to ``end_lr``.
- ``constant``: linear warmup, then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["OptimConfig", "param_groups", "lr_lambda", "adamw", "build_optimizer"]


@dataclass
class OptimConfig:
    """AdamW + schedule. ``total_steps`` null = the trainer's ``max_steps`` (or its estimate)."""

    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    # true: every parameter decays (the reference's v1 audio and text fairseq runs); false: no weight
    # decay on biases, 1-D parameters (norms) and ``no_decay_names`` (BEiT / data2vec-vision, v2)
    decay_all: bool = False
    # no weight decay on biases, 1-D parameters (norms) and these names (learned tokens)
    no_decay_names: list[str] = field(
        default_factory=lambda: ["cls_token", "mask_token", "mask_embedding", "pos_embed"]
    )
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    total_steps: int | None = None
    min_lr: float = 0.0
    # tri_stage
    phase_ratio: list[float] = field(default_factory=lambda: [0.03, 0.9, 0.07])
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    # polynomial
    power: float = 1.0
    end_lr: float = 0.0
    # true: torch's fused AdamW kernel where every parameter allows it (CPU / CUDA floating tensors),
    # one kernel for all tensors instead of a loop over them. Off by default: its rounding differs
    # from the loop's, so runs would no longer repeat the figures in docs/ to the last digit
    fused: bool = False


def _no_decay(name: str, param: torch.Tensor, names: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name.endswith(".bias") or leaf in set(names)


def param_groups(modules: dict[str, nn.Module], cfg: OptimConfig) -> list[dict]:
    """AdamW groups over the trainable parameters of ``modules`` (prefix -> module): with weight
    decay, and without it for biases, 1-D parameters and ``cfg.no_decay_names`` (unless
    ``cfg.decay_all``, when one group decays everything)."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            exempt = not cfg.decay_all and _no_decay(f"{prefix}.{name}", p, cfg.no_decay_names)
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at update ``step`` for ``cfg.scheduler``."""
    total = max(int(total_steps), 1)
    peak = cfg.lr
    kind = cfg.scheduler
    if kind == "tri_stage":
        r = list(cfg.phase_ratio)
        if len(r) != 3 or abs(sum(r) - 1.0) > 1e-6:
            raise ValueError(f"optim.phase_ratio must be 3 ratios summing to 1, got {r}")
        warm, hold = int(r[0] * total), int(r[1] * total)
        decay = max(total - warm - hold, 1)
        decay_factor = -math.log(cfg.final_lr_scale) / decay

        def tri(step: int) -> float:
            if step < warm:
                return cfg.init_lr_scale + (1.0 - cfg.init_lr_scale) * step / max(warm, 1)
            if step < warm + hold:
                return 1.0
            if step < total:
                return math.exp(-decay_factor * (step - warm - hold))
            return cfg.final_lr_scale

        return tri
    warm = int(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else int(cfg.warmup_steps)
    min_scale = cfg.min_lr / peak if peak > 0 else 0.0
    end_scale = cfg.end_lr / peak if peak > 0 else 0.0

    def warmup(step: int) -> float | None:
        if step < warm:
            return (step + 1) / (warm + 1)  # never exactly 0, so the first update moves
        return None

    if kind == "cosine":

        def cosine(step: int) -> float:
            w = warmup(step)
            if w is not None:
                return w
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return cosine
    if kind == "polynomial":

        def poly(step: int) -> float:
            w = warmup(step)
            if w is not None:
                return w
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            return end_scale + (1.0 - end_scale) * (1.0 - progress) ** cfg.power

        return poly
    if kind == "constant":
        return lambda step: warmup(step) or 1.0
    raise ValueError(f"optim.scheduler={kind!r} is not one of cosine, tri_stage, polynomial, constant")


def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over parameter ``groups``, fused when ``cfg.fused`` and every parameter is a floating
    tensor on CPU or CUDA (elsewhere, e.g. MPS, torch's default implementation)."""
    params = [p for g in groups for p in g["params"]]
    fused = cfg.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)  # type: ignore[arg-type]


def build_optimizer(
    modules: dict[str, nn.Module], cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups`` and its per-update ``LambdaLR``."""
    opt = adamw(param_groups(modules, cfg), cfg)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
