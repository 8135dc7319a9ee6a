"""scripts/probe_curve.py runs a v1 and a 2.0 run and reads their probe-vs-time curves (tiny size,
no figures asserted: the real curves are measurements, not tests)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from scripts_loader import load_script

from d2v_train.eval.probe import CV_GRID


def test_probe_curve_runs_both_objectives_and_writes_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load_script("probe_curve")
    module.main(["vision", "--every", "2", "--out", str(tmp_path), "--", "trainer.max_steps=4", "data.batch_size=16"])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "curves.csv").open()))
    for name in ("v1", "2.0"):
        curve = [r for r in rows if r["objective"] == name]
        assert [int(r["update"]) for r in curve] == [2, 4]
        times = [float(r["train_s"]) for r in curve]
        assert 0 < times[0] < times[1]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # each run names its objective: a modality whose preset is 2.0 (text) still gets a v1 run
    for name, version in (("v1", 1), ("2.0", 2)):
        saved = (tmp_path / name / "config.yaml").read_text()
        assert ("version: 2" in saved) == (version == 2), name
    assert "2.0 reached" in printed or "2.0 never reached" in printed
    # by default every periodic probe chooses its C by cross-validation and logs it
    assert "linear probe (C by cross-validation at every probe)" in printed
    metrics = [r for r in csv.DictReader((tmp_path / "v1" / "metrics.csv").open()) if r.get("probe/linear_acc")]
    assert metrics and all(float(r["probe/linear_C"]) in CV_GRID for r in metrics)
    # each run's end-of-run comparison (C by cross-validation) is read from its final row
    assert re.search(r"v1 at the end, C by cross-validation: 0\.\d{3} \(random init 0\.\d{3}\)", printed)
    assert re.search(r"2\.0 at the end, C by cross-validation: 0\.\d{3} \(random init 0\.\d{3}\)", printed)
    # a finished run is read, not run again
    module.main(["vision", "--every", "2", "--out", str(tmp_path), "--", "trainer.max_steps=4", "data.batch_size=16"])
    assert "already holds a finished run" in capsys.readouterr().out


def test_time_to_reach() -> None:
    module = load_script("probe_curve")
    curve = [(50, 10.0, 0.5), (100, 20.0, 0.8), (150, 30.0, 0.9)]
    assert module.time_to_reach(curve, 0.8) == 20.0
    assert module.time_to_reach(curve, 0.95) is None
