"""Tests that fail when the data2vec objective inside ``Data2VecPretraining`` is wired wrong.

The unit tests of ``build_targets``, the EMA rule and the loss check single functions; these check
what reaches them from the module: which input the teacher reads, which block tensors (and in which
order) become targets, and whether training makes the student predict masked content better than
predictors that never see the input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import d2v_train.lightning.pretrain as pretrain_module
from d2v_train.lightning.callbacks import CollapseMonitor, TrainingCollapsedError
from d2v_train.objective.targets import normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared helpers, whatever pytest's import mode
from test_pretrain import fixed_batch, module_for  # noqa: E402

MODALITIES = ["vision", "audio", "text"]


def token_padding(model: Any, batch: dict[str, Any]) -> torch.Tensor | None:
    """The padding mask of the tokens the targets are built over (frames for audio)."""
    if model.modality == "vision":
        return None
    if model.modality == "text":
        return batch["padding_mask"]
    _, pad = model.student.embed(batch["inputs"], batch["padding_mask"])
    return pad


class Captured:
    """Spies on one ``compute_objective`` call: the tensor every teacher block hands out as its
    target (forward hooks, in execution order), the full targets and the (pred, target) the loss sees."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.block_targets: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.loss_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in model.teacher.model.transformer.blocks:
            block.register_forward_hook(lambda mod, args, out: self.block_targets.append(out[1]))
        build, loss = pretrain_module.build_targets, pretrain_module.masked_regression_loss

        def build_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = build(*args, **kwargs)
            self.targets.append(out)
            return out

        def loss_spy(pred: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> Any:
            self.loss_inputs.append((pred.detach(), target.detach()))
            return loss(pred, target, **kwargs)

        monkeypatch.setattr(pretrain_module, "build_targets", build_spy)
        monkeypatch.setattr(pretrain_module, "masked_regression_loss", loss_spy)


# ------------------------------------------------------------------------------------ teacher input


def test_vision_teacher_reads_the_clean_image_and_the_student_the_masked_one() -> None:
    model = module_for("vision")
    batch = fixed_batch("vision")
    seen: dict[str, Any] = {}
    t_fwd, s_ctx = model.teacher.model.forward, model.student.contextualize

    def teacher_spy(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen["teacher"] = (inputs.clone(), args, kwargs)
        return t_fwd(inputs, *args, **kwargs)

    def student_spy(tokens: torch.Tensor, padding_mask: Any = None, mask: Any = None, **kwargs: Any) -> Any:
        seen["student"] = (tokens.detach().clone(), mask)
        return s_ctx(tokens, padding_mask, mask=mask, **kwargs)

    model.teacher.model.forward = teacher_spy  # type: ignore[method-assign]
    model.student.contextualize = student_spy  # type: ignore[method-assign]
    out = model.compute_objective(batch["inputs"], None, torch.Generator().manual_seed(0))
    image, args, kwargs = seen["teacher"]
    assert torch.equal(image, batch["inputs"])  # the clean pixels, not masked or zeroed ones
    assert kwargs.get("mask") is None and not any(torch.is_tensor(a) and a.dtype == torch.bool for a in args)
    tokens, mask = seen["student"]
    assert torch.equal(mask, out["mask"]) and mask.any() and (~mask).any()
    clean_tokens, _ = model.student.embed(batch["inputs"])
    torch.testing.assert_close(tokens, clean_tokens.detach())  # the mask token goes in inside contextualize


def test_audio_teacher_reads_projected_features_before_input_dropout() -> None:
    """Reference: ``pre_encoder_features`` are cloned before ``dropout_input``; with the dropout
    raised the teacher's tokens are the undropped projection, the student's are dropped out."""
    model = module_for("audio")
    model.student.feature_projection.dropout.p = 0.5
    model.train()
    batch = fixed_batch("audio")
    seen: dict[str, torch.Tensor] = {}
    t_ctx, s_ctx = model.teacher.model.contextualize, model.student.contextualize
    model.teacher.model.contextualize = lambda tokens, *a, **k: (seen.__setitem__("t", tokens), t_ctx(tokens, *a, **k))[1]  # type: ignore[method-assign]
    model.student.contextualize = lambda tokens, *a, **k: (seen.__setitem__("s", tokens), s_ctx(tokens, *a, **k))[1]  # type: ignore[method-assign]
    model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.student.feature_extractor(batch["inputs"]).transpose(1, 2)
        clean = model.student.feature_projection(features, dropout=False)
    torch.testing.assert_close(seen["t"], clean)
    dropped = seen["s"] == 0
    assert 0.3 < dropped.float().mean() < 0.7  # the student's copy went through the dropout
    kept = ~dropped
    torch.testing.assert_close(seen["s"][kept], (clean * 2.0)[kept])  # inverted dropout scaling


@pytest.mark.parametrize("modality", MODALITIES)
def test_exactly_the_top_k_block_outputs_in_order_make_the_targets(modality: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets = final_norm(mean of layer_norm(top-K teacher block tensors)), from the blocks'
    own outputs (forward hooks), at the masked positions. Reversing or shifting the layer list
    before ``build_targets`` (bottom-K, or top-K of a reordered list) changes the result."""
    model = module_for(modality, top_k=2)
    obj = model.objective
    batch = fixed_batch(modality)
    cap = Captured(model, monkeypatch)
    out = model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))
    blocks = cap.block_targets
    assert len(blocks) == model.student.config.num_hidden_layers == 3  # each teacher block ran once
    pad = token_padding(model, batch)
    top = [y[:, model.num_prefix :] for y in blocks[-obj.top_k :]]
    expected = sum(normalize(y, obj.layer_norm, pad) for y in top) / obj.top_k
    expected = normalize(expected, obj.final_norm, pad)
    (pred, target), = cap.loss_inputs
    torch.testing.assert_close(target, expected[out["mask"]], rtol=1e-5, atol=1e-5)
    # the test can tell: bottom-K, or the top-K of the reversed list, give other targets
    bottom = [y[:, model.num_prefix :] for y in blocks[: obj.top_k]]
    wrong = normalize(sum(normalize(y, obj.layer_norm, pad) for y in bottom) / obj.top_k, obj.final_norm, pad)
    assert (wrong[out["mask"]] - target).abs().max() > 1e-3
    assert pred.shape == target.shape


# ------------------------------------------------------------------------------------ it learns


def batches(modality: str, seed: int, count: int) -> list[dict[str, Any]]:
    """Structured batches like ``fixed_batch`` (same family, other draws)."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(1000 * seed + i)
        if modality == "vision":  # smooth colour gradients: a masked patch lies between visible ones
            coarse = torch.randn(8, 3, 2, 2, generator=g)
            image = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=True)
            out.append({"inputs": image, "padding_mask": None})
        else:  # chirps: each frame's pitch lies between its neighbours', at a rate drawn per clip
            t = torch.arange(16000) / 16000
            f0 = 300 + 1200 * torch.rand(8, 1, generator=g)
            rate = 1200 * (torch.rand(8, 1, generator=g) - 0.5)
            out.append({"inputs": torch.sin(2 * torch.pi * (f0 * t + 0.5 * rate * t * t)), "padding_mask": None})
    return out


def blinded(model: Any) -> Callable[[], None]:
    """Make the student see zeros instead of its input (the teacher keeps the clean input); returns undo."""
    orig = model.student.embed_with_clean

    def zero_student(inputs: torch.Tensor, padding_mask: Any = None) -> Any:
        tokens, clean, pad = orig(inputs, padding_mask)
        return torch.zeros_like(tokens), clean, pad

    model.student.embed_with_clean = zero_student  # type: ignore[method-assign]
    return lambda: delattr(model.student, "embed_with_clean")


def held_out_errors(model: Any, held: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Mean squared error per target element at the masked positions of ``held``: the student's,
    the zero predictor's, the per-position mean's (an oracle: the mean target of each position over
    the held-out batch itself) and the same student's when it sees zeros instead of its input."""
    model.eval()
    errs: dict[str, list[float]] = {"student": [], "zero": [], "position_mean": [], "blinded": []}
    stds = []
    with monkeypatch.context() as m, torch.no_grad():
        cap = Captured(model, m)
        for i, batch in enumerate(held):
            for who in ("student", "blinded"):
                undo = blinded(model) if who == "blinded" else (lambda: None)
                gen = torch.Generator().manual_seed(i)
                out = model.compute_objective(batch["inputs"], batch["padding_mask"], gen)
                undo()
                pred, target = cap.loss_inputs[-1]
                errs[who].append(float(((pred - target) ** 2).mean()))
            full, mask = cap.targets[-1], out["mask"]
            errs["zero"].append(float((target**2).mean()))
            mean = full.mean(0, keepdim=True).expand_as(full)[mask]
            errs["position_mean"].append(float(((mean - target) ** 2).mean()))
            stds.append(float(out["target_std"]))
    res = {k: sum(v) / len(v) for k, v in errs.items()}
    res["target_std"] = sum(stds) / len(stds)
    return res


@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_trained_student_beats_input_blind_predictors_on_held_out_batches(modality: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After training on other batches, the student's masked predictions beat the zero predictor,
    the per-position mean of the held-out targets and the same student fed zeros, each by a clear
    margin, and the targets keep their spread (no collapse). A student that never sees its input
    (e.g. zeroed by a bug) cannot beat the position mean."""
    model = module_for(modality)
    model.optim.lr = 5e-3  # (1e-2 collapses the audio targets: the position mean then wins)
    train, held = batches(modality, 1, 8), batches(modality, 2, 2)
    start = held_out_errors(model, held, monkeypatch)
    model.train()
    steps = {"vision": 150, "audio": 300}[modality]
    cycle = [train[i % len(train)] for i in range(steps)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(cycle), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(cycle, batch_size=None, collate_fn=lambda b: b))
    end = held_out_errors(model, held, monkeypatch)
    for baseline in ("zero", "position_mean", "blinded"):  # measured: 0.60 / 0.63 of the best baseline
        assert end["student"] < 0.8 * end[baseline], (baseline, end)
    assert end["target_std"] > 0.5 * start["target_std"], (start, end)


# ------------------------------------------------------------------------------------ collapse monitor


def fake_step(step: int, target_std: float, pred_std: float, **objective: Any) -> tuple[Any, Any]:
    obj = SimpleNamespace(**{"min_target_std": 0.1, "min_pred_std": 0.01, "collapse_check_after": 5, **objective})
    module = SimpleNamespace(objective=obj, last_stats={"target_std": torch.tensor(target_std), "pred_std": torch.tensor(pred_std)})
    return SimpleNamespace(global_step=step), module


def test_collapse_monitor_thresholds_step_gate_and_message() -> None:
    mon = CollapseMonitor()
    mon.on_train_batch_end(*fake_step(4, 0.0, 0.0), None, None, 0)  # before the gate: no check
    mon.on_train_batch_end(*fake_step(5, 0.11, 0.011), None, None, 0)  # above the thresholds: fine
    with pytest.raises(TrainingCollapsedError, match=r"target std 0\.09 < objective\.min_target_std=0\.1 at update 5"):
        mon.on_train_batch_end(*fake_step(5, 0.09, 1.0), None, None, 0)
    with pytest.raises(TrainingCollapsedError, match=r"prediction std 0\.009 < objective\.min_pred_std=0\.01 at update 7"):
        mon.on_train_batch_end(*fake_step(7, 1.0, 0.009), None, None, 0)
    mon.on_train_batch_end(*fake_step(9, 0.0, 0.0, min_target_std=0.0, min_pred_std=0.0), None, None, 0)  # 0 disables
    mon.on_train_batch_end(*fake_step(9, 1.0, 0.0, min_pred_std=0.0), None, None, 0)
    explicit = CollapseMonitor(min_target_std=0.5, min_pred_std=0.0, check_after=2)  # overrides the objective
    explicit.on_train_batch_end(*fake_step(1, 0.1, 0.0), None, None, 0)
    with pytest.raises(TrainingCollapsedError, match="min_target_std=0.5 at update 2"):
        explicit.on_train_batch_end(*fake_step(2, 0.4, 1.0), None, None, 0)


def test_collapse_stops_a_run_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import d2v_train.pretrain as pretrain

    argv = sys.argv[:]
    try:
        with pytest.raises(SystemExit) as exc:
            pretrain.main([
                f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=6", "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false", "data.batch_size=8", "encoder.hidden_size=32",
                "encoder.intermediate_size=64", "encoder.num_hidden_layers=2", "objective.top_k=2",
                "objective.min_target_std=1000", "objective.collapse_check_after=2",
            ])
    finally:
        sys.argv = argv
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("d2v-pretrain: error: stopped: target std"), err
    assert "objective.min_target_std=1000" in err and "at update 2" in err, err
