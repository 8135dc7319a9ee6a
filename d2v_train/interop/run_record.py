"""What an export can tell about how its weights were made: the run's config, last metrics, steps.

A ``d2v-pretrain`` / ``d2v-finetune`` checkpoint sits in ``RUN_DIR/checkpoints/``; its run
directory holds the resolved ``config.yaml`` and ``metrics.csv``. Those, with the checkpoint's
hyper-parameters, decide the preprocessing files of an export (image size, mean/std, sampling
rate, ...) and fill its model card. Every field may be unknown (a transformers directory, a
fairseq file): the export then falls back to the encoder config and says so in the card.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"


@dataclass
class RunRecord:
    """The training run behind a model, as far as it is known.

    ``config``: the resolved run config (``config.yaml``), ``{}`` when unknown. ``hparams``: the
    checkpoint's hyper-parameters. ``metrics``: the last logged value of each ``metrics.csv``
    column. ``step``: the step of the last ``metrics.csv`` row. ``updates``: the optimizer updates
    the weights received (the checkpoint's ``global_step``). ``datamodule``: the live data module when the export
    happens inside the run (fitted statistics are then read from it, not recomputed).
    """

    kind: str = "unknown"
    source: Optional[Path] = None
    run_dir: Optional[Path] = None
    weights: str = "student"
    config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: Optional[int] = None
    updates: Optional[int] = None
    datamodule: Any = None

    @property
    def data(self) -> dict[str, Any]:
        """The run's ``data`` config node (``{}`` when unknown)."""
        node = self.config.get("data")
        return dict(node) if isinstance(node, dict) else {}


def run_dir_of(path: Path) -> Optional[Path]:
    """``RUN_DIR`` for ``RUN_DIR/checkpoints/x.ckpt`` (or a run dir itself); None elsewhere."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder if (folder / CONFIG_FILE).is_file() else None


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as plain containers (``{}`` when unreadable: a card can do without)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(run_dir / CONFIG_FILE)
        data = OmegaConf.to_container(node, resolve=False)
    except Exception:  # noqa: BLE001 - a damaged config.yaml must not stop an export
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(path: Path) -> tuple[dict[str, float], Optional[int]]:
    """(last finite value of each numeric column, last step) of a Lightning ``metrics.csv``."""
    last: dict[str, float] = {}
    step: Optional[int] = None
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key is None or value in (None, ""):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        continue
                    if not math.isfinite(number):
                        continue
                    if key == "step":
                        step = max(step or 0, int(number))
                    else:
                        last[key] = number
    except OSError:
        return {}, None
    return last, step


def read_run(
    source: Path,
    kind: str,
    hparams: Optional[dict[str, Any]] = None,
    weights: str = "student",
    updates: Optional[int] = None,
) -> RunRecord:
    """The record for a model read from ``source`` (a checkpoint or a model directory)."""
    run_dir = run_dir_of(Path(source)) if kind in ("pretraining", "finetuning") else None
    record = RunRecord(kind=kind, source=Path(source), run_dir=run_dir, weights=weights, hparams=dict(hparams or {}),
                       updates=int(updates) if updates is not None else None)
    if run_dir is not None:
        record.config = read_config(run_dir)
        record.metrics, record.step = read_metrics(run_dir / METRICS_FILE)
    return record
