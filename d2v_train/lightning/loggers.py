"""``RunCSVLogger``: ``metrics.csv`` directly in the run directory, appended to when a run resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` whenever its directory is not empty,
which is always the case for a Hydra run directory and would erase the history of a resumed run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["RunCSVLogger"]


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep earlier rows: the writer appends and merges headers
        return None


class RunCSVLogger(CSVLogger):
    """CSV logger writing ``<save_dir>/metrics.csv`` (and ``hparams.yaml``) without a version folder."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", "")
        kwargs.setdefault("version", "")
        super().__init__(save_dir, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
