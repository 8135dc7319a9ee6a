"""Skip accounting, strict mode and the length-bucketed batch sampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from d2v_train.data import DataError, LengthBucketBatchSampler, SkipTracker
from d2v_train.data.common import SafeDataset, SkipItem, seeded_split


def lengths_fixture(n: int = 500, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(400, 50_000, (n,), generator=g).tolist()


def test_bucket_budget_respected_and_every_item_once() -> None:
    lengths = lengths_fixture()
    s = LengthBucketBatchSampler(lengths=lengths, max_tokens=120_000, seed=1)
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 120_000
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert s.efficiency() > 0.9, s.efficiency()  # buckets of similar lengths: little padding


def test_bucket_max_batch_size_and_too_long_item() -> None:
    lengths = [100] * 50
    s = LengthBucketBatchSampler(lengths=lengths, max_tokens=10_000, max_batch_size=8)
    assert max(len(b) for b in s) == 8
    with pytest.raises(ValueError, match="max_tokens"):
        LengthBucketBatchSampler(lengths=[10, 20_000], max_tokens=10_000)


def test_bucket_seeded_and_reshuffled_per_epoch() -> None:
    lengths = lengths_fixture()
    a = LengthBucketBatchSampler(lengths=lengths, max_tokens=100_000, seed=3)
    b = LengthBucketBatchSampler(lengths=lengths, max_tokens=100_000, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert len(list(a)) == len(first)


@pytest.mark.parametrize("world", [2, 3])
def test_bucket_ddp_shards_disjoint_and_equal(world: int) -> None:
    lengths = lengths_fixture(301)
    shards = [list(LengthBucketBatchSampler(lengths=lengths, max_tokens=80_000, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))  # disjoint
    everything = LengthBucketBatchSampler(lengths=lengths, max_tokens=80_000, seed=5).all_batches()
    assert len(everything) - len(shards[0]) * world < world  # at most world-1 batches dropped


def test_bucket_eval_ddp_sees_everything() -> None:
    lengths = lengths_fixture(101)
    shards = [list(LengthBucketBatchSampler(lengths=lengths, max_tokens=80_000, shuffle=False, num_replicas=2, rank=r)) for r in range(2)]
    assert set(i for s in shards for b in s for i in b) == set(range(101))


def test_bucket_takes_rank_from_lightning_distributed_sampler() -> None:
    ds = list(range(10))
    s = LengthBucketBatchSampler(DistributedSampler(ds, num_replicas=4, rank=3), lengths=[5] * 10, max_tokens=10)
    assert (s.num_replicas, s.rank) == (4, 3)


class Flaky(SafeDataset):
    """Odd items fail to load."""

    def __init__(self, n: int, strict: bool = False) -> None:
        super().__init__(SkipTracker(strict))
        self.skips.attach(n)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return f"file{index}.wav"

    def load(self, index: int) -> dict:
        if index % 2:
            raise SkipItem("non_finite", "NaN samples")
        if index == 4:
            raise ValueError("decoder exploded")
        return {"inputs": torch.tensor([float(index)])}


@pytest.mark.parametrize("workers", [0, 2])
def test_runtime_skips_counted_once_across_workers_and_epochs(workers: int) -> None:
    ds = Flaky(20)
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=lambda items: items)
    for _ in range(2):  # the same bad files fail again in epoch 2: still counted once
        got = [it["inputs"].item() for batch in loader for it in batch]
    assert 4.0 not in got and all(v % 2 == 0 for v in got)
    assert ds.skips.counts() == {"non_finite": 10, "unreadable": 1}


def test_all_failed_batch_walks_to_next_good_item() -> None:
    ds = Flaky(20)
    assert [it["inputs"].item() for it in ds.__getitems__([1, 3])] == [2.0]


def test_strict_turns_skip_into_error_naming_file() -> None:
    ds = Flaky(4, strict=True)
    with pytest.raises(DataError, match=r"file1\.wav: non_finite"):
        ds.__getitems__([0, 1])
    t = SkipTracker(strict=True)
    with pytest.raises(DataError, match="bad.wav"):
        t.skip("bad.wav", "unreadable", "header")


def test_seeded_split() -> None:
    assert seeded_split(10, 0.2, 0) == seeded_split(10, 0.2, 0)
    tr, va = seeded_split(10, 0.2, 0)
    assert len(va) == 2 and not set(tr) & set(va)
    assert seeded_split(1, 0.5, 0) == ([0], [])


def test_few_label_training_uses_every_label() -> None:
    """10 labels per class in batches of 64: both batches (64 + 36) are served, no image sits out."""
    from d2v_train.data import DigitsDataModule

    dm = DigitsDataModule(labels_per_class=10, batch_size=64, image_size=8)
    dm.setup("fit")
    sizes = [len(b["labels"]) for b in dm.train_dataloader()]
    assert sorted(sizes) == [36, 64]
    full = DigitsDataModule(batch_size=64, image_size=8)
    full.setup("fit")
    assert all(len(b["labels"]) == 64 for b in full.train_dataloader())  # a small tail is still dropped
