"""The data2vec 2.0 loss wiring checked against hand computations: the image CLS loss, the loss
settings reaching every term, padding reaching student and teacher, masks drawn from the run's
generator only. Each test kills mutants that the shape and learning tests of test_d2v2.py let live."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import d2v_train.objective.multimask as multimask
from d2v_train.objective.loss import regression_loss

from test_d2v2 import v2_module
from test_pretrain import fixed_batch


def objective(model: Any, batch: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    return model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("settings", [dict(), dict(loss_beta=0.5, channel_reduction="mean", loss_scale=0.3)])
def test_cls_loss_is_its_weight_times_the_clone_sum(settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Image CLS loss: weight x (sum over clones of the regression of the student's CLS output on the
    mean of the teacher's patch targets), with the objective's own loss settings, added to the loss."""
    torch.manual_seed(0)
    model = v2_module("vision", clones=3, cls_loss=0.25, **settings)
    batch = fixed_batch("vision")
    seen: dict[str, Any] = {}
    contextualize, teacher_targets = model.student.contextualize, multimask.teacher_targets

    def spy_student(*args: Any, **kwargs: Any) -> Any:
        out = contextualize(*args, **kwargs)
        seen["hidden"] = out.last_hidden_state
        return out

    def spy_teacher(*args: Any, **kwargs: Any) -> Any:
        seen["targets"] = teacher_targets(*args, **kwargs)
        return seen["targets"]

    monkeypatch.setattr(model.student, "contextualize", spy_student)
    monkeypatch.setattr(multimask, "teacher_targets", spy_teacher)
    with_cls = objective(model, batch)
    obj = model.objective
    kwargs = dict(loss_beta=obj.loss_beta, loss_scale=obj.loss_scale, channel_reduction=obj.channel_reduction)
    cls_target = seen["targets"].mean(1).repeat_interleave(3, dim=0)
    expected = 0.25 * regression_loss(seen["hidden"][:, 0], cls_target, **kwargs).sum()
    torch.testing.assert_close(with_cls["cls_loss"], expected.detach())

    obj.cls_loss = 0.0
    without = objective(model, batch)  # same generator seed: same masks and decoder noise
    assert float(without["cls_loss"]) == 0.0
    torch.testing.assert_close(with_cls["loss"] - without["loss"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(with_cls["global_loss"] - without["global_loss"], expected.detach(), rtol=1e-4, atol=1e-6)


def test_loss_settings_reach_the_masked_token_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = v2_module("audio", clones=2, loss_beta=0.5, channel_reduction="mean", loss_scale=0.3)
    seen: dict[str, Any] = {}
    clone_targets, decode = multimask.clone_targets, model.head.forward

    def spy_targets(*args: Any, **kwargs: Any) -> Any:
        seen["target"] = clone_targets(*args, **kwargs)
        return seen["target"]

    def spy_decoder(*args: Any, **kwargs: Any) -> Any:
        seen["pred_all"] = decode(*args, **kwargs)
        return seen["pred_all"]

    monkeypatch.setattr(multimask, "clone_targets", spy_targets)
    monkeypatch.setattr(model.head, "forward", spy_decoder)
    out = objective(model, fixed_batch("audio"))
    pred = seen["pred_all"][out["mask"]]
    per = regression_loss(pred, seen["target"], loss_beta=0.5, loss_scale=0.3, channel_reduction="mean")
    torch.testing.assert_close(out["loss"], per.mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_padding_content_cannot_change_the_loss(modality: str) -> None:
    """Whatever sits under the padding mask, student and teacher never see it."""
    torch.manual_seed(0)
    model = v2_module(modality, clones=2)
    batch = fixed_batch(modality)
    pad = batch["padding_mask"]
    other = dict(batch, inputs=batch["inputs"].clone())
    if modality == "text":
        other["inputs"][pad] = torch.randint(5, 64, (int(pad.sum()),), generator=torch.Generator().manual_seed(3))
    else:
        other["inputs"][pad] = torch.randn(int(pad.sum()), generator=torch.Generator().manual_seed(3))
    a, b = objective(model, batch), objective(model, other)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    for key in ("target_std", "pred_std", "tokens"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    if modality == "text":  # the statistics count real tokens, per clone
        batch_size = batch["inputs"].shape[0]
        assert int(a["tokens"]) == 2 * int((~pad).sum()) and a["pairs"] == 2 * batch_size
        kept = int((~a["mask"]).sum(1)[0])  # same count in every row
        assert a["encoded"] == 2 * batch_size * kept


def test_masks_and_noise_come_from_the_run_generator_only() -> None:
    torch.manual_seed(0)
    model = v2_module("vision", clones=2)
    batch = fixed_batch("vision")
    torch.manual_seed(1)
    first = objective(model, batch, seed=0)
    torch.manual_seed(2)  # the global RNG must not matter
    again = objective(model, batch, seed=0)
    assert torch.equal(first["mask"], again["mask"]) and torch.equal(first["loss"], again["loss"])
    other = objective(model, batch, seed=1)
    assert not torch.equal(first["mask"], other["mask"])


def test_2_0_needs_the_same_masked_count_in_every_row() -> None:
    """Random and 1-D block masks must be drawn with require_same_masks; inverse blocks always are."""
    torch.manual_seed(0)
    model = v2_module("text", clones=2)
    model.masking.require_same_masks = False
    with pytest.raises(ValueError, match="same number of masked tokens in every row.*require_same_masks=true, got 'random'"):
        objective(model, fixed_batch("text"))
    vision = v2_module("vision", clones=2)
    vision.masking.require_same_masks = False  # inverse blocks are exact anyway
    assert torch.isfinite(objective(vision, fixed_batch("vision"))["loss"])
