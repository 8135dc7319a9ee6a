"""A 2-job sweep through the real console entry point: every job in its own directory, one job fails
(a bad scheduler name) and is recorded without stopping the sweep, and sweep_results.csv + a printed
table come out at the end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from d2v_train.lightning.sweep import format_table, record_job, write_results


def test_results_table_from_job_files(tmp_path: Path) -> None:
    record_job(tmp_path / "0", ["optim.lr=1e-3", "seed=1"], "ok", {"val/acc": 0.5, "best/acc": 0.6}, job_num=0)
    record_job(tmp_path / "1", ["optim.lr=1e-2", "seed=1"], "failed", error="ValueError: boom", job_num=1)
    out, rows = write_results(tmp_path)
    table = list(csv.DictReader(open(out)))
    assert [r["status"] for r in table] == ["ok", "failed"] and table[0]["optim.lr"] == "1e-3"
    assert table[0]["best/acc"] == "0.6" and table[1]["error"] == "ValueError: boom"
    assert "optim.lr" in format_table(tmp_path).splitlines()[0]


def test_two_job_sweep_end_to_end(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "d2v_train.finetune", "-m",
        "optim.scheduler=cosine,no_such_schedule",
        "trainer.max_steps=3", "trainer.max_epochs=-1", "+trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "data.batch_size=16", "encoder.num_hidden_layers=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "export=false", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # one job failed
    assert proc.stderr.strip().splitlines()[-1] == (
        f"d2v-finetune: error: 1 of 2 sweep jobs failed (errors in the table above and in {sweep_dir / 'sweep_results.csv'})"
    )
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "job 1 failed" in line]
    assert len(said) == 1, said  # the error once, not once per handler or print
    rows = list(csv.DictReader(open(sweep_dir / "sweep_results.csv")))
    assert [r["optim.scheduler"] for r in rows] == ["cosine", "no_such_schedule"]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["val/acc"] and "no_such_schedule" in rows[1]["error"]
    assert (sweep_dir / "0" / "metrics.csv").is_file() and (sweep_dir / "1" / "result.json").is_file()
    assert "sweep: 2 jobs (1 failed)" in proc.stdout and "optim.scheduler" in proc.stdout
