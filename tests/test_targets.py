"""Targets: parameter-free norms, top-K averaging, padding-aware statistics, fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2v_train.objective.targets import batch_norm, build_targets, instance_norm, layer_norm, normalize


def test_instance_norm_matches_torch_without_padding() -> None:
    x = torch.randn(3, 7, 5)
    ref = F.instance_norm(x.transpose(1, 2), eps=1e-5).transpose(1, 2)
    torch.testing.assert_close(instance_norm(x), ref)


def test_instance_norm_hand_computed_with_padding() -> None:
    # one sample, one channel, time [1, 3, 100(pad)]: mean 2, biased var 1 over valid steps
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    pad = torch.tensor([[False, False, True]])
    y = instance_norm(x, pad)
    expected = torch.tensor([[[-1.0], [1.0], [0.0]]]) / torch.sqrt(torch.tensor(1.0 + 1e-5))
    torch.testing.assert_close(y, expected)
    # the valid part equals instance norm of the unpadded sequence
    x2 = torch.randn(2, 9, 4)
    pad2 = torch.zeros(2, 9, dtype=torch.bool)
    pad2[1, 6:] = True
    y2 = instance_norm(x2, pad2)
    torch.testing.assert_close(y2[1, :6], instance_norm(x2[1:, :6])[0])
    torch.testing.assert_close(y2[0], instance_norm(x2[:1])[0])


def test_layer_and_batch_norm() -> None:
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer_norm(x), F.layer_norm(x, (6,), eps=1e-5))
    ref = F.batch_norm(x.reshape(-1, 6), None, None, training=True, eps=1e-5).reshape(2, 4, 6)
    torch.testing.assert_close(batch_norm(x), ref)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[0, 3] = True
    y = batch_norm(x, pad)
    valid = x[~pad]
    torch.testing.assert_close(y[~pad], F.batch_norm(valid, None, None, training=True, eps=1e-5))


def test_build_targets_top_k_average_hand_computed() -> None:
    # three "layers" of shape (1, 2, 2); top-2 with no per-layer norm = mean of the last two
    layers = [torch.full((1, 2, 2), v) for v in (10.0, 1.0, 3.0)]
    t = build_targets(layers, 2, layer_norm="none", final_norm="none")
    torch.testing.assert_close(t, torch.full((1, 2, 2), 2.0))
    # layer norm after averaging: [[1, 3]] -> [-1, 1] / sqrt(1 + eps)
    layers = [torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[1.0, 3.0]]])]
    t = build_targets(layers, 2, layer_norm="none", final_norm="layer")
    torch.testing.assert_close(t, torch.tensor([[[-1.0, 1.0]]]) / torch.sqrt(torch.tensor(1 + 1e-5)))


def test_build_targets_normalises_each_layer_before_averaging_in_fp32() -> None:
    a = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    b = (torch.randn(2, 5, 3) * 100).to(torch.bfloat16)
    t = build_targets([a, b], 2, layer_norm="instance")
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, (instance_norm(a.float()) + instance_norm(b.float())) / 2)
    # scale of one layer does not dominate: each normalised layer has unit variance over time
    assert torch.allclose(normalize(b, "instance").var(1, unbiased=False), torch.ones(2, 3), atol=1e-3)


def test_build_targets_rejects_bad_args() -> None:
    with pytest.raises(ValueError):
        build_targets([torch.zeros(1, 1, 1)], 2)
    with pytest.raises(ValueError):
        normalize(torch.zeros(1, 1, 1), "group")


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_build_targets_with_padding_uses_only_valid_positions(norm: str) -> None:
    """Through ``build_targets`` (not just the norm functions): padded frames neither enter the
    statistics nor get a target; the valid part equals the norm of the valid frames alone."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 6, 3, generator=g) * (i + 1) + i for i in range(3)]
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    out = build_targets(layers, 2, layer_norm=norm, final_norm=norm, padding_mask=pad)
    assert torch.isfinite(out).all() and (out[pad] == 0).all()

    def ref(x: torch.Tensor) -> list[torch.Tensor]:  # per sample, valid frames only
        if norm == "instance":
            return [F.instance_norm(x[b : b + 1, : 6 - 2 * b].transpose(1, 2)).transpose(1, 2)[0] for b in range(2)]
        flat = torch.cat([x[0], x[1, :4]])
        normed = F.batch_norm(flat, None, None, training=True, eps=1e-5)
        return [normed[:6], normed[6:]]

    per_layer = [ref(y) for y in layers[-2:]]
    avg = [(per_layer[0][b] + per_layer[1][b]) / 2 for b in range(2)]
    padded_avg = torch.zeros(2, 6, 3)
    padded_avg[0], padded_avg[1, :4] = avg[0], avg[1]
    expected = ref(padded_avg)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, :4], expected[1], rtol=1e-4, atol=1e-5)


def test_top_1_is_the_normalised_last_layer() -> None:
    layers = [torch.randn(2, 5, 4) for _ in range(3)]
    torch.testing.assert_close(build_targets(layers, 1, layer_norm="layer"), normalize(layers[-1], "layer"))
    with pytest.raises(ValueError, match="top_k=0"):
        build_targets(layers, 0)
