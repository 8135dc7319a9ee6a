"""Wiring of Data2VecPretraining that mutation testing found unguarded: the run-sized EMA schedule
and the padding mask on its way from the batch to the objective."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from d2v_train.lightning import Data2VecPretraining
from d2v_train.objective.ema import resolve_schedule

from test_pretrain import fixed_batch, module_for


def with_total_steps(model: Data2VecPretraining, total: int) -> Data2VecPretraining:
    model.optim.total_steps = total
    return model


def test_ema_schedule_is_sized_to_the_run_by_fraction_and_horizon() -> None:
    model = with_total_steps(module_for("vision", ema=dict(decay=0.999, end_decay=0.9999, anneal_steps=30000,
                                                            anneal_fraction=0.5, max_horizon=0.1)), 200)  # fmt: skip
    sched = model.ema_schedule()
    assert sched == resolve_schedule(0.999, 0.9999, 30000, 200, anneal_fraction=0.5, max_horizon=0.1)
    assert sched.anneal_steps == 100 and sched.end_decay == pytest.approx(1 - 1 / 20)
    only_fraction = with_total_steps(module_for("vision", ema=dict(decay=0.99, end_decay=0.999, anneal_steps=30000,
                                                                    anneal_fraction=0.25)), 400)  # fmt: skip
    assert only_fraction.ema_schedule().anneal_steps == 100 and only_fraction.ema_schedule().end_decay == 0.999
    reference = with_total_steps(module_for("vision", ema=dict(decay=0.999, end_decay=0.9999, anneal_steps=30000)), 200)
    assert reference.ema_schedule().anneal_steps == 30000  # neither set: the configured ramp


def test_training_step_hands_the_batch_padding_to_the_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    model = module_for("audio")
    batch = fixed_batch("audio")
    seen: list[Any] = []
    compute = model.compute_objective

    def spy(inputs: torch.Tensor, padding_mask: Any = None, generator: Any = None) -> dict[str, Any]:
        seen.append(padding_mask)
        return compute(inputs, padding_mask, generator)

    monkeypatch.setattr(model, "compute_objective", spy)
    model.training_step(batch, 0)
    assert seen[0] is batch["padding_mask"]
    assert model.last_stats["samples"] == batch["inputs"].shape[0]


def test_v1_text_padding_content_cannot_change_the_loss() -> None:
    """Student and teacher both get the padding mask; without one, text padding is found by id."""
    model = module_for("text")
    batch = fixed_batch("text")
    ids, pad = batch["inputs"], batch["padding_mask"]
    other = ids.clone()
    other[pad] = torch.randint(5, 64, (int(pad.sum()),), generator=torch.Generator().manual_seed(3))

    def loss(inputs: torch.Tensor, padding: Any) -> torch.Tensor:
        return model.compute_objective(inputs, padding, torch.Generator().manual_seed(0))["loss"]

    reference = loss(ids, pad)
    torch.testing.assert_close(loss(other, pad), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(ids, None), reference)  # padding derived from the pad id


def test_teacher_init_weight_is_the_product_of_the_decays_and_the_lr_steps_every_update() -> None:
    from test_pretrain import run

    model = module_for("vision")
    run(model, fixed_batch("vision"), steps=4)
    expected = 1.0
    for step in range(1, 5):
        expected *= model.ema_decay(step)
    assert model.teacher_init_weight == pytest.approx(expected, rel=1e-9)
    assert model.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # one scheduler step per update
