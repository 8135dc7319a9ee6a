"""Callbacks for pretraining runs: collapse monitor, non-finite loss guard and throughput.

The EMA update itself lives in ``Data2VecPretraining.optimizer_step``: it is part of the method,
so a run without callbacks is still correct. These callbacks read ``pl_module.last_stats`` (detached,
already all-reduced tensors written by ``training_step``).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L

__all__ = ["CollapseMonitor", "NonFiniteLossGuard", "ThroughputMonitor", "TrainingCollapsedError"]


class TrainingCollapsedError(RuntimeError):
    """Raised when targets or predictions lose their variance (representation collapse)."""


class CollapseMonitor(L.Callback):
    """Stops training when the all-reduced per-dimension std of the targets or predictions falls
    below its threshold after ``check_after`` updates (reference: 0.1 / 0.01 after 5000).

    Thresholds default to the module's ``objective`` config; 0 disables a check. Every rank sees the
    same all-reduced values, so every rank stops together.
    """

    def __init__(
        self,
        min_target_std: Optional[float] = None,
        min_pred_std: Optional[float] = None,
        check_after: Optional[int] = None,
    ) -> None:
        self.min_target_std = min_target_std
        self.min_pred_std = min_pred_std
        self.check_after = check_after

    def _limits(self, pl_module: Any) -> tuple[float, float, int]:
        obj = getattr(pl_module, "objective", None)
        t = self.min_target_std if self.min_target_std is not None else getattr(obj, "min_target_std", 0.0)
        p = self.min_pred_std if self.min_pred_std is not None else getattr(obj, "min_pred_std", 0.0)
        a = self.check_after if self.check_after is not None else getattr(obj, "collapse_check_after", 0)
        return float(t), float(p), int(a)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        min_t, min_p, after = self._limits(pl_module)
        stats = getattr(pl_module, "last_stats", {})
        if trainer.global_step < after or not stats or (min_t <= 0 and min_p <= 0):
            return
        t_std, p_std = float(stats["target_std"]), float(stats["pred_std"])
        step = trainer.global_step
        if min_t > 0 and t_std < min_t:
            raise TrainingCollapsedError(
                f"target std {t_std:.4g} < objective.min_target_std={min_t} at update {step}: the teacher's "
                "representations collapsed; lower the learning rate or raise the EMA decay "
                "(set objective.min_target_std=0 to disable this check)"
            )
        if min_p > 0 and p_std < min_p:
            raise TrainingCollapsedError(
                f"prediction std {p_std:.4g} < objective.min_pred_std={min_p} at update {step}: the student's "
                "predictions collapsed; lower the learning rate (set objective.min_pred_std=0 to disable)"
            )


class NonFiniteLossGuard(L.Callback):
    """Stops the run after ``max_consecutive`` NaN / inf losses in a row.

    The module already skips each such update (no optimizer or EMA step); a long streak means the
    run will not recover by itself (e.g. the weights became non-finite), so it is stopped with one
    line instead of burning compute. No final checkpoint is written: ``checkpoints/last.ckpt`` stays
    the last good one (``AtomicCheckpointIO`` never writes non-finite weights either). 0 disables.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = int(max_consecutive)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        streak = int(getattr(pl_module, "bad_streak", 0))
        if self.max_consecutive > 0 and streak >= self.max_consecutive:
            raise TrainingCollapsedError(
                f"{streak} non-finite (NaN/inf) losses in a row at update {trainer.global_step} "
                f"({getattr(pl_module, 'skipped_steps', streak)} skipped in all); lower the learning rate "
                f"or check the data (limit: callbacks.nonfinite.max_consecutive={self.max_consecutive})"
            )


class ThroughputMonitor(L.Callback):
    """Logs ``train/samples_per_s`` and ``train/tokens_per_s`` (audio frames, image patches, text
    tokens, over all ranks) measured between consecutive training batches."""

    def __init__(self) -> None:
        self._t: Optional[float] = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._t is None:
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        stats = getattr(pl_module, "last_stats", {})
        if self._t is not None and stats:
            dt = max(now - self._t, 1e-9)
            kw = dict(on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
            pl_module.log("train/samples_per_s", float(stats["samples"]) / dt, **kw)
            pl_module.log("train/tokens_per_s", float(stats["tokens"]) / dt, **kw)
        self._t = now
