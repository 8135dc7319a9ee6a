"""Length-bucketed batch sampler with a `max_tokens` budget (fairseq-style dynamic batching).

Why: audio utterances vary from 0.5 s to 20 s; fixed-size batches either waste compute on padding or
run out of memory on long files. Batching items of similar length under a budget of
`batch_size * longest_length <= max_tokens` keeps memory flat and padding small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


class IndexBatch(list):
    """A list of dataset indices that also carries a seed, so per-batch random choices (crops) are
    reproducible whatever the number of workers."""

    seed: int = 0


class LengthBucketBatchSampler(BatchSampler):
    """Batches of similar-length items, each batch costing at most `max_tokens` (count x longest).

    - Seeded: order depends only on (`seed`, epoch); call `set_epoch` (Lightning does) to reshuffle.
    - DDP-aware: every rank builds the same batches and takes `batches[rank::world]`. Training drops
      the last `len % world` batches (a different few each epoch) so shards stay disjoint and equal;
      evaluation (`shuffle=False`) repeats the first batches instead, so every item is seen.
    - Works with Lightning's sampler injection: when Lightning re-creates this sampler with a
      `DistributedSampler` as `sampler`, rank and world size are taken from it.
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        *,
        lengths: Sequence[int],
        max_tokens: int,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        too_long = [n for n in lengths if n > max_tokens]
        if too_long:
            raise ValueError(
                f"{len(too_long)} items are longer than max_tokens={max_tokens} (longest {max(too_long)}); "
                "raise data.max_tokens or lower data.max_sample_size"
            )
        if isinstance(sampler, DistributedSampler):
            num_replicas = sampler.num_replicas if num_replicas is None else num_replicas
            rank = sampler.rank if rank is None else rank
        self.sampler = sampler
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.max_tokens = int(max_tokens)
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._num_replicas = num_replicas
        self._rank = rank
        self.drop_last = drop_last
        self.batch_size = max_batch_size or 1  # informational; Lightning looks for the attribute
        self.epoch = 0
        self._total: int | None = None

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self) -> list[IndexBatch]:
        """The epoch's batches over all ranks (same on every rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.lengths)
        # sort by length, ties broken randomly (so equal-length items mix across epochs)
        tiebreak = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = tiebreak[torch.argsort(self.lengths[tiebreak], stable=True)].tolist()
        batches: list[IndexBatch] = []
        current: list[int] = []
        longest = 0
        for idx in order:  # lengths ascending: the newest item is always the longest
            length = int(self.lengths[idx])
            full = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and (full or (len(current) + 1) * max(longest, length) > self.max_tokens):
                batches.append(IndexBatch(current))
                current, longest = [], 0
            current.append(idx)
            longest = max(longest, length)
        if current:
            batches.append(IndexBatch(current))
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        for b, batch in enumerate(batches):
            batch.seed = (self.seed * 1_000_003 + self.epoch) * 100_003 + b
        return batches

    def _shard(self, batches: list[IndexBatch]) -> list[IndexBatch]:
        world, rank = self.num_replicas, self.rank
        if world == 1:
            return batches
        if self.shuffle or self.drop_last:  # training: drop the uneven tail (disjoint shards)
            batches = batches[: len(batches) - len(batches) % world]
        elif len(batches) % world:  # evaluation: repeat the first batches (everything seen)
            extra = world - len(batches) % world
            batches = batches + batches[:extra]
        return batches[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._shard(self.all_batches()))

    def __len__(self) -> int:
        # the batch count does not depend on the epoch (greedy packing of the same sorted lengths)
        if self._total is None:
            self._total = len(self.all_batches())
        world = self.num_replicas
        if world == 1:
            return self._total
        if self.shuffle or self.drop_last:
            return self._total // world
        return -(-self._total // world)

    def efficiency(self) -> float:
        """Real samples / padded samples over one epoch (1.0 = no padding)."""
        real = padded = 0
        for batch in self.all_batches():
            lens = self.lengths[batch]
            real += int(lens.sum())
            padded += int(lens.max()) * len(batch)
        return real / max(padded, 1)
