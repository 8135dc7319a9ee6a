"""Mask statistics: fractions, block shapes, equal counts, padding, determinism."""

from __future__ import annotations

import torch

from d2v_train.objective.masking import (
    MaskingConfig,
    block_mask_1d,
    block_mask_2d,
    compute_mask,
    inverse_block_mask_2d,
    mask_tokens,
    random_mask,
    span_mask,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_span_mask_fraction_matches_reference_without_equalising() -> None:
    # fairseq compute_mask_indices, p=0.65, L=10: expected fraction = 1 - E[(1 - L/(T-L))^n]-ish ~ 0.49
    m = span_mask((512, 500), 0.65, 10, require_same_masks=False, generator=gen())
    frac = m.float().mean().item()
    assert 0.45 < frac < 0.52, frac
    # last frame can never be masked (starts drawn from range(T - L)), as in the reference
    assert not m[:, -1].any()


def test_span_mask_spans_are_contiguous_runs_of_length_ge_L() -> None:
    m = span_mask((64, 300), 0.2, 10, require_same_masks=False, generator=gen(1))
    # every run of masked frames (spans may overlap) is at least L long
    d = torch.diff(torch.nn.functional.pad(m.int(), (1, 1)), dim=1)
    starts = (d == 1).nonzero()
    ends = (d == -1).nonzero()
    assert torch.equal(starts[:, 0], ends[:, 0])
    assert ((ends[:, 1] - starts[:, 1]) >= 10).all()


def test_span_mask_equal_counts_min_masks_and_padding() -> None:
    pad = torch.zeros(16, 200, dtype=torch.bool)
    lengths = torch.randint(40, 201, (16,), generator=gen(2))
    pad[torch.arange(200).unsqueeze(0) >= lengths.unsqueeze(1)] = True
    for seed in range(20):
        m = span_mask((16, 200), 0.65, 10, padding_mask=pad, generator=gen(seed))
        assert not (m & pad).any()
        counts = m.sum(1)
        assert (counts == counts[0]).all() and counts[0] > 0
    # min_masks: a very low p still masks at least one span
    m = span_mask((8, 100), 0.0, 10, min_masks=1, require_same_masks=False, generator=gen())
    assert (m.sum(1) >= 10).all()


def test_span_mask_left_padding_and_determinism() -> None:
    pad = torch.zeros(4, 50, dtype=torch.bool)
    pad[:, :20] = True  # left padding
    a = span_mask((4, 50), 0.65, 5, padding_mask=pad, generator=gen(7))
    b = span_mask((4, 50), 0.65, 5, padding_mask=pad, generator=gen(7))
    c = span_mask((4, 50), 0.65, 5, padding_mask=pad, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not a[:, :20].any() and a.any()


def test_bert_token_masking_statistics() -> None:
    bsz, length = 256, 128
    ids = torch.randint(10, 1000, (bsz, length), generator=gen(0))
    maskable = torch.ones(bsz, length, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False  # <s> ... </s>
    maskable[:8, 100:] = False  # padding
    out = mask_tokens(
        ids, mask_id=3, maskable=maskable, random_token_ids=torch.arange(10, 1000), generator=gen(1)
    )
    n = maskable.sum().item()
    sel = out.selected.sum().item() / n
    assert abs(sel - 0.15) < 0.01, sel
    assert not (out.selected & ~maskable).any()
    masked = (out.input_ids == 3) & out.selected
    assert torch.equal(masked, out.loss_mask)  # loss exactly where the input is <mask>
    frac_mask = out.loss_mask.sum().item() / out.selected.sum().item()
    assert abs(frac_mask - 0.8) < 0.02
    changed = (out.input_ids != ids) & ~out.loss_mask
    assert abs(changed.sum().item() / out.selected.sum().item() - 0.1) < 0.02  # random (rarely same id)
    assert torch.equal(out.input_ids[~out.selected], ids[~out.selected])


def test_span_token_masking_variant() -> None:
    ids = torch.randint(10, 1000, (256, 512), generator=gen(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    out = mask_tokens(
        ids, mask_id=3, maskable=maskable, mask_prob=0.35, mask_length=4,
        leave_unmasked_prob=0.0, random_token_prob=0.0, generator=gen(3),
    )
    assert torch.equal(out.loss_mask, out.selected)  # all selected become <mask>
    frac = out.selected.float().mean().item()
    # int(0.35 n / 4 + U) overlapping spans of 4 -> 1 - exp(-0.35) ~ 0.30
    assert 0.27 < frac < 0.33, frac


def test_beit_block_mask_budget_and_shapes() -> None:
    m = block_mask_2d(2000, (14, 14), 120, min_num_patches=16, generator=gen(0))
    counts = m.sum(1).float()
    assert counts.max() <= 120
    assert counts.mean() > 110  # BEiT stops on no progress, so a few fall a little short
    # blocks: at 120 masked out of 196 the mask is made of big rectangles, so few masked patches are
    # isolated (no masked 4-neighbour)
    g = m.view(-1, 14, 14).float()
    nb = torch.nn.functional.pad(g, (1, 1, 1, 1))
    neigh = nb[:, :-2, 1:-1] + nb[:, 2:, 1:-1] + nb[:, 1:-1, :-2] + nb[:, 1:-1, 2:]
    isolated = ((g > 0) & (neigh == 0)).sum() / g.sum()
    assert isolated < 0.01


def test_beit_first_block_respects_area_and_aspect() -> None:
    # budget of one minimal block: most samples are one rectangle of area 16 (+-rounding)
    m = block_mask_2d(500, (14, 14), 16, min_num_patches=16, generator=gen(4)).view(-1, 14, 14)
    rows, cols = m.any(2).sum(1), m.any(1).sum(1)
    full = m.sum((1, 2))
    single = (rows * cols == full) & (full > 0)
    assert single.float().mean() > 0.5
    assert ((full[single] >= 12) & (full[single] <= 16)).all()
    ar = rows[single].float() / cols[single].float()
    assert ar.min() >= 0.2 and ar.max() <= 5.0  # log-uniform in [0.3, 3.3], then rounded
    assert ar.min() < 0.7 and ar.max() > 1.5  # both orientations occur
    assert (full <= 16).all()


def test_inverse_block_mask_counts_and_blocks() -> None:
    m = inverse_block_mask_2d(64, (14, 14), 0.8, block_size=3, mask_adjust=0.07, generator=gen(0))
    assert (m.sum(1) == 196 - int(196 * 0.2)).all()  # 157 masked
    a = inverse_block_mask_2d(8, (14, 14), generator=gen(5))
    assert torch.equal(a, inverse_block_mask_2d(8, (14, 14), generator=gen(5)))


def test_block_1d_and_random_mask_exact_counts_with_padding() -> None:
    pad = torch.zeros(8, 100, dtype=torch.bool)
    pad[4:, 80:] = True
    m = block_mask_1d((8, 100), 0.5, block_size=5, mask_adjust=0.05, padding_mask=pad, generator=gen())
    assert not (m & pad).any()
    assert (m.sum(1) == 40).all()  # int(80 * 0.5), the batch minimum
    m = block_mask_1d((8, 100), 0.5, padding_mask=pad, require_same_masks=False, generator=gen())
    assert m.sum(1).tolist() == [50] * 4 + [40] * 4
    r = random_mask((16, 64), 0.48, generator=gen())
    assert (r.sum(1) == int(64 * 0.48)).all()


def test_compute_mask_dispatch_and_expected_fraction_over_draws() -> None:
    cfg = MaskingConfig(kind="block", mask_ratio=0.6, min_num_patches=4)
    fr = torch.stack(
        [compute_mask(cfg, (32, 64), grid=(8, 8), generator=gen(s)).float().mean() for s in range(10)]
    )
    assert 0.5 < fr.mean().item() <= 0.61
    cfg = MaskingConfig(kind="span", mask_prob=0.65, mask_length=10, require_same_masks=False)
    m = compute_mask(cfg, (64, 400), generator=gen())
    assert 0.44 < m.float().mean().item() < 0.52

