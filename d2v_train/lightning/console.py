"""What a training run shows while it runs: progress in updates, a one-line model summary, skipped files.

- ``progress_bar(style)``: a progress bar counting optimizer updates towards the run's total
  (``max_steps``, or epochs x batches / accumulation when the run is epoch-bound) with updates/s, ETA,
  the loss and samples/s. Lightning's bars count batches of the current epoch (``Epoch 0/-2`` for a
  step-bound run), which says nothing about how far the run is. ``style``: ``rich``, ``plain`` (tqdm)
  or ``auto`` (rich when installed).
- ``OneLineSummary``: the model summary as one log line (parameters per part, trainable count) instead
  of Lightning's table.
- ``SkippedFilesMonitor``: logs ``data/skipped_files`` (files the data module skipped so far: corrupt,
  empty, too short, ...) into the metrics, so a run that silently loses data shows it in ``metrics.csv``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Union

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar

__all__ = ["OneLineSummary", "QuietWorkers", "SkippedFilesMonitor", "drop_disabled", "progress_bar", "total_updates"]

log = logging.getLogger("d2v_train.console")

SHOWN = {"train/loss": "loss", "train/samples_per_s": "samples/s"}  # metric -> label on the bar


def total_updates(trainer: L.Trainer) -> Union[int, float]:
    """The run's number of optimizer updates (inf when the data is endless and no max_steps is set)."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no data length yet: an open-ended bar
        return math.inf
    return int(total) if math.isfinite(total) else math.inf


def _metrics(trainer: L.Trainer, base: dict[str, Any]) -> dict[str, Any]:
    """Loss and samples/s, plus whatever else the module put on the bar (validation metrics)."""
    out: dict[str, Any] = {}
    cm = trainer.callback_metrics
    for key, label in SHOWN.items():
        if key in cm:
            value = float(cm[key])
            out[label] = f"{value:.0f}" if label == "samples/s" else f"{value:.4g}"
    for key, value in base.items():
        if key != "v_num" and key not in SHOWN:
            out[key.split("/", 1)[-1] if key.startswith("train/") else key] = value
    return out


class PlainUpdateBar(TQDMProgressBar):
    """tqdm bar: ``update 120/200 [00:30<00:20, 4.00it/s, loss=0.23, samples/s=256]``."""

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is None or getattr(bar, "_d2v_started", False):
            return  # one bar for the whole run, not one per epoch
        total = total_updates(trainer)
        bar.reset(total=None if math.isinf(total) else total)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description_str("update")
        bar.unit = "update"
        bar._d2v_started = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and (n % max(self.refresh_rate, 1) == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _metrics(trainer, super().get_metrics(trainer, pl_module))


try:
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import (
        BatchesProcessedColumn,
        CustomBarColumn,
        CustomTimeColumn,
        ProcessingSpeedColumn,
    )
    from rich.progress import TextColumn

    _HAS_RICH = True
except ImportError:  # pragma: no cover - rich is optional
    _HAS_RICH = False
    RichProgressBar = object  # type: ignore[assignment,misc]


class RichUpdateBar(RichProgressBar):  # type: ignore[misc,valid-type]
    """rich bar: ``update 120/200 ━━━━━━ 0:00:30 • 0:00:20 4.00it/s loss: 0.23 samples/s: 256``.

    A module-level class (not built on demand) so ``ddp_spawn`` can pickle it into its workers."""

    @property
    def total_train_batches(self) -> Union[int, float]:
        return total_updates(self.trainer)

    def _get_train_description(self, current_epoch: int) -> str:
        return "update"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(self.total_train_batches, "update")
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _metrics(trainer, super().get_metrics(trainer, pl_module))

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            CustomBarColumn(
                bar_width=20,  # leaves room for the metrics on an 80-column line
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            CustomTimeColumn(style=self.theme.time),
            ProcessingSpeedColumn(style=self.theme.processing_speed),
        ]


def progress_bar(style: str = "auto", refresh_rate: int = 1) -> L.Callback:
    """The update-counting progress bar: ``rich``, ``plain`` (tqdm) or ``auto`` (rich if installed)."""
    if style not in ("auto", "rich", "plain"):
        raise ValueError(f"callbacks.progress.style={style!r}: expected auto, rich or plain")
    if style != "plain" and _HAS_RICH:
        return RichUpdateBar(refresh_rate=refresh_rate)
    if style == "rich":
        raise ValueError("callbacks.progress.style=rich needs the `rich` package (pip install rich)")
    return PlainUpdateBar(refresh_rate=refresh_rate)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class OneLineSummary(ModelSummary):
    """``model: student VisionEncoder 138.4K, head RegressionHead 4.2K, teacher EMATeacher 138.4K;
    142.6K trainable of 281.0K parameters``."""

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0, **kwargs: Any) -> None:
        columns = dict(summary_data)
        names, types, params = columns.get("Name", []), columns.get("Type", []), columns.get("Params", [])
        parts = [f"{n} {t} {p.replace(' ', '')}" for n, t, p in zip(names, types, params) if p.strip() != "0"]
        log.info("model: %s; %s trainable of %s parameters", ", ".join(parts), _count(trainable_parameters),
                 _count(total_parameters))


class SkippedFilesMonitor(L.Callback):
    """Logs ``data/skipped_files``: the number of files the data module skipped so far (every reason).

    Read from ``datamodule.skip_counts()`` (scanning and loader workers alike: the workers' skips are
    kept in shared memory); under DDP, rank 0's count."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        counts = getattr(trainer.datamodule, "skip_counts", None)
        if counts is None:
            return
        total = float(sum(counts().values()))
        pl_module.log("data/skipped_files", total, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)


def drop_disabled(callbacks: list[Any], trainer_args: dict[str, Any]) -> list[Any]:
    """Without the progress bar / model summary the Trainer settings ask for (``enable_progress_bar=false``
    refuses a bar in the callback list; ``enable_model_summary=false`` would still print ours)."""
    from lightning.pytorch.callbacks import ProgressBar

    out = list(callbacks)
    if not trainer_args.get("enable_progress_bar", True):
        out = [cb for cb in out if not isinstance(cb, ProgressBar)]
    if not trainer_args.get("enable_model_summary", True):
        out = [cb for cb in out if not isinstance(cb, ModelSummary)]
    return out


class QuietWorkers(L.Callback):
    """Applies the console's warning filters and noise filter inside processes Lightning starts itself
    (``ddp_spawn`` workers are fresh interpreters: the entry point's settings do not reach them)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from d2v_train.logs import NoiseFilter, quiet_warnings

        quiet_warnings()
        for name in ("lightning.pytorch", "lightning.fabric", ""):
            for handler in logging.getLogger(name).handlers:
                if not any(isinstance(f, NoiseFilter) for f in handler.filters):
                    handler.addFilter(NoiseFilter())
