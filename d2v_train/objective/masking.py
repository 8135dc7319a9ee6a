"""Vectorised, seeded mask generators for data2vec pretraining.

Every generator returns bool tensors with True = masked, draws every random number from the
``torch.Generator`` it is given (so the same seed gives the same masks and a resumed run continues
exactly), never masks padding, and works on a whole batch at once: there is no Python loop over
tokens or samples. (The BEiT block generator loops over *placement rounds*, each one vectorised over
the batch, because the algorithm is sequential by nature.)

Padding-aware masks are computed in "rank space": the valid (maskable) positions of each row are
numbered 0..n_valid-1, the mask is drawn over those ranks, and then gathered back to the real positions.
That handles right padding, left padding and special tokens (text ``<s>``/``</s>``) with one code path.

Reference semantics (see shared/reference/data2vec-original.md section 5):
- ``span_mask``: fairseq ``compute_mask_indices`` (v1 audio: p=0.65, span 10, min 1 mask, overlap
  allowed, ``require_same_masks`` subsamples every row to the batch minimum).
- ``mask_tokens``: fairseq ``MaskTokensDataset`` (BERT 15% with 80/10/10, or 35% spans of 4).
- ``block_mask_2d``: BEiT ``MaskingGenerator`` (120 of 196 patches, blocks of >= 16, aspect 0.3-3.3).
- ``inverse_block_mask_2d`` / ``block_mask_1d`` / ``random_mask``: data2vec 2.0 image, audio and text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "MASK_KINDS",
    "MaskingConfig",
    "TokenMaskOutput",
    "span_mask",
    "mask_tokens",
    "block_mask_2d",
    "inverse_block_mask_2d",
    "block_mask_1d",
    "random_mask",
    "exact_count_mask",
    "compute_mask",
]


MASK_KINDS = ("span", "token", "block", "inverse_block", "block_1d", "random")


@dataclass
class MaskingConfig:
    """All masking knobs in one schema (each ``kind`` reads the fields it needs).

    kind:
      ``span`` (v1 audio), ``token`` (v1 text: BERT or span variant), ``block`` (v1 vision, BEiT),
      ``inverse_block`` (2.0 vision), ``block_1d`` (2.0 audio), ``random`` (2.0 text).
    """

    kind: str = "span"
    # span / token / block_1d / random
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 1
    require_same_masks: bool = True
    # token (text): BERT replacement; the loss is on <mask>-replaced positions only
    leave_unmasked_prob: float = 0.1
    random_token_prob: float = 0.1
    # block (BEiT): either an absolute patch count or a ratio of the grid
    num_mask_patches: int | None = None
    mask_ratio: float = 0.6
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None
    max_attempts: int = 10
    # 2.0 block masks
    block_size: int = 3
    mask_adjust: float = 0.07


class TokenMaskOutput(NamedTuple):
    """Result of ``mask_tokens``.

    input_ids: ids given to the student (selected tokens replaced by <mask>, random or kept).
    loss_mask: True where the student's input is ``<mask>`` (the positions the loss is computed on).
    selected: all selected positions (including the 10% random / 10% kept ones).
    """

    input_ids: Tensor
    loss_mask: Tensor
    selected: Tensor


# ---------------------------------------------------------------------------------------------
# helpers


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(tuple(shape), generator=generator, device=device)


def _gen_device(generator: torch.Generator | None, fallback: torch.device | str = "cpu") -> torch.device:
    return generator.device if generator is not None else torch.device(fallback)


def _valid_from(shape: tuple[int, int], padding_mask: Tensor | None, device: torch.device) -> Tensor:
    if padding_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if padding_mask.shape != torch.Size(shape):
        raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != {shape}")
    return ~padding_mask.to(device=device, dtype=torch.bool)


def _to_positions(rank_mask: Tensor, valid: Tensor) -> Tensor:
    """Map a mask drawn over each row's valid ranks (B, R) back to real positions (B, T)."""
    if rank_mask.shape[1] == 0:
        return torch.zeros_like(valid)
    rank = (valid.long().cumsum(1) - 1).clamp(min=0, max=rank_mask.shape[1] - 1)
    return rank_mask.gather(1, rank) & valid


def _random_subset(candidates: Tensor, k: Tensor, generator: torch.Generator | None) -> Tensor:
    """Keep exactly ``k[b]`` random True entries of each row (rows with fewer keep all)."""
    score = _rand(candidates.shape, generator, candidates.device)
    score = torch.where(candidates, score, torch.full_like(score, -1.0))
    return _take_top(score, k) & candidates


def _take_top(score: Tensor, k: Tensor) -> Tensor:
    """Bool mask of the ``k[b]`` highest scores of each row."""
    order = score.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(score.shape[1], device=score.device).expand_as(order).contiguous()
    )
    return ranks < k.to(score.device).unsqueeze(1)


def exact_count_mask(
    candidates: Tensor, target: Tensor, valid: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Exactly ``target[b]`` masked valid positions per row, preferring ``candidates``.

    Why: data2vec 2.0 adjusts its block masks to an exact count by randomly removing candidates
    (too many) or adding random free positions (too few); one top-k over ``2*candidate + U[0,1)``
    does both at once.
    """
    score = _rand(candidates.shape, generator, candidates.device) + 2.0 * candidates.float()
    score = torch.where(valid, score, torch.full_like(score, -1.0))
    target = torch.minimum(target, valid.sum(1))
    return _take_top(score, target) & valid


def _spans_in_rank_space(
    n_valid: Tensor,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
    partial_spans: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Sample spans over ranks 0..n_valid[b]-1; returns (B, R) with R = max(n_valid)."""
    device = n_valid.device
    bsz = n_valid.numel()
    width = int(n_valid.max().item()) if bsz else 0
    if width == 0:
        return torch.zeros(bsz, 0, dtype=torch.bool, device=device)
    length = max(int(mask_length), 1)
    # number of spans: int(p * n / L + U[0,1)), at least min_masks (fairseq)
    num = torch.floor(mask_prob * n_valid.float() / length + _rand((bsz,), generator, device)).long()
    num = num.clamp(min=min_masks)
    if partial_spans:
        # text (MaskTokensDataset): a span may start anywhere and is clipped at the end
        n_starts = n_valid
    else:
        # audio (compute_mask_indices): starts drawn from range(n - L) so spans fit
        n_starts = (n_valid - length).clamp(min=1)
    num = torch.minimum(num, n_starts)
    num = torch.where(n_valid > 0, num, torch.zeros_like(num))
    # sampling starts without replacement = first `num` entries of a random permutation of the starts
    score = _rand((bsz, width), generator, device)
    ar = torch.arange(width, device=device)
    score = torch.where(ar.unsqueeze(0) < n_starts.unsqueeze(1), score, torch.full_like(score, 2.0))
    k = int(num.max().item())
    if k == 0:
        return torch.zeros(bsz, width, dtype=torch.bool, device=device)
    starts = score.argsort(dim=1)[:, :k]  # (B, k)
    keep = torch.arange(k, device=device).unsqueeze(0) < num.unsqueeze(1)
    pos = starts.unsqueeze(-1) + torch.arange(length, device=device)  # (B, k, L)
    ok = keep.unsqueeze(-1) & (pos < n_valid.view(-1, 1, 1))
    pos = torch.where(ok, pos, torch.full_like(pos, width))  # dump column for dropped entries
    out = torch.zeros(bsz, width + 1, dtype=torch.bool, device=device)
    out.scatter_(1, pos.reshape(bsz, -1), True)
    return out[:, :width]


# ---------------------------------------------------------------------------------------------
# v1 audio / text


def span_mask(
    shape: tuple[int, int],
    mask_prob: float = 0.65,
    mask_length: int = 10,
    *,
    min_masks: int = 1,
    padding_mask: Tensor | None = None,
    require_same_masks: bool = True,
    partial_spans: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """wav2vec 2.0 / data2vec v1 span masking over ``(batch, time)``.

    Per row with n valid frames: ``int(p*n/L + U)`` (>= ``min_masks``) span starts drawn without
    replacement, each masking L frames; spans may overlap (so p=0.65, L=10 masks about 49%).
    ``require_same_masks`` randomly subsamples every row down to the batch's smallest masked count,
    which may break spans into fragments, as the reference does.

    Args:
        shape: ``(batch, time)``.
        padding_mask: bool ``(batch, time)``, True = padding; padding is never masked.
        partial_spans: let spans start anywhere and be clipped at the end (text semantics).
    Returns:
        bool ``(batch, time)``, True = masked.
    """
    dev = torch.device(device) if device is not None else _gen_device(generator)
    valid = _valid_from(shape, padding_mask, dev)
    n_valid = valid.sum(1)
    rank_mask = _spans_in_rank_space(n_valid, mask_prob, mask_length, min_masks, partial_spans, generator)
    if require_same_masks and shape[0] > 1 and rank_mask.shape[1] > 0:
        counts = rank_mask.sum(1)
        real = n_valid > 0  # empty rows must not force every row to zero masks
        if bool(real.any()):
            rank_mask = _random_subset(rank_mask, counts[real].min().expand_as(counts), generator)
    return _to_positions(rank_mask, valid)


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_id: int,
    maskable: Tensor,
    random_token_ids: Tensor | None = None,
    mask_prob: float = 0.15,
    mask_length: int = 1,
    min_masks: int = 0,
    leave_unmasked_prob: float = 0.1,
    random_token_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> TokenMaskOutput:
    """Masked-LM token masking (fairseq ``MaskTokensDataset`` semantics), vectorised.

    Per sequence ``int(p * n / L + U)`` starts are drawn without replacement among the n maskable
    tokens; each selects L consecutive maskable tokens (clipped at the end, overlaps allowed).
    Each selected token is left unchanged with ``leave_unmasked_prob``, replaced by a random
    non-special token with ``random_token_prob``, else by ``<mask>``. BERT: p=0.15, L=1, 0.1/0.1.
    data2vec v1 text yaml: p=0.35, L=4, 0/0.

    Args:
        input_ids: ``(batch, length)`` long.
        maskable: bool ``(batch, length)``; False for padding and special tokens.
        random_token_ids: 1-D long tensor of ids a random replacement may draw from.
    """
    device = input_ids.device
    bsz, length = input_ids.shape
    valid = maskable.to(device=device, dtype=torch.bool)
    gen_dev = _gen_device(generator, device)
    n_valid = valid.sum(1).to(gen_dev)
    rank_mask = _spans_in_rank_space(n_valid, mask_prob, mask_length, min_masks, True, generator)
    selected = _to_positions(rank_mask.to(device), valid)

    u = _rand((bsz, length), generator, gen_dev).to(device)
    leave = selected & (u < leave_unmasked_prob)
    rand_tok = selected & (u >= leave_unmasked_prob) & (u < leave_unmasked_prob + random_token_prob)
    to_mask = selected & ~leave & ~rand_tok
    out = input_ids.masked_fill(to_mask, mask_id)
    if random_token_prob > 0:
        if random_token_ids is None or random_token_ids.numel() == 0:
            raise ValueError("random_token_prob > 0 needs random_token_ids")
        cand = random_token_ids.to(device)
        idx = torch.randint(0, cand.numel(), (bsz, length), generator=generator, device=gen_dev).to(device)
        out = torch.where(rand_tok, cand[idx], out)
    return TokenMaskOutput(out, to_mask, selected)


# ---------------------------------------------------------------------------------------------
# v1 vision: BEiT block masking


def _masked_in_rectangles(mask: Tensor, top: Tensor, bottom: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Masked patches inside rows [top, bottom) x columns [left, right) of each sample's grid, for
    ``(batch, k)`` rectangles at once, from the mask's summed-area table: exact integers (a float
    matmul would round under bf16 autocast) and no ``(batch, k, H, W)`` tensor."""
    width = mask.shape[2]
    table = torch.nn.functional.pad(mask.long().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)

    def corner(row: Tensor, col: Tensor) -> Tensor:
        return table.gather(1, row * (width + 1) + col)

    return corner(bottom, right) - corner(top, right) - corner(bottom, left) + corner(top, left)


def block_mask_2d(
    batch_size: int,
    grid: tuple[int, int],
    num_mask_patches: int,
    *,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_attempts: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """BEiT block-wise masking, vectorised over the batch and over each sample's attempts.

    BEiT places rectangles one attempt at a time: area ~ U[min, remaining budget] (capped by
    ``max_num_patches``), aspect ratio log-uniform in [min_aspect, max_aspect], position uniform.
    A rectangle is kept only if it adds new patches without exceeding the remaining budget; a
    sample stops when its budget is met or after ``max_attempts`` consecutive failures (BEiT's
    "no progress" stop), so a few samples end slightly below the budget, as in BEiT.

    Between two accepted rectangles a sample's budget and mask do not change, so its next
    ``max_attempts`` attempts can all be drawn and judged at once: the first that succeeds is the
    one the sequential loop would have taken, and if none does the sample stops. A round of this
    loop is then one accepted rectangle per sample rather than one attempt (about 14 rounds
    instead of 30 for a batch of 64 digits). Each round still ends in a host sync, so for a
    device other than the CPU the mask is drawn on the CPU and copied over.
    Attempt ``i`` of sample ``b`` reads the same four uniforms as in the one-attempt-per-round
    form (row ``i`` of a ``(rounds, batch, 4)`` draw), so on CPU both give the same masks.

    Returns:
        bool ``(batch, H*W)`` (row-major patches), True = masked.
    """
    if max_attempts < 1:
        raise ValueError(f"masking.max_attempts must be >= 1 (BEiT uses 10), got {max_attempts}")
    dev = torch.device(device) if device is not None else _gen_device(generator)
    if dev.type != "cpu":
        # Rejection sampling is a loop of small steps, each ending in a host sync. On a GPU every
        # round pays launch and sync latency (a batch-16 mask at 224 pixels took 16 ms on an H200
        # and 4 ms on that machine's CPU, copy included), so the mask is drawn on the CPU, as BEiT's
        # data loader draws it, from a generator seeded by one draw of the device's, and copied over.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))
        return block_mask_2d(
            batch_size, grid, num_mask_patches, min_num_patches=min_num_patches, max_num_patches=max_num_patches,
            min_aspect=min_aspect, max_aspect=max_aspect, max_attempts=max_attempts,
            generator=torch.Generator().manual_seed(seed), device="cpu",
        ).to(dev)
    height, width = grid
    max_num_patches = num_mask_patches if max_num_patches is None else max_num_patches
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=dev)
    count = torch.zeros(batch_size, dtype=torch.long, device=dev)
    next_attempt = torch.zeros(batch_size, dtype=torch.long, device=dev)  # per sample, into the draws
    active = torch.full((batch_size,), num_mask_patches > 0, dtype=torch.bool, device=dev)
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    window = torch.arange(max_attempts, device=dev).view(1, max_attempts)
    sample = torch.arange(batch_size, device=dev).view(-1, 1)
    draws = torch.empty(0, batch_size, 4, device=dev)
    # each round accepts a rectangle of >= 1 patch or stops the sample: at most num + 1 rounds
    for _ in range(num_mask_patches + 1 if batch_size > 0 else 0):
        any_active, last = torch.stack([active.any().long(), next_attempt.max()]).tolist()
        if not any_active:
            break
        if last + max_attempts > draws.shape[0]:  # more attempts drawn, in the order BEiT's loop reads them
            extra = max(last + max_attempts - draws.shape[0], 2 * max_attempts)
            draws = torch.cat([draws, _rand((extra, batch_size, 4), generator, dev)])
        u = draws[next_attempt.view(-1, 1) + window, sample]  # (batch, max_attempts, 4)
        budget = torch.clamp(num_mask_patches - count, max=max_num_patches).float().view(-1, 1)
        area = min_num_patches + (budget - min_num_patches) * u[..., 0]  # random.uniform(a, b)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < height) & (w < width)
        top = torch.floor(u[..., 2] * (height - h + 1).clamp(min=1)).long()
        left = torch.floor(u[..., 3] * (width - w + 1).clamp(min=1)).long()
        bottom, right = (top + h).clamp(max=height), (left + w).clamp(max=width)  # cut at the grid
        new = (bottom - top) * (right - left) - _masked_in_rectangles(mask, top, bottom, left, right)
        ok = fits & (new > 0) & (new.float() <= budget)
        accept = active & ok.any(1)
        first = ok.long().argmax(1, keepdim=True)  # the first attempt that succeeds
        r0, r1, c0, c1 = (t.gather(1, first).view(-1, 1, 1) for t in (top, bottom, left, right))
        chosen = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
        mask |= chosen & accept.view(-1, 1, 1)
        count = count + torch.where(accept, new.gather(1, first).squeeze(1), torch.zeros_like(count))
        step = torch.where(accept, first.squeeze(1) + 1, torch.full_like(count, max_attempts))
        next_attempt = next_attempt + step * active
        active = accept & (count < num_mask_patches)
    return mask.flatten(1)


# ---------------------------------------------------------------------------------------------
# data2vec 2.0 masks


def inverse_block_mask_2d(
    batch_size: int,
    grid: tuple[int, int],
    mask_prob: float = 0.8,
    *,
    block_size: int = 3,
    mask_adjust: float = 0.07,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0 inverse block mask: L x L blocks are *kept*, the rest masked.

    ``int(N*(1-p+a)/L^2)`` random centres each keep an L x L block (clamped at the borders), then the
    kept set is adjusted to exactly ``int(N*(1-p))`` patches, so every row has the same masked count
    (157 of 196 at p=0.8).

    Returns:
        bool ``(batch, H*W)``, True = masked.
    """
    dev = torch.device(device) if device is not None else _gen_device(generator)
    height, width = grid
    n = height * width
    keep_p = 1.0 - mask_prob
    n_centres = max(int(n * (keep_p + mask_adjust) / block_size**2), 0)
    kept = torch.zeros(batch_size, n, dtype=torch.bool, device=dev)
    if n_centres > 0:
        centres = _rand((batch_size, n), generator, dev).argsort(dim=1)[:, : min(n_centres, n)]
        ci, cj = centres // width, centres % width
        off = torch.arange(block_size, device=dev) - (block_size - 1) // 2
        ri = (ci.unsqueeze(-1) + off).clamp(0, height - 1)  # (B, c, L)
        rj = (cj.unsqueeze(-1) + off).clamp(0, width - 1)
        idx = ri.unsqueeze(-1) * width + rj.unsqueeze(-2)  # (B, c, L, L)
        kept.scatter_(1, idx.reshape(batch_size, -1), True)
    valid = torch.ones_like(kept)
    target = torch.full((batch_size,), int(n * keep_p), dtype=torch.long, device=dev)
    return ~exact_count_mask(kept, target, valid, generator)


def block_mask_1d(
    shape: tuple[int, int],
    mask_prob: float = 0.5,
    *,
    block_size: int = 5,
    mask_adjust: float = 0.05,
    padding_mask: Tensor | None = None,
    require_same_masks: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0 audio mask: ``int(n*(p+a)/L)`` centres each mask L frames centred on them, then
    adjusted to exactly ``int(n*p)`` masked frames per row (the batch minimum when
    ``require_same_masks``). ``block_size=1, mask_adjust=0`` gives MAE random masking."""
    dev = torch.device(device) if device is not None else _gen_device(generator)
    valid = _valid_from(shape, padding_mask, dev)
    n_valid = valid.sum(1)
    bsz = shape[0]
    width = int(n_valid.max().item()) if bsz else 0
    if width == 0:
        return torch.zeros(shape, dtype=torch.bool, device=dev)
    ar = torch.arange(width, device=dev)
    rank_valid = ar.unsqueeze(0) < n_valid.unsqueeze(1)
    n_centres = torch.floor(n_valid.float() * (mask_prob + mask_adjust) / block_size).long()
    cand = torch.zeros(bsz, width + 1, dtype=torch.bool, device=dev)
    k = int(n_centres.max().item())
    if k > 0:
        score = torch.where(rank_valid, _rand((bsz, width), generator, dev), torch.full((bsz, width), 2.0, device=dev))
        centres = score.argsort(dim=1)[:, :k]
        keep = torch.arange(k, device=dev).unsqueeze(0) < torch.minimum(n_centres, n_valid).unsqueeze(1)
        off = torch.arange(block_size, device=dev) - (block_size - 1) // 2
        pos = centres.unsqueeze(-1) + off
        ok = keep.unsqueeze(-1) & (pos >= 0) & (pos < n_valid.view(-1, 1, 1))
        pos = torch.where(ok, pos, torch.full_like(pos, width))
        cand.scatter_(1, pos.reshape(bsz, -1), True)
    target = torch.floor(n_valid.float() * mask_prob).long()
    if require_same_masks:
        target = target.min().expand_as(target)
    rank_mask = exact_count_mask(cand[:, :width], target, rank_valid, generator)
    return _to_positions(rank_mask, valid)


def random_mask(
    shape: tuple[int, int],
    mask_prob: float = 0.48,
    *,
    padding_mask: Tensor | None = None,
    require_same_masks: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """MAE random masking (data2vec 2.0 text): exactly ``int(n*p)`` random positions per row."""
    return block_mask_1d(
        shape,
        mask_prob,
        block_size=1,
        mask_adjust=0.0,
        padding_mask=padding_mask,
        require_same_masks=require_same_masks,
        generator=generator,
        device=device,
    )


# ---------------------------------------------------------------------------------------------
# dispatch


def compute_mask(
    cfg: MaskingConfig,
    shape: tuple[int, int],
    *,
    grid: tuple[int, int] | None = None,
    padding_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw a ``(batch, tokens)`` mask of ``cfg.kind`` (not ``token``: see ``mask_tokens``)."""
    kind = cfg.kind
    if kind == "span":
        return span_mask(
            shape,
            cfg.mask_prob,
            cfg.mask_length,
            min_masks=cfg.min_masks,
            padding_mask=padding_mask,
            require_same_masks=cfg.require_same_masks,
            generator=generator,
            device=device,
        )
    if kind == "block_1d":
        return block_mask_1d(
            shape,
            cfg.mask_prob,
            block_size=cfg.block_size,
            mask_adjust=cfg.mask_adjust,
            padding_mask=padding_mask,
            require_same_masks=cfg.require_same_masks,
            generator=generator,
            device=device,
        )
    if kind == "random":
        return random_mask(
            shape,
            cfg.mask_prob,
            padding_mask=padding_mask,
            require_same_masks=cfg.require_same_masks,
            generator=generator,
            device=device,
        )
    if kind in ("block", "inverse_block"):
        if grid is None or grid[0] * grid[1] != shape[1]:
            raise ValueError(f"{kind} masking needs a patch grid matching {shape[1]} tokens, got {grid}")
        if kind == "inverse_block":
            return inverse_block_mask_2d(
                shape[0],
                grid,
                cfg.mask_prob,
                block_size=cfg.block_size,
                mask_adjust=cfg.mask_adjust,
                generator=generator,
                device=device,
            )
        n = grid[0] * grid[1]
        num = cfg.num_mask_patches if cfg.num_mask_patches is not None else int(round(cfg.mask_ratio * n))
        return block_mask_2d(
            shape[0],
            grid,
            num,
            min_num_patches=cfg.min_num_patches,
            max_num_patches=cfg.max_num_patches,
            min_aspect=cfg.min_aspect,
            max_aspect=cfg.max_aspect,
            max_attempts=cfg.max_attempts,
            generator=generator,
            device=device,
        )
    raise ValueError(f"bad value for 'masking.kind': {kind!r}; valid choices: {', '.join(MASK_KINDS)}")
