"""Shared pieces of the data modules: errors, skip accounting, progress bars, splits, loaders.

Bad input is either a clear error before training starts or a *counted skip*: every skipped file is
logged once with its reason and counted, so `skip_counts()` can go into the run's metrics, and
`strict=True` turns any skip into an error that names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from d2v_train.data.resumable import ResumableDataLoader
from d2v_train.data.samplers import EpochBatchSampler, ResumableBatchSampler

log = logging.getLogger("d2v_train.data")

T = TypeVar("T")

# Reasons a file (or row) can be skipped. A fixed list so that skips found inside DataLoader workers
# can be recorded in a small shared-memory tensor (one code per item) and summed in the main process.
SKIP_REASONS: tuple[str, ...] = (
    "unreadable",  # decoder raised (corrupt / truncated / not that format)
    "empty",  # zero-length audio, empty text file
    "too_short",  # shorter than min_sample_size (at least the CNN's receptive field)
    "too_long",  # longer than max_length
    "non_finite",  # NaN or inf samples
    "missing",  # a manifest line (or dataset row) names a file that does not exist
    "invalid_utf8",  # text that is not UTF-8
    "not_an_image",  # PIL cannot identify / verify the file
    "bad_label",  # a transcript or label that is missing or empty
)


class DataError(RuntimeError):
    """A data problem reported to the user before (or instead of) training."""


class SkipItem(Exception):
    """Raised by loaders to say "skip this item" with one of `SKIP_REASONS` and a human detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipTracker:
    """Counts skipped files per reason, logs each file once, and enforces strict mode.

    Two kinds of skips:
    - found while scanning (main process): `skip(name, reason, detail)`;
    - found while decoding inside a worker: `skip_item(index, name, reason, detail)` writes the reason
      code into a shared-memory tensor with one slot per item, so counts survive worker processes and
      a file that keeps failing every epoch is still logged and counted once.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.scan_counts: Counter[str] = Counter()
        self.events: list[tuple[str, str, str]] = []  # (file, reason, detail) of scan-time skips
        self.item_codes: torch.Tensor = torch.zeros(0, dtype=torch.int8)

    def attach(self, num_items: int) -> None:
        """Allocate the shared per-item slots (call once the item list is final)."""
        self.item_codes = torch.zeros(num_items, dtype=torch.int8).share_memory_()

    def skip(self, name: str, reason: str, detail: str) -> None:
        """Record a skip found while scanning; raise in strict mode."""
        self._raise_if_strict(name, reason, detail)
        self.scan_counts[reason] += 1
        self.events.append((name, reason, detail))
        log.warning("skipping %s (%s): %s", name, reason, detail)

    def skip_item(self, index: int, name: str, reason: str, detail: str) -> None:
        """Record a skip found at load time (in any process); logged and counted once per item."""
        self._raise_if_strict(name, reason, detail)
        if 0 <= index < len(self.item_codes) and int(self.item_codes[index]) == 0:
            self.item_codes[index] = SKIP_REASONS.index(reason) + 1
            log.warning("skipping %s (%s): %s", name, reason, detail)

    def is_skipped(self, index: int) -> bool:
        return 0 <= index < len(self.item_codes) and int(self.item_codes[index]) != 0

    def counts(self) -> dict[str, int]:
        """reason -> number of files skipped (scan + load time)."""
        total = Counter(self.scan_counts)
        if len(self.item_codes):
            codes = torch.bincount(self.item_codes.long(), minlength=len(SKIP_REASONS) + 1)
            for code, n in enumerate(codes.tolist()[1:]):
                if n:
                    total[SKIP_REASONS[code]] += n
        return dict(total)

    def _raise_if_strict(self, name: str, reason: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"{name}: {reason}: {detail} (data.strict=true turns skips into errors)")


def merge_counts(*trackers: SkipTracker) -> dict[str, int]:
    total: Counter[str] = Counter()
    for t in trackers:
        total.update(t.counts())
    return dict(total)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar that only appears when the work takes more than a couple of seconds."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, delay=2.0, leave=False, dynamic_ncols=True)


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val index split (at least one train item; val may be empty)."""
    if n == 0:
        return [], []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(int(round(n * val_fraction)), n - 1) if val_fraction > 0 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (cache keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def file_signature(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) for each file: a cheap cache key that changes when files change."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def default_cache_dir(kind: str) -> Path:
    """Where prepared data (tokenizers, tokenized text, synthesised speech) is cached."""
    base = os.environ.get("D2V_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "d2v_train"
    )
    return Path(base) / kind


def no_usable_files(where: str | Path, looked_for: Sequence[str], counts: dict[str, int]) -> DataError:
    skipped = f"; skipped: {counts}" if counts else ""
    return DataError(
        f"no usable files in {where} (looked for {', '.join(looked_for)}){skipped}. "
        "Set data.path to a folder, file, manifest or saved `datasets` directory with usable data."
    )


@dataclass
class ProbeSets:
    """Labelled data a frozen encoder is judged on (linear probe, kNN), separate from the
    pretraining stream: pretraining data need not carry labels (text blocks, audio crops).

    ``train`` / ``val`` yield dicts with ``inputs`` and an int ``labels`` (class index);
    ``collate_fn`` batches them like the module's own loader (adds ``padding_mask`` where needed).
    Where a nuisance factor exists (a voice, a writer), ``val`` should hold values of it that ``train``
    lacks, so a probe cannot score by recognising it.
    """

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]]
    class_names: list[str] | None = None


class BaseDataModule(L.LightningDataModule):
    """Loader settings and skip accounting shared by every data module.

    Subclasses build `self.train_set` / `self.val_set` in `setup()` and may override
    `_loader(dataset, train)` (e.g. to plug in a length-bucketed batch sampler).
    """

    modality: str = ""

    def __init__(
        self,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.strict = strict
        self.seed = seed
        self.skips = SkipTracker(strict)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._restored_skips: dict[str, Any] = {}

    def skip_counts(self) -> dict[str, int]:
        """reason -> files skipped, over scanning and loading (for the run's metrics)."""
        self._apply_restored_skips()
        trackers = [self.skips]
        for ds in (self.train_set, self.val_set):
            t = getattr(ds, "skips", None)
            if t is not None and t is not self.skips:
                trackers.append(t)
        return merge_counts(*trackers)

    def probe_sets(self) -> ProbeSets | None:
        """The labelled task this data's encoder is probed on (online probe, end-of-run check,
        `d2v-eval`), or None when the data module has none."""
        return None

    def loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def world(self) -> tuple[int | None, int | None]:
        """(world size, rank) of the attached trainer, or (None, None) to ask torch.distributed."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None, None
        return trainer.world_size, trainer.global_rank

    def batch_sampler(self, dataset: Any, train: bool) -> ResumableBatchSampler:
        """Fixed-size batches, shuffled per (seed, epoch) when training."""
        world, rank = self.world()
        return EpochBatchSampler(
            None,
            num_items=len(dataset),
            batch_size=self.batch_size,
            shuffle=train,
            # The uneven tail is dropped only where it is a small share of an epoch: 100 few-label
            # images in batches of 64 would otherwise leave 36 of them out of every epoch.
            drop_last=train and len(dataset) >= 10 * self.batch_size,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """Training: a `ResumableDataLoader` (exact resume of order and position); evaluation: a plain
        DataLoader. Both carry their own generator, so loading never draws from the global RNG."""
        cls = ResumableDataLoader if train else DataLoader
        return cls(
            dataset,
            batch_sampler=self.batch_sampler(dataset, train),
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
            **self.loader_kwargs(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        self._apply_restored_skips()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None and self.train_set is None:
            self.setup("fit")
        self._apply_restored_skips()
        if self.val_set is None or len(self.val_set) == 0:  # type: ignore[arg-type]
            return []
        return self._loader(self.val_set, train=False)

    # -- checkpoint state (LightningDataModule.state_dict / load_state_dict) ------------------------
    # The loader's position lives in the fit loop's state (see `resumable.py`); the module keeps the
    # files found broken while decoding, so a resumed run neither re-reads them nor loses the count.

    def state_dict(self) -> dict[str, Any]:
        self._apply_restored_skips()
        skipped: dict[str, list[list[str]]] = {}
        for split, ds in (("train", self.train_set), ("val", self.val_set)):
            tracker, name = getattr(ds, "skips", None), getattr(ds, "name", None)
            if tracker is None or name is None or not len(tracker.item_codes):
                continue
            codes = tracker.item_codes
            hits = torch.nonzero(codes).flatten().tolist()
            skipped[split] = [[name(i), SKIP_REASONS[int(codes[i]) - 1]] for i in hits]
        return {"version": 1, "skipped_items": skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_skips = dict(state_dict.get("skipped_items") or {})
        self._apply_restored_skips()

    def _apply_restored_skips(self) -> None:
        pending = getattr(self, "_restored_skips", None)
        if not pending:
            return
        for split, ds in (("train", self.train_set), ("val", self.val_set)):
            entries = pending.get(split)
            tracker, name = getattr(ds, "skips", None), getattr(ds, "name", None)
            if not entries or tracker is None or name is None or not len(tracker.item_codes):
                continue
            reasons = {n: r for n, r in entries}
            restored = 0
            for i in range(len(tracker.item_codes)):
                reason = reasons.get(name(i))
                if reason in SKIP_REASONS and int(tracker.item_codes[i]) == 0:
                    tracker.item_codes[i] = SKIP_REASONS.index(reason) + 1
                    restored += 1
            if restored:
                log.info("data: %d %s files skipped before the checkpoint stay skipped", restored, split)
            pending.pop(split)


class SafeDataset(Dataset):
    """A map-style dataset whose items may fail to load: failures become counted skips.

    Subclasses implement `load(index) -> dict` (raising `SkipItem`) and `name(index)`.
    `__getitems__` (used by DataLoader for whole batches) drops failed items, and only when every item
    of a batch failed does it walk forward to the next loadable item, so a batch is never empty.
    """

    def __init__(self, skips: SkipTracker) -> None:
        self.skips = skips

    def __len__(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def name(self, index: int) -> str:  # pragma: no cover
        raise NotImplementedError

    def load(self, index: int) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def try_load(self, index: int) -> dict[str, Any] | None:
        if self.skips.is_skipped(index):
            return None
        try:
            return self.load(index)
        except SkipItem as e:
            self.skips.skip_item(index, self.name(index), e.reason, e.detail)
        except DataError:
            raise
        except Exception as e:  # any decoder failure is a skip, never a dead worker
            self.skips.skip_item(index, self.name(index), "unreadable", f"{type(e).__name__}: {e}")
        return None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.try_load(index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items = [it for it in (self.try_load(int(i)) for i in indices) if it is not None]
        if not items:
            items = [self._first_loadable_after(int(indices[0]) if len(indices) else 0)]
        return items

    def _first_loadable_after(self, index: int) -> dict[str, Any]:
        n = len(self)
        for step in range(1, n + 1):
            item = self.try_load((index + step) % n)
            if item is not None:
                return item
        raise DataError(f"every item of this dataset failed to load; skipped: {self.skips.counts()}")
