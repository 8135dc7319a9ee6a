"""Mask properties that mutation testing found unguarded: BEiT blocks stay inside their budget and
are placed exactly, 2.0 inverse blocks reach every border, config errors for grids and random
replacement ids."""

from __future__ import annotations

import pytest
import torch

from d2v_train.objective.masking import MaskingConfig, block_mask_2d, compute_mask, inverse_block_mask_2d, mask_tokens


def test_beit_blocks_never_exceed_the_budget() -> None:
    """Each block is accepted only if it fits the remaining budget (BEiT), so no row goes over it;
    a block painted one row or column larger than counted would."""
    for seed in range(20):
        mask = block_mask_2d(16, (8, 8), 20, min_num_patches=4, generator=torch.Generator().manual_seed(seed))
        assert int(mask.sum(1).max()) <= 20


def test_a_beit_block_has_the_drawn_size() -> None:
    """Area 9 at aspect 1 is a 3 x 3 square: with a budget of 9 every row gets exactly one."""
    mask = block_mask_2d(16, (8, 8), 9, min_num_patches=9, max_num_patches=9, min_aspect=1.0, max_aspect=1.0,
                         generator=torch.Generator().manual_seed(0)).view(16, 8, 8)  # fmt: skip
    for m in mask:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert int(m.sum()) == 9 and len(rows) == len(cols) == 3 and bool(m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())


def test_inverse_blocks_reach_the_last_row_and_column() -> None:
    """One centre keeps a 3 x 3 block (then exactly 9 patches are kept): blocks whose centre sits
    next to the bottom-right border keep whole squares there, so the clamp must be the grid's."""
    height, width = 6, 7
    mask_prob = 1 - 9.5 / (height * width)  # 9 kept, one centre
    seen = torch.zeros(height, width, dtype=torch.bool)
    for seed in range(10):
        kept = ~inverse_block_mask_2d(24, (height, width), mask_prob, block_size=3, mask_adjust=0.01,
                                      generator=torch.Generator().manual_seed(seed)).view(24, height, width)  # fmt: skip
        for k in kept:
            rows, cols = k.any(1).nonzero().flatten(), k.any(0).nonzero().flatten()
            if len(rows) == len(cols) == 3 and bool(k[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()):
                seen |= k
    assert bool(seen[-1].any()) and bool(seen[:, -1].any())


def test_compute_mask_refuses_a_grid_that_does_not_match_the_tokens() -> None:
    cfg = MaskingConfig(kind="block", mask_ratio=0.5, min_num_patches=2)
    with pytest.raises(ValueError, match="grid"):
        compute_mask(cfg, (2, 16), grid=(3, 5))


def test_random_replacement_needs_candidate_ids() -> None:
    ids = torch.randint(5, 50, (2, 10))
    maskable = torch.ones(2, 10, dtype=torch.bool)
    for empty in (None, torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="random_token_prob > 0 needs random_token_ids"):
            mask_tokens(ids, mask_id=4, maskable=maskable, random_token_ids=empty, random_token_prob=0.1)
