"""Exact resume of data order and position (Lightning's `_Stateful` dataloader protocol).

`ResumableDataLoader` is the training DataLoader of every data module. It implements
`state_dict()` / `load_state_dict()`, so Lightning's fit loop stores its state in the checkpoint
(`loops.fit_loop.state_dict.combined_loader`) and hands it back on resume, before it creates the
first iterator (`FitLoop.setup_data` -> `CombinedLoader._load_state_dicts` -> `iter()`).

The state is `{"epoch", "batches"}`: the epoch of the current iteration and how many batches of it
were *delivered to the main process* (not how far workers prefetched). On resume the batch sampler
skips that many index batches (nothing is loaded for them) and the rest of the epoch is identical to
the uninterrupted run: the epoch's order is a function of (seed, epoch) and every random choice in a
batch (crops, augmentations) comes from the batch's own seed (`samplers.IndexBatch`).

Epochs: Lightning calls `set_epoch` on `dataloader.batch_sampler.sampler` (our `EpochClock`, or the
`DistributedSampler` it injects under DDP) at the start of every epoch. After a resume Lightning keeps
the iterator it created before that call; if the epoch it then announces differs from the restored
one (a checkpoint taken on an epoch's last batch, or with `limit_train_batches`), the stale iterator
is dropped and the announced epoch starts from its first batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader

from d2v_train.data.samplers import ResumableBatchSampler, mix_seed

log = logging.getLogger("d2v_train.data")

STATE_VERSION = 1


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableBatchSampler` whose epoch and position survive a checkpoint.

    Takes exactly DataLoader's arguments (Lightning re-creates it with them under DDP); a
    `generator` is required so that creating iterators never draws from the global torch RNG (it is
    re-seeded from (seed, epoch) at every iteration, which also fixes the workers' base seed).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableBatchSampler, got {type(self.batch_sampler).__name__}")
        if self.generator is None:
            raise TypeError("ResumableDataLoader needs a `generator` (keeps the global torch RNG untouched)")
        self._epoch = self.batch_sampler.epoch
        self._delivered = 0

    @property
    def _bs(self) -> ResumableBatchSampler:
        return self.batch_sampler  # type: ignore[return-value]

    def _start(self) -> Iterator[Any]:
        bs = self._bs
        self.generator.manual_seed(mix_seed(bs.seed, bs.epoch, 0x5EED))  # type: ignore[union-attr]
        it = super().__iter__()  # calls iter(batch_sampler): epoch and skip are fixed here
        bs.clear_resume()
        self._epoch, self._delivered = bs.last_epoch, bs.last_start
        if self._delivered:
            log.info("data: resuming epoch %d at batch %d of %d", self._epoch, self._delivered, len(self))
        return it

    def __iter__(self) -> Iterator[Any]:
        return self._counting(self._start())

    def _counting(self, it: Iterator[Any]) -> Iterator[Any]:
        bs = self._bs
        while True:
            if bs.epoch != self._epoch and bs.pending_resume() is None:
                # the epoch moved on after this iterator was made (see the module docstring)
                it = self._start()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._delivered += 1
            yield batch

    # -- Lightning's `_Stateful` protocol ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        pending = self._bs.pending_resume()
        epoch, batches = pending if pending is not None else (self._epoch, self._delivered)
        return {"version": STATE_VERSION, "epoch": int(epoch), "batches": int(batches), "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        total = len(self)
        saved_total = state.get("num_batches")
        if saved_total is not None and int(saved_total) != total:
            log.warning(
                "data: the checkpoint's epoch had %s batches, this data has %d (data or batch settings "
                "changed?); resuming at batch %d of epoch %d anyway, the order will differ",
                saved_total, total, batches, epoch,
            )  # fmt: skip
        if batches >= total:  # the epoch was finished: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self._bs.resume_at(epoch, batches)
        self._epoch, self._delivered = epoch, batches


@contextmanager
def cpu_rng_restored() -> Iterator[None]:
    """Run code that reseeds the global CPU generator (e.g. torchvision transforms, which take no
    generator) and put the generator back afterwards, so the caller's random stream is untouched.
    Only the CPU generator is touched: `torch.default_generator.manual_seed`, not `torch.manual_seed`
    (which would also reseed CUDA)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def seed_cpu_rng(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
