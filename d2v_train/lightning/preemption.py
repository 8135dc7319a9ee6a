"""Checkpoint before exit when the job is told to stop (SIGTERM, SIGUSR1).

Schedulers give notice before they kill: SLURM sends SIGTERM on pre-emption or ``scancel`` (and
SIGUSR1 ahead of the time limit with ``--signal=USR1@<seconds>``), Kubernetes and ``timeout`` send
SIGTERM. ``PreemptionCheckpoint`` turns that notice into a saved ``last.ckpt`` and a clean stop, so
re-running the command (or the requeued job) continues where this one stopped instead of from the
last periodic checkpoint.

The handler itself only records the signal: a checkpoint written from inside a signal handler could
catch the model mid-update. The save happens at the next optimizer update boundary
(``on_train_batch_end`` outside gradient accumulation), after every rank agreed that a signal came
(one all-reduce per update under DDP, since a scheduler may reach the ranks at slightly different
times). After the save the trainer stops; ``stopped_by`` tells the entry point which signal it was, so
it can say so in one line and exit with ``128 + signal number`` (the shell's convention for a process
ended by a signal). With SIGUSR1 inside a SLURM job, the job is also requeued (``scontrol requeue``),
as Lightning's own SLURM handler does.

SIGKILL cannot be caught; the time-based checkpoints of ``RunCheckpoint`` bound what it loses.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any, Optional

import lightning as L

from d2v_train.lightning.checkpointing import LAST_CKPT, RunCheckpoint

__all__ = ["PreemptionCheckpoint", "STOP_SIGNALS"]

log = logging.getLogger("d2v_train.preemption")

STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM / SIGUSR1: save ``last.ckpt`` at the next update and stop training.

    ``signals`` names the signals to handle (default SIGTERM and SIGUSR1). ``requeue``: on SIGUSR1 in
    a SLURM job (``SLURM_JOB_ID`` set), rank 0 runs ``scontrol requeue`` after the save.
    """

    def __init__(self, signals: Optional[list[str]] = None, requeue: bool = True) -> None:
        names = list(STOP_SIGNALS if signals is None else signals)
        self.signals = [getattr(signal, n) for n in names if hasattr(signal, n)]
        self.requeue = requeue
        self.received: Optional[int] = None
        self.stopped_by: Optional[str] = None  # the signal's name once the run stopped for it
        self.saved_at: Optional[int] = None
        self._previous: dict[int, Any] = {}

    # --------------------------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = self.stopped_by = self.saved_at = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # --------------------------------------------------------------------------------- the stop
    def _agreed(self, trainer: L.Trainer) -> bool:
        got = self.received is not None
        if trainer.world_size > 1:
            got = bool(trainer.strategy.reduce_boolean_decision(got, all=False))
        return got

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate() or self.stopped_by is not None:
            return
        if not self._agreed(trainer):
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        self.stopped_by = signal.Signals(signum).name
        self._save(trainer)
        self.saved_at = trainer.global_step
        trainer.should_stop = True
        if self.requeue and signum == getattr(signal, "SIGUSR1", None) and trainer.is_global_zero:
            self._slurm_requeue()

    def _save(self, trainer: L.Trainer) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint) and cb.save_last:
                if cb._last_global_step_saved != trainer.global_step:
                    cb.save_last_now(trainer)
                return
        # no RunCheckpoint configured (callbacks.checkpoint=null): still leave something to resume from
        trainer.save_checkpoint(os.path.join(trainer.default_root_dir, str(LAST_CKPT)), weights_only=False)

    @staticmethod
    def _slurm_requeue() -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job:
            return
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("could not requeue SLURM job %s: %s", job, e)
            return
        if result.returncode == 0:
            log.info("requeued SLURM job %s", job)
        else:
            log.warning("could not requeue SLURM job %s: %s", job, (result.stderr or result.stdout).strip())
