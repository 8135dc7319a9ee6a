"""Loss: hand-computed values, scales, masked-only gradients, heads."""

from __future__ import annotations

import math

import torch

from d2v_train.objective.decoder import RegressionHead
from d2v_train.objective.loss import global_std, masked_regression_loss, regression_loss


def test_l2_sum_over_channels_scaled_by_inverse_sqrt_dim() -> None:
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    per = regression_loss(pred, tgt)  # default: L2, scale 1/sqrt(4) = 0.5
    torch.testing.assert_close(per, torch.tensor([30.0 * 0.5, 4.0 * 0.5]))
    per = regression_loss(pred, tgt, loss_scale=1.0)
    torch.testing.assert_close(per, torch.tensor([30.0, 4.0]))


def test_smooth_l1_with_beta_and_channel_mean() -> None:
    pred = torch.tensor([[0.0, 0.0]])
    tgt = torch.tensor([[1.0, 6.0]])
    # beta=4: |d|=1 < 4 -> 0.5*1/4 = 0.125 ; |d|=6 >= 4 -> 6 - 2 = 4
    torch.testing.assert_close(regression_loss(pred, tgt, loss_beta=4.0, loss_scale=1.0), torch.tensor([4.125]))
    # v1 vision: beta 2, mean over channels: (0.25 + 5) / 2
    torch.testing.assert_close(
        regression_loss(pred, tgt, loss_beta=2.0, loss_scale=1.0, channel_reduction="mean"),
        torch.tensor([2.625]),
    )


def test_masked_loss_mean_over_positions_and_gradients_reach_only_masked() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, requires_grad=True)
    y = torch.randn(2, 5, 4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = True
    loss, glob, count, local = masked_regression_loss(x[mask], y[mask])
    expected = ((x[mask] - y[mask]) ** 2).sum(-1).mean() / math.sqrt(4)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(glob, expected.detach())
    assert count.item() == 3
    torch.testing.assert_close(local, expected.detach() * 3)
    loss.backward()
    assert x.grad is not None
    assert (x.grad[~mask] == 0).all() and (x.grad[mask].abs().sum(-1) > 0).all()


def test_empty_mask_gives_zero_loss_not_nan() -> None:
    x = torch.zeros(0, 4, requires_grad=True)
    loss, glob, count, _ = masked_regression_loss(x, torch.zeros(0, 4))
    assert loss.item() == 0 and glob.item() == 0 and count.item() == 0


def test_global_std_hand_computed() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # per-dim unbiased std: sqrt(2), 0
    expected = (math.sqrt(2 + 1e-6) + math.sqrt(1e-6)) / 2
    assert abs(global_std(x).item() - expected) < 1e-6


def test_heads() -> None:
    lin = RegressionHead(8, "linear")
    mlp = RegressionHead(8, "mlp")
    assert sum(p.numel() for p in lin.parameters()) == 8 * 8 + 8
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 16 + 16 + 16 * 8 + 8
    assert mlp(torch.randn(3, 8)).shape == (3, 8)


def test_global_std_non_square_and_too_few_positions() -> None:
    """5 positions x 3 channels (a square input hides swapped axes and n vs n - 1 mix-ups)."""
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 4.0], [2.0, 1.0, 0.0], [3.0, 1.0, 1.0], [9.0, 1.0, 3.0]])
    expected = torch.sqrt(x.var(0, unbiased=True) + 1e-6).mean()
    torch.testing.assert_close(global_std(x), expected)
    torch.testing.assert_close(global_std(x.reshape(1, 5, 3)), expected)  # (batch, time, dim) flattens
    one = global_std(x[:1])
    assert one.shape == () and one.item() == 0.0  # a single position has no spread to measure


def test_masked_loss_passes_loss_settings_and_counts_a_single_position() -> None:
    pred, target = torch.randn(3, 4), torch.randn(3, 4)
    res = masked_regression_loss(pred, target, loss_beta=0.5, loss_scale=2.0, channel_reduction="mean")
    per = regression_loss(pred, target, loss_beta=0.5, loss_scale=2.0, channel_reduction="mean")
    torch.testing.assert_close(res.loss, per.sum() / 3)
    torch.testing.assert_close(res.global_loss, per.sum() / 3)
    single = masked_regression_loss(pred[:1], target[:1])
    torch.testing.assert_close(single.loss, regression_loss(pred[:1], target[:1])[0])  # divided by 1, not more
    assert single.count.item() == 1
