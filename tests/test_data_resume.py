"""Exact resume of data order and position: 2N steps straight == N steps + checkpoint + resume + N.

A tiny LightningModule records a hash of every batch it trains on (inputs, padding mask, labels);
the resumed run must see exactly the batches of steps N+1..2N of the straight run (same items,
same crops / augmentations), with and without worker processes, across epoch boundaries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from d2v_train.data import (
    AudioDataModule,
    DigitsDataModule,
    DocstringsDataModule,
    EpochBatchSampler,
    ImageDataModule,
    LengthBucketBatchSampler,
    ResumableDataLoader,
)


def batch_hash(batch: dict[str, Any]) -> str:
    h = hashlib.sha1()
    for key in ("inputs", "padding_mask", "labels"):
        value = batch.get(key)
        h.update(key.encode())
        if value is not None:
            h.update(str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Recorder(L.LightningModule):
    """One weight, SGD with momentum (so optimizer state matters); records each batch's hash."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append((self.global_step, batch_hash(batch)))
        torch.rand(3)  # like masking / dropout: the model's steps advance the global RNG
        x = batch["inputs"].float()
        return (self.w * (x / (1.0 + x.abs().max())).mean() - 1.0) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def trainer(max_steps: int, callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks or [],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def straight_and_resumed(make_dm: Any, n: int, tmp_path: Path, **trainer_kwargs: Any) -> tuple[Recorder, Recorder, Path]:
    straight = Recorder()
    trainer(2 * n, **trainer_kwargs).fit(straight, datamodule=make_dm())
    assert [s for s, _ in straight.seen] == list(range(2 * n))

    ckpt_dir = tmp_path / "ckpt"
    first = Recorder()
    save = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=n, save_top_k=-1, filename="{step}")
    trainer(n, [save], **trainer_kwargs).fit(first, datamodule=make_dm())
    ckpt = ckpt_dir / f"step={n}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in ckpt_dir.iterdir())
    assert first.seen == straight.seen[:n]

    resumed = Recorder()
    trainer(2 * n, **trainer_kwargs).fit(resumed, datamodule=make_dm(), ckpt_path=str(ckpt), weights_only=True)
    return straight, resumed, ckpt


def check_resume(make_dm: Any, n: int, tmp_path: Path, **trainer_kwargs: Any) -> dict[str, Any]:
    straight, resumed, ckpt = straight_and_resumed(make_dm, n, tmp_path, **trainer_kwargs)
    assert [s for s, _ in resumed.seen] == list(range(n, 2 * n))
    assert resumed.seen == straight.seen[n:], "resumed run saw different batches"
    assert torch.isfinite(straight.w) and torch.equal(resumed.w.detach(), straight.w.detach())
    state = torch.load(ckpt, weights_only=True)
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return loader_state


def epoch_hashes(seen: list[tuple[int, str]], per_epoch: int) -> list[list[str]]:
    hashes = [h for _, h in seen]
    return [hashes[i : i + per_epoch] for i in range(0, len(hashes), per_epoch)]


# ------------------------------------------------------------------------------------------ data


def write_digit_pngs(root: Path, count: int = 48) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        img = (digits.images[i] * 15).astype(np.uint8)
        folder = root / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").resize((16, 16)).save(folder / f"{i}.png")
    return root


def write_wavs(root: Path, count: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        n = 800 + 150 * i
        sf.write(str(root / f"{i:02d}.wav"), (rng.standard_normal(n) * 0.1).astype(np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def docstrings_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("docstrings")
    make_docstrings(cache, 0)().setup()  # build the corpus, tokenizer and blocks once
    return cache


def make_docstrings(cache: Path, workers: int) -> Any:
    return lambda: DocstringsDataModule(
        max_files=2, cache_dir=str(cache), vocab_size=512, max_length=32, batch_size=8, val_fraction=0.0, num_workers=workers
    )


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_augmentations_resume_exactly(tmp_path: Path, workers: int) -> None:
    """v1 recipe (random resized crop, flip, colour jitter) from PNGs; 12 batches an epoch, the
    checkpoint at step 8 (mid-epoch), the resumed run crosses into epoch 1."""
    root = write_digit_pngs(tmp_path / "imgs")

    def make() -> DigitsDataModule:
        return DigitsDataModule(path=str(root), image_size=16, recipe="v1", val_fraction=0.0, batch_size=4, num_workers=workers, seed=3)

    state = check_resume(make, 8, tmp_path)
    assert (state["epoch"], state["batches"], state["num_batches"]) == (0, 8, 12)


def test_image_augmentations_differ_between_epochs_and_keep_global_rng(tmp_path: Path) -> None:
    root = write_digit_pngs(tmp_path / "imgs", count=16)
    dm = ImageDataModule(str(root), image_size=16, recipe="v1", val_fraction=0.0, batch_size=16, seed=1)
    dm.setup()
    loader = dm.train_dataloader()
    before = torch.get_rng_state()
    first = batch_hash(next(iter(loader)))
    assert torch.equal(torch.get_rng_state(), before)  # loading and augmenting left the global RNG alone
    assert batch_hash(next(iter(loader))) == first  # same epoch: same items, same augmentations
    loader.batch_sampler.sampler.set_epoch(1)  # what Lightning calls at every epoch start
    assert batch_hash(next(iter(loader))) != first


def test_image_augmentations_same_with_and_without_workers(tmp_path: Path) -> None:
    root = write_digit_pngs(tmp_path / "imgs", count=24)

    def hashes(workers: int) -> list[str]:
        dm = ImageDataModule(str(root), image_size=16, recipe="v1", val_fraction=0.0, batch_size=4, num_workers=workers, seed=6)
        dm.setup()
        loader = dm.train_dataloader()
        out = []
        for epoch in range(2):
            loader.batch_sampler.sampler.set_epoch(epoch)
            torch.rand(5)  # the main process's RNG moves on between epochs
            out += [batch_hash(b) for b in loader]
        return out

    assert hashes(0) == hashes(2)


@pytest.mark.parametrize("workers", [0, 2])
def test_digits_resume_across_epoch_boundary(tmp_path: Path, workers: int) -> None:
    """In-memory digits: 1,437 train images, 22 batches of 64 an epoch; checkpoint at step 15."""

    def make() -> DigitsDataModule:
        return DigitsDataModule(image_size=8, batch_size=64, num_workers=workers, seed=5)

    straight, resumed, _ = straight_and_resumed(make, 15, tmp_path)
    assert resumed.seen == straight.seen[15:]
    epochs = epoch_hashes(straight.seen, 22)
    assert set(epochs[0][: len(epochs[1])]) != set(epochs[1])  # Lightning's set_epoch reaches us


def test_checkpoint_on_last_batch_of_epoch(tmp_path: Path) -> None:
    """Saved on the epoch's last batch: the resumed run starts the next epoch at its first batch."""
    root = write_digit_pngs(tmp_path / "imgs")

    def make() -> DigitsDataModule:
        return DigitsDataModule(path=str(root), image_size=16, recipe="v2", val_fraction=0.0, batch_size=4, seed=2)

    state = check_resume(make, 12, tmp_path)
    assert (state["epoch"], state["batches"]) == (0, 12)


@pytest.mark.parametrize("workers", [0, 2])
def test_docstrings_text_resume(tmp_path: Path, docstrings_cache: Path, workers: int) -> None:
    """Text, with `limit_train_batches=7` so the checkpoint at step 7 ends a (limited) epoch and the
    resumed iterator must move on to epoch 1 when Lightning announces it."""
    state = check_resume(make_docstrings(docstrings_cache, workers), 7, tmp_path, limit_train_batches=7)
    assert (state["epoch"], state["batches"]) == (0, 7)


def test_docstrings_text_resume_mid_epoch(tmp_path: Path, docstrings_cache: Path) -> None:
    state = check_resume(make_docstrings(docstrings_cache, 0), 5, tmp_path)
    assert (state["epoch"], state["batches"]) == (0, 5)


@pytest.mark.parametrize("workers", [0, 2])
def test_audio_folder_crops_resume_exactly(tmp_path: Path, workers: int) -> None:
    """Random crops to 2,000 samples, length-bucketed batches; the resumed run crosses an epoch."""
    root = write_wavs(tmp_path / "wavs")

    def make() -> AudioDataModule:
        return AudioDataModule(
            str(root), val_fraction=0.0, max_sample_size=2000, max_tokens=8000, batching="crop", num_workers=workers, seed=4
        )

    dm = make()
    dm.setup()
    per_epoch = len(dm.train_dataloader())
    assert per_epoch == 6
    state = check_resume(make, 4, tmp_path)
    assert (state["epoch"], state["batches"]) == (0, 4)


def test_persistent_workers_resume(tmp_path: Path) -> None:
    root = write_wavs(tmp_path / "wavs")

    def make() -> AudioDataModule:
        return AudioDataModule(
            str(root), val_fraction=0.0, max_sample_size=1500, max_tokens=6000, num_workers=2, persistent_workers=True, seed=9
        )

    check_resume(make, 5, tmp_path, limit_train_batches=5)


# ------------------------------------------------------------------------------------ unit level


@pytest.mark.parametrize("sampler_kind", ["fixed", "bucket"])
def test_loader_state_round_trip_and_skip(sampler_kind: str) -> None:
    """The loader counts delivered batches; a fresh loader restored from that state yields the rest,
    and skipped batches are never loaded."""
    loaded: list[int] = []

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> int:
            loaded.append(i)
            return i

    def make() -> ResumableDataLoader:
        if sampler_kind == "fixed":
            bs: Any = EpochBatchSampler(num_items=40, batch_size=4, seed=1)
        else:
            bs = LengthBucketBatchSampler(lengths=[10 + i % 7 for i in range(40)], max_tokens=60, seed=1)
        return ResumableDataLoader(Items(), batch_sampler=bs, collate_fn=list, generator=torch.Generator())

    a = make()
    a.batch_sampler.sampler.set_epoch(2)
    full = [b for b in a]
    it = iter(a)
    head = [next(it) for _ in range(3)]
    state = a.state_dict()
    assert (state["epoch"], state["batches"]) == (2, 3) and head == full[:3]
    b = make()
    b.load_state_dict(state)
    assert b.state_dict()["batches"] == 3
    loaded.clear()
    assert [x for x in b] == full[3:]
    assert sorted(loaded) == sorted(i for batch in full[3:] for i in batch)  # nothing loaded for skipped ones
    finished = b.state_dict()
    c = make()
    c.load_state_dict(finished)  # a finished epoch resumes at the next one's start
    assert (c.state_dict()["epoch"], c.state_dict()["batches"]) == (3, 0)


def test_datamodule_state_keeps_files_skipped_while_decoding(tmp_path: Path) -> None:
    root = write_digit_pngs(tmp_path / "imgs", count=12)
    broken = next(root.rglob("*.png"))
    dm = ImageDataModule(str(root), image_size=16, val_fraction=0.0, batch_size=4, validate=False, seed=0)
    dm.setup()
    broken.write_bytes(broken.read_bytes()[:40])  # truncated after the scan: found while decoding
    list(dm.train_dataloader())
    counts = dm.skip_counts()
    assert sum(counts.values()) == 1
    state = dm.state_dict()
    assert state["skipped_items"]["train"] == [[str(broken), *counts]]

    again = ImageDataModule(str(root), image_size=16, val_fraction=0.0, batch_size=4, validate=False, seed=0)
    again.setup()
    again.load_state_dict(state)
    assert again.skip_counts() == counts  # before reading anything


def test_ddp_reinstantiation_keeps_resume_and_epoch() -> None:
    """Under DDP Lightning re-creates the loader and batch sampler with a DistributedSampler: the new
    loader is still resumable, rank/world come from it, and `set_epoch` on it reaches our batches."""
    from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = DigitsDataModule(image_size=8, batch_size=64, seed=1)
    dm.setup()
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    shards = []
    for rank in range(2):
        new = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=rank), mode=RunningStage.TRAINING)
        assert isinstance(new, ResumableDataLoader) and isinstance(new.batch_sampler, EpochBatchSampler)
        assert (new.batch_sampler.num_replicas, new.batch_sampler.rank) == (2, rank)
        _set_sampler_epoch(new, 3)
        assert new.batch_sampler.epoch == 3
        full = [batch_hash(b) for b in new]
        again = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=rank), mode=RunningStage.TRAINING)
        again.load_state_dict({"epoch": 3, "batches": 4})
        assert [batch_hash(b) for b in again] == full[4:]
        shards.append({i for b in new.batch_sampler for i in b})
    assert not shards[0] & shards[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_never_draws_from_the_global_rng(tmp_path: Path, docstrings_cache: Path, workers: int) -> None:
    """Data loading leaves the model's random stream alone (masks, dropout), so resuming the model's
    RNG state is enough for the model side to be exact too."""
    wavs = write_wavs(tmp_path / "wavs", count=8)
    imgs = write_digit_pngs(tmp_path / "imgs", count=8)
    modules = [
        AudioDataModule(str(wavs), val_fraction=0.25, max_sample_size=1500, max_tokens=6000, num_workers=workers),
        ImageDataModule(str(imgs), image_size=16, val_fraction=0.25, batch_size=2, num_workers=workers),
        make_docstrings(docstrings_cache, workers)(),
    ]
    for dm in modules:
        dm.setup()
        before = torch.get_rng_state()
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            for _ in zip(range(3), loader):
                pass
        assert torch.equal(torch.get_rng_state(), before), type(dm).__name__
