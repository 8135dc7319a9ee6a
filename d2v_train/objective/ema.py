"""EMA teacher: an exponential moving average of the student encoder, kept in fp32.

Rules (shared/reference/data2vec-original.md section 3):
- The teacher starts as an exact copy of the student.
- theta_t <- tau * theta_t + (1 - tau) * theta_s on an fp32 shadow; tau ramps linearly from tau0 to
  tau_end over ``anneal_steps`` optimizer updates, then stays (``ema_decay_at``).
- Parameters under ``copy_prefixes`` (the reference's ``skip_keys``: audio pos-conv, text
  embeddings) and parameters without ``requires_grad`` are copied from the student, not averaged.
- Parameters under ``share_prefixes`` belong to parts whose *outputs* the teacher takes from the
  student (audio: the CNN feature extractor and projection); they are copied too, so the teacher
  stays a self-consistent encoder.
- Buffers are always copied.
- tau >= 1 freezes the teacher: nothing is averaged or copied (as data2vec 2.0 skips the step).
- ``step`` must be called once per optimizer update; the caller guarantees it (v1 stepped once per
  micro-batch under gradient accumulation, a reference bug we do not copy).

The update is one ``torch._foreach_lerp_`` over all averaged tensors, not a per-parameter loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["EMASchedule", "EMATeacher", "ema_decay_at", "resolve_schedule"]


def ema_decay_at(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Linear ramp tau(t) = end - (end - start) * (1 - t / T) for t < T, then ``end``."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return float(end)
    return float(end - (end - start) * (1.0 - step / anneal_steps))


@dataclass(frozen=True)
class EMASchedule:
    """The decay ramp of one run, resolved against its length (``resolve_schedule``)."""

    decay: float
    end_decay: float
    anneal_steps: int

    def at(self, step: int) -> float:
        return ema_decay_at(step, self.decay, self.end_decay, self.anneal_steps)


def resolve_schedule(
    decay: float,
    end_decay: float,
    anneal_steps: int,
    total_steps: Optional[int],
    anneal_fraction: Optional[float] = None,
    max_horizon: Optional[float] = None,
) -> EMASchedule:
    """Sizes the ramp to a run of ``total_steps`` updates.

    ``anneal_fraction`` replaces ``anneal_steps`` by that share of the run; ``max_horizon`` caps each
    decay at ``1 - 1 / (max_horizon * total_steps)`` (but not below 0.9) so the teacher averages over
    at most that share of the run. Without a known length (``total_steps`` None or <= 0) the values are taken as given.
    """
    if not total_steps or total_steps <= 0:
        return EMASchedule(float(decay), float(end_decay), int(anneal_steps))
    if anneal_fraction is not None:
        anneal_steps = max(1, round(anneal_fraction * total_steps))
    if max_horizon is not None:
        # an average over fewer than 10 updates is hardly a teacher: the cap stops at 0.9
        cap = max(0.9, 1.0 - 1.0 / (max_horizon * total_steps))
        decay, end_decay = min(decay, cap), min(end_decay, cap)
    return EMASchedule(float(decay), float(end_decay), int(anneal_steps))


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class EMATeacher(nn.Module):
    """Holds the teacher copy of a student module and updates it from the student.

    Args:
        student: the student encoder (deep-copied once here; not stored).
        copy_prefixes: parameter-name prefixes copied from the student each step.
        share_prefixes: prefixes of parts whose outputs the teacher takes from the student.
    """

    def __init__(
        self,
        student: nn.Module,
        copy_prefixes: Sequence[str] = (),
        share_prefixes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()
        self.copy_prefixes = tuple(copy_prefixes)
        self.share_prefixes = tuple(share_prefixes)
        names = [n for n, _ in student.named_parameters()]
        for p in self.copy_prefixes + self.share_prefixes:
            if not any(_matches(n, [p]) for n in names):
                raise ValueError(f"EMA prefix {p!r} matches no parameter of the student")
        trainable = {n for n, p in student.named_parameters() if p.requires_grad}
        self.ema_names = [
            n for n in names if n in trainable and not _matches(n, self.copy_prefixes + self.share_prefixes)
        ]
        self.copy_names = [n for n in names if n not in set(self.ema_names)]
        self.buffer_names = [n for n, _ in student.named_buffers()]
        self._shadow: list[Tensor] | None = None  # fp32 shadows, only when teacher params are not fp32

    # the teacher never trains: keep it in eval mode whatever the parent's mode
    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _ema_params(self) -> list[Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.ema_names]

    def shadow(self) -> list[Tensor]:
        """fp32 tensors the average is kept in (the teacher's own params when they are fp32)."""
        params = self._ema_params()
        if all(p.dtype == torch.float32 for p in params):
            self._shadow = None
            return [p.data for p in params]
        if self._shadow is None or self._shadow[0].device != params[0].device:
            self._shadow = [p.detach().float().clone() for p in params]
        return self._shadow

    @torch.no_grad()
    def step(self, student: nn.Module, decay: float) -> None:
        """One EMA update from the student's current weights (call once per optimizer update)."""
        if decay >= 1.0:
            return
        s_params = dict(student.named_parameters())
        t_params = dict(self.model.named_parameters())
        if self.ema_names:
            shadow = self.shadow()
            src = [s_params[n].detach() for n in self.ema_names]
            if src[0].dtype != torch.float32:
                src = [s.float() for s in src]
            torch._foreach_lerp_(shadow, src, 1.0 - decay)
            if self._shadow is not None:
                torch._foreach_copy_([t_params[n].data for n in self.ema_names], shadow)
        if self.copy_names:
            torch._foreach_copy_(
                [t_params[n].data for n in self.copy_names], [s_params[n].detach() for n in self.copy_names]
            )
        if self.buffer_names:
            s_buf = dict(student.named_buffers())
            t_buf = dict(self.model.named_buffers())
            for n in self.buffer_names:  # few, and may differ in dtype (ints): plain copies
                t_buf[n].copy_(s_buf[n])

    def _apply(self, fn: Any, recurse: bool = True) -> "EMATeacher":
        """Keep the fp32 shadow through dtype / device conversions of the parent module
        (e.g. Lightning's ``bf16-true``): snapshot fp32 weights before a cast, follow device moves."""
        params = self._ema_params()
        if self._shadow is None and params and all(p.dtype == torch.float32 for p in params):
            before = [p.detach().clone() for p in params]
        else:
            before = self._shadow
        super()._apply(fn, recurse)
        params = self._ema_params()
        if before is None or not params:
            return self
        if all(p.dtype == torch.float32 for p in params):
            with torch.no_grad():  # back in fp32: the shadow's values become the weights again
                torch._foreach_copy_([p.data for p in params], [b.to(p.device) for b, p in zip(before, params)])
            self._shadow = None
        else:
            self._shadow = [b.to(p.device, torch.float32) for b, p in zip(before, params)]
        return self

    # keep the fp32 shadow (when one exists) in checkpoints so a resumed run is exact
    def get_extra_state(self) -> Any:
        return {"shadow": None if self._shadow is None else [s.cpu() for s in self._shadow]}

    def set_extra_state(self, state: Any) -> None:
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if shadow is not None:
            params = self._ema_params()
            self._shadow = [s.to(p.device, torch.float32) for s, p in zip(shadow, params)]
