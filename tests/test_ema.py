"""EMA teacher: closed form, schedule, copied / shared parts, buffers, freeze, fp32 shadow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2v_train.objective.ema import EMATeacher, ema_decay_at


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.pos = nn.Linear(4, 4)
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def test_decay_schedule_linear_then_constant() -> None:
    assert ema_decay_at(0, 0.999, 0.9999, 1000) == pytest.approx(0.999)
    assert ema_decay_at(500, 0.999, 0.9999, 1000) == pytest.approx(0.99945)
    assert ema_decay_at(1000, 0.999, 0.9999, 1000) == pytest.approx(0.9999)
    assert ema_decay_at(10**6, 0.999, 0.9999, 1000) == pytest.approx(0.9999)
    assert ema_decay_at(3, 0.9998, 0.9998, 0) == pytest.approx(0.9998)


def test_teacher_starts_as_copy_and_matches_closed_form() -> None:
    torch.manual_seed(0)
    student = Toy()
    teacher = EMATeacher(student, copy_prefixes=["pos"], share_prefixes=["embed"])
    t0 = teacher.model.blocks[0].weight.detach().clone()
    assert torch.equal(t0, student.blocks[0].weight)
    assert all(not p.requires_grad for p in teacher.parameters())
    taus = [ema_decay_at(k, 0.9, 0.99, 4) for k in range(6)]
    history = []
    for tau in taus:
        with torch.no_grad():
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
            student.blocks[1].running_mean.add_(1.0)
        history.append(student.blocks[0].weight.detach().clone())
        teacher.step(student, tau)
    # closed form: t_n = prod(tau) t0 + sum_i (1 - tau_i) prod_{j>i} tau_j s_i
    expected = t0.clone()
    for tau, s in zip(taus, history):
        expected = tau * expected + (1 - tau) * s
    torch.testing.assert_close(teacher.model.blocks[0].weight, expected)
    # with constant tau the same thing as the textbook formula
    # copied and shared parts equal the student's, buffers copied
    assert torch.equal(teacher.model.pos.weight, student.pos.weight)
    assert torch.equal(teacher.model.embed.weight, student.embed.weight)
    assert torch.equal(teacher.model.blocks[1].running_mean, student.blocks[1].running_mean)
    assert not torch.equal(teacher.model.blocks[0].weight, student.blocks[0].weight)
    assert "frozen" in teacher.copy_names and "blocks.0.weight" in teacher.ema_names


def test_constant_tau_closed_form_with_fixed_student() -> None:
    student, tau, n = Toy(), 0.8, 7
    teacher = EMATeacher(student)
    t0 = teacher.model.blocks[0].bias.detach().clone()
    with torch.no_grad():
        student.blocks[0].bias.copy_(torch.randn(4))
    for _ in range(n):
        teacher.step(student, tau)
    s = student.blocks[0].bias.detach()
    torch.testing.assert_close(teacher.model.blocks[0].bias, s + (t0 - s) * tau**n)


def test_tau_one_freezes_everything() -> None:
    student = Toy()
    teacher = EMATeacher(student, copy_prefixes=["pos"])
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.step(student, 1.0)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_teacher_stays_in_eval_mode() -> None:
    holder = nn.Module()
    holder.teacher = EMATeacher(Toy())
    holder.train()
    assert not holder.teacher.model.training


def test_fp32_shadow_when_teacher_is_low_precision() -> None:
    student = Toy()
    teacher = EMATeacher(student)
    teacher.to(torch.bfloat16)
    w0 = student.blocks[0].weight.detach().clone()
    with torch.no_grad():
        student.blocks[0].weight.add_(1e-3)  # too small to show in bf16 in one step at tau ~ 1
    for _ in range(10):
        teacher.step(student, 0.99)
    shadow = teacher.shadow()[teacher.ema_names.index("blocks.0.weight")]
    assert shadow.dtype == torch.float32
    expected = w0 + 1e-3 * (1 - 0.99**10)
    torch.testing.assert_close(shadow, expected, rtol=0, atol=1e-6)
    state = teacher.state_dict()
    other = EMATeacher(student)
    other.to(torch.bfloat16)
    other.load_state_dict(state)
    torch.testing.assert_close(other.shadow()[0], teacher.shadow()[0])


def test_bad_prefix_is_rejected() -> None:
    with pytest.raises(ValueError):
        EMATeacher(Toy(), copy_prefixes=["nope"])


def test_schedule_sized_to_the_run() -> None:
    """Short runs get a ramp over a share of the run and a teacher that averages over at most
    ``max_horizon`` of it; a run of the reference's length keeps the reference decays."""
    from d2v_train.objective.ema import resolve_schedule

    short = resolve_schedule(0.999, 0.9999, 30000, 200, anneal_fraction=0.5, max_horizon=0.1)
    assert short.anneal_steps == 100
    assert short.decay == pytest.approx(0.95) and short.end_decay == pytest.approx(0.95)
    assert short.at(0) == pytest.approx(0.95)
    long = resolve_schedule(0.999, 0.9999, 30000, 400_000, max_horizon=0.1)
    assert (long.decay, long.end_decay, long.anneal_steps) == (0.999, 0.9999, 30000)
    assert long.at(15000) == pytest.approx(ema_decay_at(15000, 0.999, 0.9999, 30000))
    unknown = resolve_schedule(0.999, 0.9999, 30000, None, anneal_fraction=0.5, max_horizon=0.1)
    assert (unknown.decay, unknown.anneal_steps) == (0.999, 30000)
    # a teacher of a 200-update run at 0.9998 keeps ~96% of its init; capped at 0.95 it keeps ~0%
    assert 0.9998**200 > 0.9 and short.at(0) ** 200 < 1e-4


def test_schedule_cap_keeps_a_teacher_in_very_short_runs() -> None:
    from d2v_train.objective.ema import resolve_schedule

    tiny = resolve_schedule(0.9998, 0.9998, 0, 4, max_horizon=0.1)
    assert tiny.decay == pytest.approx(0.9) and tiny.end_decay == pytest.approx(0.9)
    assert resolve_schedule(0.5, 0.6, 0, 4, max_horizon=0.1).decay == 0.5  # lower decays are kept


def test_fp32_shadow_survives_checkpoints_and_casts_back() -> None:
    """bf16 teacher: every averaged tensor keeps fp32 precision in the shadow, a state dict carries
    the shadow to a fresh teacher (which then steps identically), and casting back to fp32 turns
    the shadow into the weights."""
    student = Toy()
    teacher = EMATeacher(student)
    teacher.to(torch.bfloat16)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-3)
    for _ in range(5):
        teacher.step(student, 0.99)
    shadows = [s.clone() for s in teacher.shadow()]
    assert len(shadows) == len(teacher.ema_names) and all(s.dtype == torch.float32 for s in shadows)
    assert any(not torch.equal(s, s.bfloat16().float()) for s in shadows)  # finer than bf16
    params = dict(teacher.model.named_parameters())
    for name, s in zip(teacher.ema_names, shadows):
        assert params[name].dtype == torch.bfloat16 and torch.equal(params[name], s.bfloat16())
    other = EMATeacher(Toy())  # other weights: everything must come from the state dict
    other.to(torch.bfloat16)
    other.load_state_dict(teacher.state_dict())
    for a, b in zip(other.shadow(), shadows):
        assert torch.equal(a, b)
    teacher.step(student, 0.9)
    other.step(student, 0.9)
    for a, b in zip(other.shadow(), teacher.shadow()):
        assert torch.equal(a, b)
    teacher.float()
    params = dict(teacher.model.named_parameters())
    for name, s in zip(teacher.ema_names, teacher.shadow()):
        assert params[name].dtype == torch.float32 and torch.equal(params[name], s)


def test_decay_schedule_edges() -> None:
    assert ema_decay_at(0, 0.5, 0.9, 1) == 0.5  # a one-update ramp still starts at the start value
    assert ema_decay_at(1, 0.5, 0.9, 1) == 0.9
    assert ema_decay_at(4, 0.5, 0.9, 4) == 0.9 and ema_decay_at(3, 0.5, 0.9, 4) == pytest.approx(0.8)
    assert ema_decay_at(0, 0.5, 0.9, 0) == 0.9  # no ramp: the end value from the start
