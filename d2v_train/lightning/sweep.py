"""Sweep bookkeeping: every job writes ``result.json`` in its own directory; at the end of a
multirun a Hydra callback gathers them into ``sweep_results.csv`` and prints a table.

A job that fails is recorded (status ``failed`` and the error's first line) by ``record_job``, called
from the task wrapper in ``d2v_train.finetune``, so one bad learning rate does not stop the sweep.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hydra.experimental.callback import Callback

__all__ = ["RESULT_FILE", "SWEEP_FILE", "SweepResults", "collect", "format_table", "record_job", "write_results"]

RESULT_FILE = "result.json"
SWEEP_FILE = "sweep_results.csv"


def record_job(
    run_dir: str | Path,
    overrides: Sequence[str],
    status: str,
    metrics: Optional[Mapping[str, Any]] = None,
    error: Optional[str] = None,
    job_num: Optional[int] = None,
) -> Path:
    """Write ``<run_dir>/result.json`` (atomic) with the job's overrides, status and final metrics."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    clean = {}
    for k, v in (metrics or {}).items():
        try:
            f = float(v)
            clean[k] = f if math.isfinite(f) else None
        except (TypeError, ValueError):
            clean[k] = v
    payload = {"job": job_num, "overrides": list(overrides), "status": status, "metrics": clean, "error": error}
    tmp = run / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(run / RESULT_FILE)
    return run / RESULT_FILE


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job's ``result.json`` under ``sweep_dir`` (sorted by job number)."""
    rows = []
    for f in Path(sweep_dir).glob(f"*/{RESULT_FILE}"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        data["dir"] = str(f.parent)
        rows.append(data)
    return sorted(rows, key=lambda r: (r.get("job") is None, r.get("job") or 0, r["dir"]))


def _override_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for o in r.get("overrides") or []:
            k = o.split("=", 1)[0].lstrip("+~")
            if k not in keys:
                keys.append(k)
    return keys


def _table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = _override_keys(rows)
    # metrics: the task's val metrics first, then the rest; same set for every row
    names: list[str] = []
    for r in rows:
        for k in (r.get("metrics") or {}):
            if k not in names:
                names.append(k)
    names.sort(key=lambda k: (not k.startswith("best/"), not k.startswith("val/"), k))
    header = ["job", *keys, "status", *names, "error", "dir"]
    body = []
    for r in rows:
        ov = {}
        for o in r.get("overrides") or []:
            k, _, v = o.partition("=")
            ov[k.lstrip("+~")] = v
        m = r.get("metrics") or {}
        cells = [str(r.get("job", ""))] + [ov.get(k, "") for k in keys] + [str(r.get("status", ""))]
        for n in names:
            v = m.get(n)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        cells += [str(r.get("error") or ""), str(r.get("dir", ""))]
        body.append(cells)
    return header, body


def write_results(sweep_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``<sweep_dir>/sweep_results.csv``; returns its path and the rows."""
    rows = collect(sweep_dir)
    header, body = _table(rows)
    out = Path(sweep_dir) / SWEEP_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(body)
    return out, rows


def format_table(sweep_dir: str | Path, max_width: int = 40) -> str:
    """The results as an aligned text table (without the directory column)."""
    header, body = _table(collect(sweep_dir))
    header, body = header[:-1], [b[:-1] for b in body]
    cut = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in [header, *body]]
    widths = [max(len(row[i]) for row in cut) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cut]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class SweepResults(Callback):
    """Hydra callback (``hydra.callbacks``): writes ``sweep_results.csv`` and prints the table when a
    multirun ends. Failed jobs appear with their error; jobs that wrote nothing are listed as missing.
    When any job failed, the process then exits with status 1 (after the table), so scripts and CI
    notice."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        out, rows = write_results(sweep_dir)
        failed = sum(r.get("status") != "ok" for r in rows)
        print(f"\nsweep: {len(rows)} jobs ({failed} failed) -> {out}", file=sys.stdout)
        if rows:
            print(format_table(sweep_dir), file=sys.stdout)
        sys.stdout.flush()
        if failed:  # every job ran and the table is written; the exit status still says it failed
            from d2v_train.cli import fail

            fail(f"{failed} of {len(rows)} sweep jobs failed (errors in the table above and in {out})",
                 f"d2v-{config.hydra.job.name}" if config.hydra.job.get("name") else "d2v", code=1)
