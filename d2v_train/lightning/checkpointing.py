"""Training checkpoints that survive crashes and resume exactly.

- ``AtomicCheckpointIO``: the Trainer's checkpoint plugin. Writes go to a temporary file in the
  checkpoint's folder, are fsync'ed and then renamed over the target, so a process killed mid-save
  leaves the previous checkpoint intact (Lightning's own writer uses an fsspec transaction that stages
  the file elsewhere and moves it without fsync). A checkpoint whose weights are not finite is not
  written at all, so the file on disk is always the last good state. Loads always use
  ``torch.load(weights_only=True)``: a file that would need pickled code is refused with one line.
- ``ExactResume``: a callback adding what Lightning does not restore by itself: the RNG streams
  (python ``random``, numpy, torch CPU and CUDA; per rank under DDP) and the CSV history past the
  checkpoint (rows a killed run logged after its last save are dropped, then the resumed run appends).
- ``RunCheckpoint``: ``ModelCheckpoint`` whose final ``last.ckpt`` is resumable mid-epoch, and which
  also saves ``last.ckpt`` every ``every_n_minutes`` of training (besides every N updates), so a job
  killed without warning (SIGKILL, a node failure) loses at most that much work.
- ``set_aside_attempt``: a run directory re-used without a checkpoint to resume from keeps no rows of the
  dead attempt in the new ``metrics.csv``: its files move to ``attempt-<n>/``.
- ``resolve_ckpt_path``: what ``ckpt_path=`` means for ``d2v-pretrain`` (auto-resume from the run
  directory's ``checkpoints/last.ckpt``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from d2v_train.cli import ConfigError, UserError
from d2v_train.interop.files import ACCEPTED_SOURCES, atomic_write, not_a_torch_file, torch_load_safely

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointRefusedError",
    "refuse_other_layout",
    "ExactResume",
    "RunCheckpoint",
    "final_state_saved",
    "load_checkpoint_safely",
    "nonfinite_keys",
    "resolve_ckpt_path",
    "set_aside_attempt",
    "updates_done",
    "LAST_CKPT",
]

log = logging.getLogger("d2v_train.checkpoint")

LAST_CKPT = Path("checkpoints") / "last.ckpt"


class CheckpointRefusedError(UserError):
    """A checkpoint that cannot be loaded safely (needs pickled code, unreadable, missing)."""


def _first_names(keys: set[str], shown: int = 3) -> str:
    names = sorted(keys)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def refuse_other_layout(module: torch.nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """For a LightningModule's ``on_load_checkpoint`` (called before the weights load): a checkpoint
    of another model layout, from a setting that adds or removes parameters changed since the run
    started, gets one line naming them, not torch's missing-keys dump."""
    saved = set(checkpoint.get("state_dict") or {})
    own = set(module.state_dict())
    if not saved or saved == own:
        return
    problems = []
    if own - saved:
        problems.append(f"this run's model has {_first_names(own - saved)}, which the checkpoint lacks")
    if saved - own:
        problems.append(f"the checkpoint holds {_first_names(saved - own)}, which this run's model lacks")
    raise CheckpointRefusedError(
        f"the checkpoint being resumed does not fit this run's model: {'; '.join(problems)}. A resumed run "
        "needs the settings it started with (its run directory's config.yaml); ckpt_path=null starts over"
    )


# ------------------------------------------------------------------------------------------ files


def load_checkpoint_safely(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; anything else is a one-line ``CheckpointRefusedError``.

    ``weights_only`` restricts unpickling to tensors and plain containers, so a crafted file cannot
    run code; the message names the file and the object it tried to build."""
    p = Path(path)
    try:
        state = torch_load_safely(p, map_location=map_location, kind="checkpoint")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointRefusedError(str(e)) from None
    if not isinstance(state, dict):
        raise CheckpointRefusedError(f"checkpoint {p}: expected a dict, got {type(state).__name__}")
    return state


def nonfinite_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [
        k for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``interop.files.atomic_write`` (temp file next to the target, fsync, rename).

    Local paths only (remote URLs fall back to Lightning's writer). Stale temporary files of killed
    saves are removed by the next save of the same checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        bad = nonfinite_keys(checkpoint.get("state_dict", {}))
        if bad:
            log.warning(
                "not writing %s: %d weight tensors hold NaN/inf (first: %s); the previous checkpoint stays",
                target, len(bad), bad[0],
            )  # fmt: skip
            return None
        if target.parent.is_dir():
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                stale.unlink(missing_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)

        atomic_write(target, write)
        return None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Always ``weights_only=True`` (the argument is ignored: training checkpoints never need more)."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_safely(path, map_location=map_location if map_location is not None else "cpu")


# ------------------------------------------------------------------------------------------ resume


def resolve_ckpt_path(value: Any, run_dir: Path) -> Optional[str]:
    """What to resume from, given ``ckpt_path=`` and the run directory.

    - ``auto`` (the default): ``<run_dir>/checkpoints/last.ckpt`` when it exists (or a newer
      ``hpc_ckpt_*.ckpt`` that Lightning's SLURM requeue wrote in the run directory), else start fresh;
    - ``last``: ``<run_dir>/checkpoints/last.ckpt``, which must exist;
    - ``hpc``: Lightning's SLURM requeue checkpoint (passed through);
    - ``null`` / ``none`` / ``""``: start from scratch even if the run directory holds a checkpoint;
    - any other value: a checkpoint file, which must exist.
    """
    last = run_dir / LAST_CKPT
    text = "" if value is None else str(value).strip()
    if text.lower() == "hpc":
        return "hpc"
    if text.lower() in ("", "none", "null"):
        return None  # the entry point sets the earlier attempt aside (``set_aside_attempt``) and says so
    if text.lower() == "auto":
        found = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
        return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None
    path = last if text.lower() == "last" else Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={text}: no checkpoint at {path}; ckpt_path=null starts over")
    problem = not_a_torch_file(path) if text.lower() != "last" else None
    if problem:
        raise ConfigError(f"ckpt_path={text}: {problem.replace(ACCEPTED_SOURCES, 'a .ckpt written by d2v-pretrain')}")
    return str(path)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ExactResume(L.Callback):
    """Puts the RNG streams and the CSV history where the uninterrupted run had them.

    Every rank's RNG states go into the checkpoint (gathered to rank 0). Each rank gets its own back
    right before the first training batch after the resume, i.e. after Lightning has built the model,
    optimizer and data iterators (the data loaders never draw from the global RNG, so nothing in
    between shifts the streams). Dropout, drop-path and anything else drawing from the global
    generators then draws exactly what the straight run drew. ``trained`` says whether this fit ran
    any batch (a re-run of a finished command runs none).
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None
        self.trained = False

    def state_dict(self) -> dict[str, Any]:
        rank, world = _world()
        states: list[Any] = [_rng_state()]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng") or []
        rank, world = _world()
        if not states:
            return
        if len(states) != world:
            log.warning(
                "the checkpoint holds RNG states of %d processes, this run has %d: random streams (dropout) "
                "continue from rank 0's, not exactly as before", len(states), world,
            )  # fmt: skip
        self._pending = states[rank] if rank < len(states) else states[0]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        step = trainer.global_step  # rows are logged per update, as steps 0 .. global_step - 1
        for logger in trainer.loggers:
            rewind = getattr(logger, "rewind", None)
            if rewind is not None:
                rewind(step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trained = True


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` of a ``max_steps`` run is taken at the last update, and
    which also saves ``last.ckpt`` after every ``every_n_minutes`` of training.

    Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` in ``on_train_end`` when it has not saved
    before, and ``trainer.save_checkpoint`` after ``fit`` does the same: both record the epoch as
    finished, so a run extended from that checkpoint (larger ``max_steps``) would skip the rest of
    the epoch. Saved at the last update's ``on_train_batch_end`` instead, it is a mid-epoch
    checkpoint like any other, and the extended run continues exactly.

    The time-based save exists because a step cadence alone cannot be right for every model size: 1,000
    updates are seconds for a tiny run and hours for a large one. Lightning offers steps *or* time, not
    both; here both apply (whichever comes first). Rank 0's clock decides, broadcast to every rank so
    all save at the same update. Saves happen only at an optimizer update, never mid-accumulation.
    """

    def __init__(self, *args: Any, every_n_minutes: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every_n_minutes = float(every_n_minutes) if every_n_minutes else None
        self._last_time: Optional[float] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_time = time.monotonic()

    def _time_is_up(self, trainer: L.Trainer) -> bool:
        if self.every_n_minutes is None or self._last_time is None:
            return False
        due = time.monotonic() - self._last_time >= 60.0 * self.every_n_minutes
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due))
        return due

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` for the current update (time-based and pre-emption saves)."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        before = self._last_global_step_saved
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._last_global_step_saved != before:
            self._last_time = time.monotonic()  # a step-based save restarts the clock
        if not self.save_last or trainer.fit_loop._should_accumulate() or self._should_skip_saving_checkpoint(trainer):
            return
        last_update = 0 < trainer.max_steps <= trainer.global_step
        if last_update or self._time_is_up(trainer):
            self.save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            super().on_train_end(trainer, pl_module)


def final_state_saved(trainer: L.Trainer) -> bool:
    """Whether a checkpoint callback already saved the trainer's current step."""
    return any(
        isinstance(cb, ModelCheckpoint) and cb.save_last and cb._last_global_step_saved == trainer.global_step
        for cb in trainer.checkpoint_callbacks
    )


# files a run writes into its run directory that belong to one attempt (the log and .hydra/ of the
# current process are already open / rewritten, so they stay)
ATTEMPT_FILES = ("metrics.csv", "hparams.yaml", "config.yaml", "wandb_id", "tensorboard", "wandb", "checkpoints")


def set_aside_attempt(run_dir: Path) -> Optional[Path]:
    """Move an earlier attempt's files (metrics, logger state, checkpoints) to ``<run_dir>/attempt-<n>/``.

    Called when a run starts from scratch in a directory that already holds them (a run killed before
    its first checkpoint, or ``ckpt_path=null``): appending to the old ``metrics.csv`` would list the
    first updates twice, and nothing the user may want to read is deleted. Returns the new folder, or
    None when there was nothing to move.
    """
    present = [run_dir / name for name in ATTEMPT_FILES if (run_dir / name).exists()]
    if not any(p.name in ("metrics.csv", "checkpoints") for p in present):
        return None
    n = 1
    while (run_dir / f"attempt-{n}").exists():
        n += 1
    target = run_dir / f"attempt-{n}"
    target.mkdir()
    for p in present:
        os.replace(p, target / p.name)
    return target


def updates_done(trainer: L.Trainer, last: Path) -> int:
    """The number of updates the fit made. Under ``ddp_spawn`` the training ran in child processes and
    this process's trainer still reads 0, so the count comes from the final checkpoint they wrote."""
    if trainer.global_step or not last.is_file():
        return int(trainer.global_step)
    return int(load_checkpoint_safely(last).get("global_step", 0))
