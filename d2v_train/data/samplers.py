"""Batch samplers whose epochs are pure functions of (seed, epoch), and can resume mid-epoch.

- `EpochBatchSampler`: fixed-size shuffled batches (images, text).
- `LengthBucketBatchSampler`: length-bucketed batches under a `max_tokens` budget (fairseq-style
  dynamic batching, audio). Why: utterances vary from 0.5 s to 20 s; fixed-size batches either waste
  compute on padding or run out of memory on long files. Batching items of similar length under a
  budget of `batch_size * longest_length <= max_tokens` keeps memory flat and padding small.

Both yield `IndexBatch`es: index lists carrying a per-batch seed that the datasets use for every
random choice (audio crops, image augmentations), so a batch's content depends only on
(seed, epoch, batch number), whatever the number of workers and wherever a run was resumed.
They are iterated in the main process (DataLoader workers only receive the index lists), so
`resume_at(epoch, n)` skips the first `n` batches of that epoch without loading any item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Combine integers into one well-spread 63-bit seed (splitmix64 steps; stable across runs)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class IndexBatch(list):
    """A list of dataset indices that also carries a seed, so per-batch random choices (crops,
    augmentations) are reproducible whatever the number of workers (it pickles with its seed)."""

    seed: int = 0


class EpochClock(Sampler[int]):
    """Stand-in `sampler` of our batch samplers. Lightning's `_set_sampler_epoch` calls
    `dataloader.batch_sampler.sampler.set_epoch(epoch)` (never the batch sampler's own `set_epoch`),
    so this is where the epoch arrives. Under DDP Lightning injects a `DistributedSampler` in its
    place, whose `epoch` is read the same way. It is never iterated."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


class ResumableBatchSampler(BatchSampler):
    """Shared epoch, DDP-sharding and resume logic; subclasses define `all_batches()` and `_total()`.

    - Seeded: an epoch's batches depend only on (`seed`, epoch).
    - DDP-aware: every rank builds the same batches and takes `batches[rank::world]`. Training drops
      the last `len % world` batches (a different few each epoch) so shards stay disjoint and equal;
      evaluation (`shuffle=False`) repeats the first batches instead, so every item is seen.
    - Works with Lightning's sampler injection: when Lightning re-creates the sampler with a
      `DistributedSampler` as `sampler`, rank, world size and epoch are taken from it.
    - `resume_at(epoch, n)`: iterations of that epoch start at its batch `n` until `clear_resume()`
      (the loader clears it once its iterator exists); `last_start` says where the latest iteration
      started (the loader counts from there).
    """

    def _init_common(
        self, sampler: Sampler | None, shuffle: bool, seed: int, num_replicas: int | None, rank: int | None, drop_last: bool
    ) -> None:
        if isinstance(sampler, DistributedSampler):
            num_replicas = sampler.num_replicas if num_replicas is None else num_replicas
            rank = sampler.rank if rank is None else rank
        self.sampler = sampler if sampler is not None else EpochClock()
        self.shuffle = shuffle
        self.seed = seed
        self._num_replicas = num_replicas
        self._rank = rank
        self.drop_last = drop_last
        self._resume: tuple[int, int] | None = None
        self.last_start = 0
        self.last_epoch = 0

    # -- epoch -----------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration of `epoch` skip its first `batches_done` batches (this rank's)."""
        self.set_epoch(epoch)
        self._resume = (int(epoch), max(0, int(batches_done)))

    def pending_resume(self) -> tuple[int, int] | None:
        return self._resume

    def clear_resume(self) -> None:
        self._resume = None

    def epoch_seed(self) -> int:
        return mix_seed(self.seed, self.epoch)

    # -- ranks -----------------------------------------------------------------------------------

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

    # -- batches ---------------------------------------------------------------------------------

    def all_batches(self) -> list[IndexBatch]:  # pragma: no cover
        """The epoch's batches over all ranks (same on every rank), seeds attached."""
        raise NotImplementedError

    def _total(self) -> int:  # pragma: no cover
        """Number of batches of an epoch over all ranks (must not depend on the epoch)."""
        raise NotImplementedError

    def _attach_seeds(self, batches: list[IndexBatch]) -> list[IndexBatch]:
        base = self.epoch_seed()
        for b, batch in enumerate(batches):
            batch.seed = mix_seed(base, b)
        return batches

    def epoch_batches(self) -> list[IndexBatch]:
        """This rank's batches of the current epoch."""
        return self._shard(self.all_batches())

    def __iter__(self) -> Iterator[list[int]]:
        # eager (not a generator): DataLoader calls iter() when its iterator is created, so the
        # epoch and the skip are fixed then, with or without workers
        # the skip stays pending until `clear_resume()`: DataLoader's multi-process iterator calls
        # iter() twice while it starts (once in the base class, once in `_reset`)
        batches = self.epoch_batches()
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = min(self._resume[1], len(batches))
        self.last_epoch, self.last_start = self.epoch, start
        return iter(batches[start:])

    def __len__(self) -> int:
        total, world = self._total(), self.num_replicas
        if world == 1:
            return total
        if self.shuffle or self.drop_last:
            return total // world
        return -(-total // world)


class EpochBatchSampler(ResumableBatchSampler):
    """Fixed-size batches of a shuffled (per (seed, epoch)) or sequential order of `num_items`."""

    def __init__(
        self,
        sampler: Sampler | None = None,
        *,
        num_items: int,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._init_common(sampler, shuffle, seed, num_replicas, rank, drop_last)
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)

    def _total(self) -> int:
        n, bs = self.num_items, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def all_batches(self) -> list[IndexBatch]:
        n, bs = self.num_items, self.batch_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.epoch_seed())
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        batches = [IndexBatch(order[i : i + bs]) for i in range(0, n, bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return self._attach_seeds(batches)


class LengthBucketBatchSampler(ResumableBatchSampler):
    """Batches of similar-length items, each batch costing at most `max_tokens` (count x longest)."""

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
        self._init_common(sampler, shuffle, seed, num_replicas, rank, drop_last)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.max_tokens = int(max_tokens)
        self.max_batch_size = max_batch_size
        self.batch_size = max_batch_size or 1  # informational; Lightning looks for the attribute
        self._total_cache: int | None = None

    def all_batches(self) -> list[IndexBatch]:
        g = torch.Generator().manual_seed(self.epoch_seed())
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
        return self._attach_seeds(batches)

    def _total(self) -> int:
        # the batch count does not depend on the epoch (greedy packing of the same sorted lengths)
        if self._total_cache is None:
            self._total_cache = len(self.all_batches())
        return self._total_cache

    def efficiency(self) -> float:
        """Real samples / padded samples over one epoch (1.0 = no padding)."""
        real = padded = 0
        for batch in self.all_batches():
            lens = self.lengths[batch]
            real += int(lens.sum())
            padded += int(lens.max()) * len(batch)
        return real / max(padded, 1)
