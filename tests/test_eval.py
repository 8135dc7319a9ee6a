"""Evaluation machinery: probes, features from every source, the online probe and validation in a
real (tiny) run, the end-of-run line, run reports and ``d2v-eval`` end to end."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import d2v_train
import d2v_train.pretrain as pretrain
from d2v_train.cli import config_dir
from d2v_train.eval import embed, extract_features, few_label_indices, knn_accuracy, linear_probe, torch_linear_probe
from d2v_train.eval.probe import CV_GRID, _fold_ids, choose_C, parse_C, parse_labels_per_class, resolve_C, spread
from d2v_train.models import build_encoder

# a tiny version of the default run (digits), with probe and validation every 2 updates
TINY = [
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.batch_size=16",
    "encoder.hidden_size=32", "encoder.intermediate_size=64", "encoder.num_hidden_layers=2", "objective.top_k=2",
    "objective.ema.decay=0.9", "objective.ema.end_decay=0.99", "objective.ema.anneal_steps=10",
    "optim.warmup_steps=1", "optim.total_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
    "callbacks.probe.every_n_updates=2",
]  # fmt: skip


def compose_cfg(run_dir: Path, *overrides: str) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"run_dir={run_dir}", *TINY, *overrides])
    GlobalHydra.instance().clear()
    return cfg


def rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith(("_per_s", "/train_s"))} for r in csv.DictReader(f)]  # timings


def train_seconds(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [float(r["probe/train_s"]) for r in csv.DictReader(f) if r.get("probe/train_s")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    import contextlib
    import io

    import logging

    from d2v_train.logs import ConsoleFormatter

    run_dir = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # what the console shows (the entry point's logging config)
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger("d2v_train")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out):
            pretrain.train(compose_cfg(run_dir, "trainer.max_steps=4"))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return run_dir, out.getvalue()


# ------------------------------------------------------------------------------------------ probes


def clusters(n: int = 400, classes: int = 10, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_probes_score_separable_features_high_and_random_labels_at_chance() -> None:
    x, y = clusters()
    xv, yv = clusters(seed=1)
    # same centres: draw the val points around the training centres
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 16, generator=g) * 4
    xv = centres[yv] + torch.randn(len(yv), 16, generator=torch.Generator().manual_seed(5))
    assert linear_probe(x, y, xv, yv) > 0.95
    assert torch_linear_probe(x, y, xv, yv, 10) > 0.95
    assert knn_accuracy(x, y, xv, yv, 10) > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]
    for acc in (linear_probe(x, shuffled, xv, yv), torch_linear_probe(x, shuffled, xv, yv, 10), knn_accuracy(x, shuffled, xv, yv, 10)):
        assert acc < 0.3  # chance is 0.1


def test_cross_validated_C_is_chosen_on_training_folds_only() -> None:
    y = (torch.arange(103) % 4).numpy()
    folds = _fold_ids(y, 5)
    for f in range(5):  # stratified: every class in every fold, fold sizes within one per class
        assert set(y[folds == f]) == {0, 1, 2, 3}
    assert max(int((folds == f).sum()) for f in range(5)) - min(int((folds == f).sum()) for f in range(5)) <= 4
    seen: list[int] = []

    def score(xt: Any, yt: Any, xv: Any, yv: Any, c: float) -> float:
        seen.append(len(yt) + len(yv))
        return {0.01: 0.2, 0.1: 0.5, 1.0: 0.7, 10.0: 0.7, 100.0: 0.6}[c]

    assert choose_C(torch.zeros(103, 3), torch.as_tensor(y), score) == 1.0  # best, and the smaller C of a tie
    assert set(seen) == {103} and len(seen) == 5 * len(CV_GRID)
    assert choose_C(torch.zeros(4, 3), torch.arange(4), score) == 1.0  # one example per class: nothing to hold out
    assert parse_C("cv") == "cv" and parse_C("0.5") == 0.5
    for bad in ("auto", 0, -1, "inf"):
        with pytest.raises(ValueError, match="probe C"):
            parse_C(bad)


def test_cross_validation_raises_an_underfitting_probe_on_real_digits() -> None:
    """Raw digit pixels: at a fixed C=0.01 the probe under-fits; the C chosen by cross-validation on
    the training part does not."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.as_tensor(digits.data, dtype=torch.float32), torch.as_tensor(digits.target)
    xt, yt, xv, yv = x[:1200], y[:1200], x[1200:], y[1200:]
    fixed = linear_probe(xt, yt, xv, yv, C=0.01)
    chosen = resolve_C("cv", xt, yt)
    assert chosen >= 0.1 and linear_probe(xt, yt, xv, yv, C="cv") > fixed + 0.01


def test_few_label_subsets_are_balanced_and_seeded() -> None:
    y = torch.arange(300) % 10
    a = few_label_indices(y, 3, seed=0)
    assert len(a) == 30 and all(int((y[a] == c).sum()) == 3 for c in range(10))
    assert a == few_label_indices(y, 3, seed=0) and a != few_label_indices(y, 3, seed=1)
    assert few_label_indices(y, None, seed=0) == list(range(300))
    assert parse_labels_per_class("all") is None and parse_labels_per_class("10") == 10
    with pytest.raises(ValueError, match="labels_per_class"):
        parse_labels_per_class("many")
    s = spread([0.5, 0.7])
    assert s.n == 2 and abs(s.mean - 0.6) < 1e-9 and str(s).startswith("0.600 ± 0.14")


# ------------------------------------------------------------------------------------------ features


def test_poolings_and_padding_aware_mean() -> None:
    torch.manual_seed(0)
    vision = build_encoder("vision", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                          image_size=8, patch_size=2))  # fmt: skip
    pixels = torch.randn(3, 3, 8, 8)
    assert embed(vision, pixels, "mean").shape == (3, 16)
    assert embed(vision, pixels, "cls").shape == (3, 16)
    assert embed(vision, pixels, "topk", top_k=2).shape == (3, 16)
    assert embed(vision, pixels, "grid", grid=2).shape == (3, 64)
    with torch.no_grad():  # topk: each of the top blocks layer-normalised per token, averaged, CLS left out
        blocks = vision.eval()(pixels, output_hidden_states=True).hidden_states[-2:]
        normed = [F.layer_norm(b[:, 1:], (16,)) for b in blocks]
    assert torch.allclose(embed(vision, pixels, "topk", top_k=2), ((normed[0] + normed[1]) / 2).mean(1), atol=1e-5)
    vision.train()
    embed(vision, pixels)
    assert vision.training  # the caller's mode is restored
    text = build_encoder("text", dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=20, pad_token_id=1))  # fmt: skip
    with pytest.raises(ValueError, match="grid"):
        embed(text, torch.randint(3, 50, (1, 5)), "grid")
    ids = torch.randint(3, 50, (1, 6))
    alone = embed(text, ids)
    padded = torch.cat([ids, torch.ones(1, 4, dtype=torch.long)], 1)
    batch = {"inputs": torch.cat([padded, torch.randint(3, 50, (1, 10))]),
             "padding_mask": torch.tensor([[False] * 6 + [True] * 4, [False] * 10])}  # fmt: skip
    assert torch.allclose(embed(text, batch)[0], alone[0], atol=1e-5)  # padding does not count

    # token_idf: the rows of the token table for the example's ids, weighted, padding left out
    weights = torch.rand(50) + 0.5
    table = text.embeddings.token.weight.detach()
    expected = (table[ids[0]] * weights[ids[0], None]).sum(0) / weights[ids[0]].sum()
    assert torch.allclose(embed(text, batch, "token_idf", token_weights=weights)[0], expected, atol=1e-5)
    assert torch.allclose(embed(text, ids, "token_idf", token_weights=weights)[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"token_weights of shape \(50,\).*got none"):
        embed(text, ids, "token_idf")
    with pytest.raises(ValueError, match=r"token_weights of shape \(50,\).*got shape \(49,\)"):
        embed(text, ids, "token_idf", token_weights=weights[:49])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        embed(text, torch.tensor([[3, 50]]), "token_idf", token_weights=weights)
    with pytest.raises(ValueError, match="token table \\(text\\), not a vision encoder"):
        embed(vision, pixels, "token_idf", token_weights=weights)


def test_online_probe_with_token_idf_on_a_vision_run_turns_itself_off(caplog: pytest.LogCaptureFixture) -> None:
    """A monitor never stops a run: pooling=token_idf on images is a warning and no probe."""
    import logging
    from types import SimpleNamespace

    from d2v_train.data import DigitsDataModule
    from d2v_train.lightning.callbacks import OnlineProbe

    caplog.set_level(logging.WARNING, logger="d2v_train")
    vision = build_encoder("vision", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                          image_size=8, patch_size=2))  # fmt: skip
    probe = OnlineProbe(pooling="token_idf")
    trainer = SimpleNamespace(datamodule=DigitsDataModule(batch_size=64, image_size=8), is_global_zero=True)
    probe.setup(trainer, SimpleNamespace(student=vision), "fit")  # type: ignore[arg-type]
    assert probe.probe is None
    assert "online probe off: pooling='token_idf' reads a token table (text), not a vision encoder" in caplog.text


def test_token_idf_is_scikit_learns_smoothed_idf() -> None:
    """The weights pooling=token_idf reads: IDF per document (a token repeated in one document counts
    once), as TfidfVectorizer(smooth_idf=True) computes it; padding 0; unseen ids the largest weight."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from d2v_train.eval import token_idf

    docs = [[5, 6, 6, 7], [5, 8], [5, 6, 9, 9, 9], [1, 5, 1]]
    idf = token_idf([{"inputs": torch.tensor(d)} for d in docs], vocab_size=12, pad_token_id=1)
    vec = TfidfVectorizer(token_pattern=r"\S+").fit([" ".join(map(str, d)) for d in docs])
    for token, column in vec.vocabulary_.items():
        if token != "1":
            assert idf[int(token)].item() == pytest.approx(vec.idf_[column], rel=1e-6), token
    assert idf[1].item() == 0.0
    assert idf[11].item() == pytest.approx(float(torch.log(torch.tensor(5.0))) + 1.0, rel=1e-6)  # never seen
    assert idf[5].item() == pytest.approx(1.0)  # in every document
    with pytest.raises(ValueError, match=r"document 1 has token ids in \[0, 12\], outside the vocabulary \[0, 12\)"):
        token_idf([{"inputs": torch.tensor([2])}, {"inputs": torch.tensor([0, 12])}], vocab_size=12)
    with pytest.raises(ValueError, match="no documents"):
        token_idf([], vocab_size=12)


def test_load_encoder_reads_every_kind_of_source(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    from d2v_train.interop import save_encoder, save_transformers

    run_dir, _ = tiny_run
    pixels = torch.randn(2, 3, 32, 32)
    reference = d2v_train.load_encoder(run_dir / "checkpoints" / "last.ckpt")  # a .ckpt
    expected = reference(pixels).last_hidden_state
    from_run_dir = d2v_train.load_encoder(run_dir)  # a run dir (its checkpoints/last.ckpt)
    save_encoder(reference, tmp_path / "export")
    save_transformers(reference, tmp_path / "hf")
    for enc in (from_run_dir, d2v_train.load_encoder(tmp_path / "export"), d2v_train.load_encoder(tmp_path / "hf")):
        assert not enc.training
        torch.testing.assert_close(enc(pixels).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    teacher = d2v_train.load_encoder(run_dir, weights="teacher")
    assert not torch.allclose(teacher(pixels).last_hidden_state, expected)  # the EMA copy differs
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt"):
        d2v_train.load_encoder(tmp_path)  # an empty directory: one clear line


# ------------------------------------------------------------------------------------------ a run


def test_online_probe_validation_and_end_of_run_line(tiny_run: tuple[Path, str]) -> None:
    run_dir, out = tiny_run
    table = rows(run_dir)
    probes = [r for r in table if r.get("probe/linear_acc")]
    assert [int(r["step"]) for r in probes] == [1, 3, 4]  # the rows of updates 2 and 4, then the end-of-run row
    assert all(0.0 <= float(r["probe/knn_acc"]) <= 1.0 for r in probes)
    assert probes[-1]["probe/random_init_linear_acc"] and probes[-1]["probe/random_init_knn_acc"]
    assert not probes[0]["probe/random_init_linear_acc"]
    # the end-of-run comparison: d2v-eval's probe, C cross-validated for each encoder and reported
    assert float(probes[-1]["probe/final_linear_C"]) in CV_GRID and float(probes[-1]["probe/random_init_linear_C"]) in CV_GRID
    assert 0.0 <= float(probes[-1]["probe/final_linear_acc"]) <= 1.0 and not probes[0]["probe/final_linear_acc"]
    assert "cross-validation" in out
    clock = train_seconds(run_dir)  # training time at each probe, for accuracy-against-time curves
    assert len(clock) == 3 and 0 < clock[0] <= clock[1] <= clock[2]
    vals = [r for r in table if r.get("val/loss")]
    assert len(vals) == 2 and all(float(r["val/loss"]) > 0 for r in vals)
    train_rows = [r for r in table if r.get("train/loss")]
    assert [int(r["step"]) for r in train_rows] == list(range(4))
    assert "same architecture at random init" in out and "after 4 updates" in out
    final = probes[-1]
    # ... and the baseline on the same task: the raw pixels, probed the same way (nearly separable)
    assert float(final["probe/baseline_linear_acc"]) > 0.9 and float(final["probe/baseline_linear_C"]) in CV_GRID
    assert f"baseline (raw inputs) with the same probe {float(final['probe/baseline_linear_acc']):.3f}" in out
    if float(final["probe/final_linear_acc"]) < float(final["probe/random_init_linear_acc"]) + 0.01:
        assert "warning: pretraining did not beat" in out.lower()
    else:
        assert "pretraining did not beat" not in out


def test_report_from_the_run(tiny_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from d2v_train.eval.report import main

    run_dir, out = tiny_run
    report = run_dir / "report"  # written by d2v-pretrain itself
    assert "d2v-pretrain: report" in out
    for name in ("loss", "lr", "ema_decay", "std", "mask_frac", "throughput", "probe"):
        png = report / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG", name
    from PIL import Image

    with Image.open(report / "probe.png") as probe_plot:  # the references are levels over the curves: one panel
        assert probe_plot.height < 400, probe_plot.size
    summary = (report / "summary.md").read_text()
    assert "updates: 4" in summary and "wall time" in summary and "val/loss" in summary
    assert "same architecture at random init" in summary  # the end-of-run line is kept
    # a teacher at decay 0.9 moved: no such warning; the default 0.9998 over 4 updates would warn
    assert "teacher barely moved" not in summary
    # a multirun directory: one comparison across jobs
    for job in ("0", "1"):
        (tmp_path / job).mkdir()
        shutil.copy(run_dir / "metrics.csv", tmp_path / job / "metrics.csv")
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report" / "comparison.png").stat().st_size > 1000
    assert main([str(tmp_path / "nothing")]) == 2
    assert "d2v-report: error:" in capsys.readouterr().err


def test_report_warns_on_a_teacher_that_barely_moved() -> None:
    from d2v_train.eval.report import run_warnings

    series = {"train/ema_decay": [(i, 0.9998) for i in range(200)], "train/target_std": [(199, 0.8)]}
    assert any("barely moved" in w for w in run_warnings(series))
    series = {"train/ema_decay": [(i, 0.99) for i in range(200)], "train/target_std": [(0, 0.8), (199, 0.01)],
              "train/pred_std": [(0, 0.003), (199, 0.004)]}  # fmt: skip
    warns = run_warnings(series)
    assert not any("barely moved" in w for w in warns)
    assert [w for w in warns if "collapse" in w] == ["collapse: the target std fell to 0.01 (< 0.1; it was 0.8)"]


def test_probe_and_validation_leave_the_run_unchanged_and_resume_exactly(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    """Same weights with the probe and validation off; 2 updates then the 4-update command in the
    same run dir logs what the straight run logged (probe and val rows included)."""
    from d2v_train.lightning.checkpointing import load_checkpoint_safely

    run_dir, _ = tiny_run
    pretrain.train(compose_cfg(tmp_path / "plain", "trainer.max_steps=4", "callbacks.probe=null",
                               "trainer.limit_val_batches=0", "report=false"))  # fmt: skip
    a = load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint_safely(tmp_path / "plain" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    pretrain.train(compose_cfg(tmp_path / "resumed", "trainer.max_steps=2", "report=false"))
    first = train_seconds(tmp_path / "resumed")
    pretrain.train(compose_cfg(tmp_path / "resumed", "trainer.max_steps=4", "report=false"))
    assert rows(tmp_path / "resumed") == rows(run_dir)
    clock = train_seconds(tmp_path / "resumed")  # the training clock carries over the resume
    assert clock[0] == first[0] and clock[-1] > first[-1]


# ------------------------------------------------------------------------------------------ d2v-eval


def test_d2v_eval_end_to_end(tiny_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from d2v_train.eval.app import main

    run_dir, _ = tiny_run
    out = tmp_path / "eval"
    main([f"checkpoint={run_dir}", f"hydra.run.dir={out}", "labels_per_class=[1,all]", "seeds=2",
          "finetune.max_steps=2", "finetune.batch_size=16", "batch_size=512"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| encoder | method | 1 labels/class | all labels |" in printed
    results = list(csv.DictReader((out / "results.csv").open()))
    kinds = {(r["encoder"], r["method"]) for r in results}
    assert kinds == {(e, m) for e in ("pretrained", "random init") for m in ("linear", "knn", "finetune")} | {
        ("raw inputs", "linear"), ("raw inputs", "knn")}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in results)
    # 1 label/class: 2 seeds; all labels: one row; fine-tune: the first seed only
    assert sum(r["method"] == "linear" and r["encoder"] == "pretrained" for r in results) == 3
    assert sum(r["method"] == "finetune" and r["encoder"] == "pretrained" for r in results) == 2
    assert all(float(r["C"]) in CV_GRID for r in results if r["method"] == "linear")  # probe.C=cv: chosen per row
    raw_all = next(float(r["accuracy"]) for r in results if r["encoder"] == "raw inputs" and r["method"] == "linear" and r["labels_per_class"] == "all")
    assert raw_all > 0.9  # raw digits are nearly linearly separable: the pipeline keeps labels aligned
    assert "±" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # token_idf reads a token table: a one-line error for a vision run
        main([f"checkpoint={run_dir}", f"hydra.run.dir={tmp_path / 'idf'}", "pooling=token_idf"])
    assert "pooling='token_idf' reads a token table (text), not a vision encoder" in capsys.readouterr().err


def test_d2v_eval_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from d2v_train.eval.app import main

    with pytest.raises(SystemExit):
        main([f"checkpoint={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'o'}"])
    assert "checkpoint=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"checkpoint={tmp_path}", "labels_per_class=[few]"])
    assert "labels_per_class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"checkpoint={tmp_path}", "probe.C=auto"])
    assert "probe.C" in capsys.readouterr().err


def test_end_of_run_probe_reuses_the_features_of_a_probe_at_the_same_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last update is often also a periodic probe's: the end-of-run comparison then fits on the
    features that probe extracted instead of running the encoder over the probe sets again."""
    from types import SimpleNamespace

    from d2v_train.data import DigitsDataModule
    from d2v_train.lightning.callbacks import OnlineProbe

    callback = OnlineProbe(every_n_updates=2, final_C=1.0)
    callback.probe = DigitsDataModule(batch_size=64, image_size=8).probe_sets()
    encoder = build_encoder("vision", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                           image_size=8, patch_size=2, num_channels=3)).eval()  # fmt: skip
    module = SimpleNamespace(student=encoder)
    extracted: list[int] = []
    features = OnlineProbe._features
    monkeypatch.setattr(OnlineProbe, "_features", lambda self, enc: extracted.append(1) or features(self, enc))
    periodic = callback._run(module, 4)
    final = callback._run(module, 4, final=True)
    assert len(extracted) == 1
    assert final["linear_acc"] == periodic["linear_acc"] and 0.0 <= final["final_linear_acc"] <= 1.0
    callback._run(module, 5, final=True)  # another update: the encoder may have changed
    assert len(extracted) == 2


def test_periodic_probe_with_cross_validated_C() -> None:
    """``callbacks.probe.C=cv``: every periodic probe picks its C on the labelled training set
    (torch fits, folds of the training examples only) and logs it. On many weak, noisy features a
    strongly regularised probe generalises best, so the chosen C beats a fixed weak one."""
    from types import SimpleNamespace

    from d2v_train.eval.features import Features
    from d2v_train.lightning.callbacks import OnlineProbe

    g = torch.Generator().manual_seed(0)

    def noisy(n: int) -> Features:
        labels = torch.arange(n) % 2
        return Features(torch.randn(n, 200, generator=g) + 0.06 * (2 * labels[:, None] - 1), labels)

    train, val = noisy(40), noisy(400)
    callback = OnlineProbe(C="cv")
    callback.probe = SimpleNamespace(num_classes=2)
    out = callback.evaluate(None, features=(train, val))
    fit = lambda xt, yt, xv, yv, c: torch_linear_probe(torch.as_tensor(xt), torch.as_tensor(yt), torch.as_tensor(xv), torch.as_tensor(yv), 2, C=c)  # noqa: E731
    assert out["linear_C"] == choose_C(train.features, train.labels, fit) == min(CV_GRID)
    assert out["linear_acc"] == torch_linear_probe(train.features, train.labels, val.features, val.labels, 2, C=out["linear_C"])
    assert out["linear_acc"] > torch_linear_probe(train.features, train.labels, val.features, val.labels, 2, C=100.0)
    fixed = OnlineProbe(C=1.0)
    fixed.probe = callback.probe
    assert "linear_C" not in fixed.evaluate(None, features=(train, val))
    with pytest.raises(ValueError, match="probe C"):
        OnlineProbe(C="auto")


def test_online_probe_on_padded_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Any ProbeSets plugs in: variable-length token sequences (padding) through a text run."""
    import logging

    from torch.utils.data import Dataset

    caplog.set_level(logging.INFO, logger="d2v_train")

    from d2v_train.data import DocstringsDataModule
    from d2v_train.data.common import ProbeSets

    class Sequences(Dataset):
        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.items = []
            for i in range(n):
                length = int(torch.randint(4, 20, (1,), generator=g))
                label = i % 2  # a sequence of one token (which one is the class), of any length
                ids = torch.full((length,), 10 + 100 * label)
                self.items.append({"inputs": ids, "labels": label})

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return self.items[i]

    def probe_sets(self: Any) -> ProbeSets:
        self.setup("fit")  # as the real one: the collator needs the tokenizer's pad id
        return ProbeSets("halves", Sequences(60, 0), Sequences(20, 1), 2, self.collate_fn)

    monkeypatch.setattr(DocstringsDataModule, "probe_sets", probe_sets)
    cfg = compose_cfg(tmp_path / "run", "modality=text", f"data.cache_dir={tmp_path / 'cache'}", "data.max_files=2",
                      "data.vocab_size=512", "data.max_length=32", "encoder.max_position_embeddings=34",
                      "trainer.max_steps=2", "report=false")  # fmt: skip
    pretrain.train(cfg)
    out = caplog.text
    assert "probe on halves" in out and "same architecture at random init" in out
    probes = [r for r in rows(tmp_path / "run") if r.get("probe/linear_acc")]
    assert probes and float(probes[-1]["probe/linear_acc"]) > 0.9  # separable whatever the padding

    # d2v-eval on the text run, no data=: the run's own data module and tokenizer, and TF-IDF as the baseline
    from d2v_train.eval.app import main

    main([f"checkpoint={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval'}", "labels_per_class=[all]", "seeds=1",
          "finetune.enabled=false"])  # fmt: skip
    assert "probe data: data=docstrings as the run configured it" in (tmp_path / "eval" / "eval.log").read_text()
    results = list(csv.DictReader((tmp_path / "eval" / "results.csv").open()))
    assert {r["encoder"] for r in results} == {"TF-IDF", "random init", "pretrained"}
    assert all(float(r["accuracy"]) == 1.0 for r in results if r["encoder"] == "TF-IDF")  # one token per class

    # the online probe with pooling=token_idf: IDF weights from the run's training text
    import d2v_train.eval.features as features_module

    corpora: list[int] = []
    real_token_idf = features_module.token_idf

    def counting_token_idf(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        corpora.append(len(data))
        return real_token_idf(data, *args, **kwargs)

    monkeypatch.setattr(features_module, "token_idf", counting_token_idf)
    pretrain.train(compose_cfg(tmp_path / "run_idf", "modality=text", f"data.cache_dir={tmp_path / 'cache'}", "data.max_files=2",
                               "data.vocab_size=512", "data.max_length=32", "encoder.max_position_embeddings=34",
                               "trainer.max_steps=2", "report=false", "callbacks.probe.pooling=token_idf",
                               "objective.pooled_weights=uniform"))  # fmt: skip  (the objective's own IDF is not counted here)
    assert len(corpora) == 1 and corpora[0] > 1000, corpora  # once, over the run's training blocks, not the 60 probe texts
    assert float([r for r in rows(tmp_path / "run_idf") if r.get("probe/final_linear_acc")][-1]["probe/final_linear_acc"]) == 1.0

    # pooling=token_idf: the token table's rows, weighted by IDF over the run's training text
    main([f"checkpoint={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval_idf'}", "labels_per_class=[all]", "seeds=1",
          "finetune.enabled=false", "pooling=token_idf"])  # fmt: skip
    assert "IDF weights from" in (tmp_path / "eval_idf" / "eval.log").read_text()
    assert "the data's training text" in (tmp_path / "eval_idf" / "eval.log").read_text()
    results = list(csv.DictReader((tmp_path / "eval_idf" / "results.csv").open()))
    assert all(float(r["accuracy"]) == 1.0 for r in results if r["method"] == "linear")  # each class is one token's row


def test_raw_baselines_fit_each_kind_of_input() -> None:
    """Pixels flattened, TF-IDF over token ids, log-mel of waveforms: each separates a task its
    inputs make easy, so a baseline row is a real baseline, not a placeholder."""
    from d2v_train.data import DigitsDataModule
    from d2v_train.data.collate import collate_audio
    from d2v_train.eval.baselines import LOGMEL, PIXELS, TFIDF, raw_baseline

    def accuracy(baseline: Any) -> float:
        name, tr, va = baseline
        return linear_probe(tr.features, tr.labels, va.features, va.labels, C=1.0)

    probe = DigitsDataModule(batch_size=64, image_size=8).probe_sets()
    pixels = raw_baseline(probe.train, probe.val, probe.collate_fn)
    assert pixels is not None and pixels[0] == PIXELS and pixels[1].features.shape[1] == 3 * 8 * 8
    assert accuracy(pixels) > 0.9

    g = torch.Generator().manual_seed(0)

    def texts(n: int) -> list[dict[str, Any]]:  # class c: BOS, words drawn from its own 5 ids and shared ones, EOS
        out = []
        for i in range(n):
            c = i % 3
            ids = torch.cat([torch.randint(10 + 5 * c, 15 + 5 * c, (4,), generator=g), torch.randint(40, 60, (8,), generator=g)])
            out.append({"inputs": torch.cat([torch.tensor([0]), ids[torch.randperm(12, generator=g)], torch.tensor([2])]), "labels": c})
        return out

    tfidf = raw_baseline(texts(60), texts(30), collate_audio)  # collate unused: texts are read item by item
    assert tfidf is not None and tfidf[0] == TFIDF and accuracy(tfidf) == 1.0

    def tones(n: int) -> list[dict[str, Any]]:  # class c: a tone at 300 or 2,000 Hz, random length, noise
        out = []
        for i in range(n):
            c, length = i % 2, int(torch.randint(4000, 12000, (1,), generator=g))
            t = torch.arange(length) / 16000
            wave = torch.sin(2 * torch.pi * (300 if c == 0 else 2000) * t) + 0.3 * torch.randn(length, generator=g)
            out.append({"inputs": wave, "labels": c})
        return out

    logmel = raw_baseline(tones(20), tones(10), collate_audio)
    assert logmel is not None and logmel[0] == LOGMEL and logmel[1].features.shape == (20, 24 * 40)
    assert accuracy(logmel) == 1.0
    assert raw_baseline([], tones(2), collate_audio) is None


def test_baseline_probe_is_cached_per_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-of-run baseline figure depends only on the task: measured once, then read back."""
    import d2v_train.eval.probe as probe_module
    from d2v_train.data import DigitsDataModule
    from d2v_train.eval.baselines import PIXELS, baseline_probe

    monkeypatch.setenv("D2V_CACHE", str(tmp_path))
    probe = DigitsDataModule(batch_size=64, image_size=8).probe_sets()
    name, accuracy, C = baseline_probe(probe.train, probe.val, probe.collate_fn, 1.0)
    assert name == PIXELS and accuracy > 0.9 and C == 1.0
    assert len(list((tmp_path / "baselines").glob("*.json"))) == 1

    def no_fit(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("the cached figure should have been used")

    monkeypatch.setattr(probe_module, "linear_probe", no_fit)
    assert baseline_probe(probe.train, probe.val, probe.collate_fn, 1.0) == (name, accuracy, C)
    with pytest.raises(AssertionError, match="cached"):  # another C is another measurement
        baseline_probe(probe.train, probe.val, probe.collate_fn, 0.1)


def test_d2v_eval_picks_the_probe_data_of_the_checkpoint(tmp_path: Path) -> None:
    """No data=: a run dir on embedded data gives its own data section (its split and settings),
    anything else the modality's embedded task; data= always wins."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from d2v_train.eval.app import _data_config

    from d2v_train.interop.sources import LoadedModel

    def source(path: Path, modality: str) -> Any:  # what load_source returns, without loading weights
        return SimpleNamespace(folder=LoadedModel(torch.nn.Identity(), "pretraining", path).folder,
                               encoder=SimpleNamespace(modality=modality))  # fmt: skip

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save({"data": {"_target_": "d2v_train.data.DocstringsDataModule", "path": None, "vocab_size": 512}}, run / "config.yaml")
    for given in (run, run / "checkpoints" / "last.ckpt"):
        cfg = OmegaConf.create({})
        assert _data_config(cfg, source(given, "text")) == "data=docstrings as the run configured it"
        assert cfg.data.vocab_size == 512
    cfg = OmegaConf.create({})
    assert _data_config(cfg, source(run, "audio")) == "data=speech"  # the run's data is not audio's task
    assert cfg.data._target_ == "d2v_train.data.SpeechDataModule"
    OmegaConf.save({"data": {"_target_": "d2v_train.data.DocstringsDataModule", "path": "/my/corpus"}}, run / "config.yaml")
    cfg = OmegaConf.create({})
    assert _data_config(cfg, source(run, "text")) == "data=docstrings"  # a user's corpus has no labelled task
    assert cfg.data.path is None
    cfg = OmegaConf.create({})
    assert _data_config(cfg, source(tmp_path / "export", "vision")) == "data=digits"
    cfg = OmegaConf.create({"data": {"_target_": "x.Y"}})
    assert _data_config(cfg, source(run, "text")) == "data= as given" and cfg.data._target_ == "x.Y"


def test_lsa_reference_learns_word_groups_from_the_unlabelled_corpus() -> None:
    """Each class's probe training texts and validation texts use disjoint halves of its words, so
    TF-IDF fitted on the training texts alone is at chance on validation; LSA fitted on an unlabelled
    corpus where the halves co-occur maps both halves to the same direction and separates the classes."""
    from d2v_train.eval.baselines import lsa_features, tfidf_features

    g = torch.Generator().manual_seed(0)
    bos, eos, sep = 0, 2, 3

    def words(c: int, half: Optional[int]) -> torch.Tensor:  # class c owns ids 10 + 10c .. 19 + 10c
        lo = 10 + 10 * c + (5 * half if half is not None else 0)
        return torch.randint(lo, lo + (5 if half is not None else 10), (8,), generator=g)

    def texts(n: int, half: int) -> list[dict[str, Any]]:
        return [{"inputs": torch.cat([torch.tensor([bos]), words(i % 3, half), torch.tensor([eos])]), "labels": i % 3} for i in range(n)]

    corpus = [{"inputs": torch.cat([torch.tensor([sep]), words(i % 3, None), torch.tensor([sep])])} for i in range(90)]
    train, val = texts(30, 0), texts(30, 1)
    y_train, y_val = torch.tensor([t["labels"] for t in train]), torch.tensor([t["labels"] for t in val])
    xt, xv = tfidf_features(train, val)
    assert linear_probe(xt, y_train, xv, y_val, C=1.0) < 0.6
    lt, lv = lsa_features(corpus, train, val, 3, skip_ids=[sep])
    assert lt.shape == (30, 3) and lv.shape == (30, 3)
    assert linear_probe(lt, y_train, lv, y_val, C=1.0) == 1.0
    with pytest.raises(ValueError, match=r"dims must lie in \[1, \d+\) .* got 100000"):
        lsa_features(corpus, train, val, 100000)
    with pytest.raises(ValueError, match="LSA: the corpus gives no vocabulary to fit"):
        lsa_features([], train, val, 3)
