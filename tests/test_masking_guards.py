"""Mask properties that mutation testing found unguarded: BEiT blocks stay inside their budget and
are placed exactly, 2.0 inverse blocks reach every border, config errors for grids and random
replacement ids. Also: the BEiT masks, drawn several attempts at a time, equal those of BEiT's
one-attempt loop."""

from __future__ import annotations

import math

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


def _beit_one_attempt_per_round(
    batch: int, grid: tuple[int, int], num: int, min_patches: int, max_patches: int, attempts: int, seed: int
) -> torch.Tensor:
    """BEiT's loop as written: every round, one attempt for every sample still going, with four
    fresh uniforms per sample; kept to check the attempt-window version against it."""
    generator = torch.Generator().manual_seed(seed)
    height, width = grid
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    count = torch.zeros(batch, dtype=torch.long)
    fails = torch.zeros(batch, dtype=torch.long)
    active = torch.full((batch,), num > 0)
    rows, cols = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    while bool(active.any()):
        u = torch.rand((batch, 4), generator=generator)
        budget = torch.clamp(num - count, max=max_patches).float()
        area = min_patches + (budget - min_patches) * u[:, 0]
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        top = torch.floor(u[:, 2] * (height - h + 1).clamp(min=1)).long().view(-1, 1, 1)
        left = torch.floor(u[:, 3] * (width - w + 1).clamp(min=1)).long().view(-1, 1, 1)
        rect = (rows >= top) & (rows < top + h.view(-1, 1, 1)) & (cols >= left) & (cols < left + w.view(-1, 1, 1))
        new = (rect & ~mask).flatten(1).sum(1)
        accept = active & (h < height) & (w < width) & (new > 0) & (new.float() <= budget)
        mask |= rect & accept.view(-1, 1, 1)
        count += torch.where(accept, new, 0)
        fails = torch.where(accept, 0, fails + active.long())
        active &= (count < num) & (fails < attempts)
    return mask.flatten(1)


@pytest.mark.parametrize(
    "batch,grid,num,min_patches,max_patches,attempts",
    [(64, (8, 8), 48, 4, 48, 10), (16, (14, 14), 120, 16, 120, 10), (7, (5, 9), 20, 2, 6, 3), (5, (3, 3), 9, 1, 9, 1)],
)
def test_beit_attempt_windows_give_the_one_attempt_per_round_masks(
    batch: int, grid: tuple[int, int], num: int, min_patches: int, max_patches: int, attempts: int
) -> None:
    """Judging a sample's next attempts together must pick the attempt the sequential loop picks,
    from the same uniforms: same masks, mask for mask, over many seeds."""
    for seed in range(25):
        fast = block_mask_2d(batch, grid, num, min_num_patches=min_patches, max_num_patches=max_patches,
                             max_attempts=attempts, generator=torch.Generator().manual_seed(seed))  # fmt: skip
        slow = _beit_one_attempt_per_round(batch, grid, num, min_patches, max_patches, attempts, seed)
        assert torch.equal(fast, slow), (seed, fast.sum(1), slow.sum(1))


def test_beit_masks_of_an_empty_batch() -> None:
    assert block_mask_2d(0, (4, 4), 8, min_num_patches=2).shape == (0, 16)


def test_beit_masks_need_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        compute_mask(MaskingConfig(kind="block", num_mask_patches=8, min_num_patches=4, max_attempts=0), (2, 16), grid=(4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_beit_masks_for_a_gpu_are_drawn_on_the_cpu_from_one_device_draw() -> None:
    """On a GPU the rejection loop's host syncs cost more than the mask, so it runs on the CPU,
    seeded by one draw of the device generator: the same device seed gives the same mask."""
    gpu = torch.Generator(device="cuda").manual_seed(3)
    mask = block_mask_2d(16, (14, 14), 120, generator=gpu, device="cuda")
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator(device="cuda").manual_seed(3), device="cuda"))
    expected = block_mask_2d(16, (14, 14), 120, generator=torch.Generator().manual_seed(seed))
    assert mask.device.type == "cuda" and torch.equal(mask.cpu(), expected)
