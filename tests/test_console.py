"""What ``d2v-pretrain`` shows: progress in updates towards max_steps, no boilerplate, a one-line model
summary, ``pretrain.log`` holding the same lines, skipped files in ``metrics.csv``, and DDP-on-CPU
pretraining and fine-tuning runs reporting the updates they made."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from run_options import NO_PROBE_COMPARISON

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.batch_size=8", "encoder.hidden_size=32", "encoder.intermediate_size=64",
        "encoder.num_hidden_layers=2", "objective.top_k=2", *NO_PROBE_COMPARISON]
NOISE = ("GPU available", "TPU available", "💡 Tip", "litlogger", "LeafSpec", "Epoch 0/-2",
         "find_unused_parameters", "Trainer.fit` stopped", "┏━━━", "Total params")


def pretrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    path = Path(sys.executable).with_name("d2v-pretrain")
    head = [str(path)] if path.is_file() else [sys.executable, "-m", "d2v_train.pretrain"]
    return subprocess.run([*head, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_plain_progress_log_file_and_skipped_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not really a png")
    run_dir = tmp_path / "run"
    proc = pretrain(f"hydra.run.dir={run_dir}", "data=image", f"data.path={images}", "data.val_fraction=0",
                    "data.num_workers=0", "trainer.max_steps=4", "callbacks.progress.style=plain", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout.replace("\r", "\n")
    assert "update 4/4" in shown and "loss=" in shown and "samples/s=" in shown and "<00:00" in shown  # ETA
    for noise in NOISE:
        assert noise not in shown + proc.stderr, noise
    assert sum(line.startswith("model: student VisionEncoder") for line in shown.splitlines()) == 1
    skip_line = next(line for line in shown.splitlines() if "broken.png" in line)
    assert skip_line.startswith("warning: skipping ")
    log = (run_dir / "pretrain.log").read_text()
    for line in (skip_line.removeprefix("warning: "), "model: student VisionEncoder", "d2v-pretrain: done: 4 updates"):
        assert line in log, line
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [float(r["data/skipped_files"]) for r in rows] == [1.0] * 4


def test_ddp_cpu_reports_its_updates(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = pretrain(f"hydra.run.dir={run_dir}", "trainer=ddp_cpu", "trainer.max_steps=3", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "d2v-pretrain: done: 3 updates" in out and "update 3/3" in out  # the rich bar
    assert "find_unused_parameters" not in out and "LeafSpec" not in out
    # one row per update (the online probe's final row comes after the last update)
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]

    # fine-tuning that encoder the same way counts its updates too (they ran in the spawned workers)
    finetune = Path(sys.executable).with_name("d2v-finetune")
    head = [str(finetune)] if finetune.is_file() else [sys.executable, "-m", "d2v_train.finetune"]
    proc = subprocess.run([*head, f"pretrained={run_dir}", f"hydra.run.dir={tmp_path / 'ft'}", "trainer=ddp_cpu",
                           "trainer.max_steps=3", "data.batch_size=8"], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "d2v-finetune: done: 3 updates" in proc.stdout + proc.stderr
