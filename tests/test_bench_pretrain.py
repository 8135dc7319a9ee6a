"""scripts/bench_pretrain.py runs end to end at tiny size (a smoke test: no timing assertions)."""

from __future__ import annotations

import math

import pytest
from scripts_loader import load_script

pytest.importorskip("transformers")


def test_bench_pretrain_runs_every_variant_at_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_pretrain")
    rows = bench.main(["--sizes", "tiny", "--steps", "1", "--batch", "2", "--seconds", "0.5", "--length", "32",
                       "--clones", "3"])
    assert len(rows) == 12
    for modality in ("audio", "text", "vision"):
        mine = {r["variant"]: r for r in rows if r["modality"] == modality}
        assert set(mine) == {"ours v1", "ours 2.0 M=1", "ours 2.0 M=3", "naive v1 (transformers)"}
        for r in mine.values():
            assert r["step_s"] > 0 and r["flops_s"] > 0 and math.isfinite(r["frac_peak"])
        m3, m1 = mine["ours 2.0 M=3"], mine["ours 2.0 M=1"]
        assert m3["pairs_s"] == pytest.approx(3 * m3["samples_s"]) and m1["pairs_s"] == pytest.approx(m1["samples_s"])
        assert m1["tokens_s"] * m1["step_s"] < mine["ours v1"]["tokens_s"] * mine["ours v1"]["step_s"]  # kept only
    out = capsys.readouterr().out
    assert "matmul peak" in out and out.count("2.0 (2.0 M=3) / v1 pairs/s") == 3 and "matmul peak so far" in out


def test_bench_pretrain_profiles_one_update_per_variant(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_pretrain")
    bench.main(["--sizes", "tiny", "--modalities", "text", "--steps", "1", "--batch", "2", "--length", "32",
                "--clones", "2", "--no-naive", "--profile", str(tmp_path)])
    tables = sorted(p.name for p in tmp_path.glob("*.txt"))
    assert tables == ["text_tiny_ours_2.0_M_1.txt", "text_tiny_ours_2.0_M_2.txt", "text_tiny_ours_v1.txt"]
    for name in tables:
        assert "aten::" in (tmp_path / name).read_text()  # the ops the update ran, not an empty table
        assert (tmp_path / name.replace(".txt", ".trace.json")).stat().st_size > 0
    assert capsys.readouterr().out.count("  profile text-tiny-") == 3
