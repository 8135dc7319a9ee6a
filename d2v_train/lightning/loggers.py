"""Loggers that belong to a run directory and survive a resume.

- ``RunCSVLogger``: ``metrics.csv`` directly in the run directory, appended to when a run resumes, and
  written at every update (not every 100), so a killed run has lost no row its checkpoint covers.
  Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` whenever its directory is not empty,
  which is always the case for a Hydra run directory and would erase the history of a resumed run.
  ``rewind(step)`` (called by ``ExactResume`` when a run resumes) drops rows a killed run logged after
  its last checkpoint, so the file reads as if the run had never stopped.
- ``wandb_run_id``: the W&B run id kept in ``<run dir>/wandb_id``, so re-running in the same run
  directory continues the same W&B run (``resume="allow"``) instead of starting a new one.
"""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["RunCSVLogger", "wandb_run_id", "WANDB_ID_FILE"]

WANDB_ID_FILE = "wandb_id"


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep earlier rows: the writer appends and merges headers
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """A new column: rewrite the file through a temporary file, so a kill cannot truncate it."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._replace_rows(fieldnames, rows)

    def _replace_rows(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        """Writes the whole file through a temporary file and a rename: a kill never truncates it."""
        tmp = self.metrics_file_path + ".tmp"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)

    def rewind(self, step: int) -> None:
        """Drop the rows of ``step`` and later (unsaved ones too)."""
        self.metrics = [m for m in self.metrics if int(m.get("step", 0)) < step]
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) == len(rows):
            return
        self._replace_rows(fields, kept)


class RunCSVLogger(CSVLogger):
    """CSV logger writing ``<save_dir>/metrics.csv`` (and ``hparams.yaml``) without a version folder."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", "")
        kwargs.setdefault("version", "")
        # every row reaches the file when it is logged (one appended line per update): a killed run's
        # file then holds every update up to its last checkpoint, which a resume continues from
        kwargs.setdefault("flush_logs_every_n_steps", 1)
        super().__init__(save_dir, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def rewind(self, step: int) -> None:
        """Forget the rows logged at ``step`` and after (a resume from the checkpoint of ``step``)."""
        self.experiment.rewind(step)


def wandb_run_id(run_dir: Path, ckpt_path: Optional[str] = None) -> str:
    """The run directory's W&B id: read from ``<run_dir>/wandb_id`` (or, when resuming from another
    run's checkpoint, from that run's directory), else a new one written there."""
    candidates = [run_dir / WANDB_ID_FILE]
    if ckpt_path:
        candidates.append(Path(ckpt_path).resolve().parent.parent / WANDB_ID_FILE)
    run_id = next((p.read_text().strip() for p in candidates if p.is_file() and p.read_text().strip()), "")
    if run_id and candidates[0].is_file():
        return run_id
    run_id = run_id or secrets.token_hex(4)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / WANDB_ID_FILE).write_text(run_id + "\n")
    return run_id
