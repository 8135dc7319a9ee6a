"""``d2v-pretrain`` end to end: run directory contents, resume, one-line errors for wrong overrides."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_options import NO_PROBE_COMPARISON

from d2v_train.pretrain import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "d2v_train.pretrain", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def test_default_run_writes_run_dir_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", "seed=3", *NO_PROBE_COMPARISON]
    first = run_cli(*common, "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    resolved = (run_dir / "config.yaml").read_text()
    assert "${" not in resolved and "modality: vision" in resolved and "seed: 3" in resolved
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["train/loss"]]  # not probe rows
    assert [int(r["step"]) for r in rows] == list(range(6))
    for key in ("train/loss", "train/lr", "train/ema_decay", "train/target_std", "train/pred_std",
                "train/mask_frac", "train/samples_per_s", "train/tokens_per_s"):
        assert all(r[key] not in ("", None) for r in rows), key
    assert 0.7 < float(rows[0]["train/mask_frac"]) < 0.8  # the vision preset masks 75% of the patches

    second = run_cli(*common, "trainer.max_steps=9", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == list(range(9))  # appended, not overwritten
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 9 and ckpt["d2v_ema_last_step"] == 9
    assert any(k.startswith("teacher.model.") for k in ckpt["state_dict"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("encoder=vision_huge", "unknown option 'vision_huge' for 'encoder'; valid choices: audio_base"),
        ("modality=speech", "valid choices: audio, text, vision"),
        ("objective.top_kk=3", "unknown key 'objective.top_kk'; valid keys under 'objective': channel_reduction"),
        ("objective.top_k=abc", "bad value for 'objective.top_k': 'abc' (str), expected int"),
        ("trainer.max_steps=many", "bad value for 'trainer.max_steps'"),
        ("+trainer.maxsteps=3", "unknown key 'trainer.maxsteps' (not a Lightning Trainer argument)"),
        ("encoder.hidden_size=big", "bad value for 'encoder.hidden_size'"),
        ("masking.kind=star", "masking"),
        ("foo=1", "unknown key 'foo'; valid keys: callbacks"),
        ("hydra/launcher=nope", "unknown option 'nope' for 'hydra/launcher'; valid choices: basic, submitit_slurm"),
    ],
)
def test_wrong_override_exits_with_one_line(override: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = sys.argv[:]
    try:
        with pytest.raises(SystemExit) as exc:
            main([override])
    finally:
        sys.argv = argv
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("d2v-pretrain: error: ") and expected in err, err
