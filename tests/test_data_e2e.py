"""Hydra data configs compose and instantiate; data modules feed encoders and a few pretraining steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def data_config(name: str, encoder: str | None = None, **overrides) -> dict:
    root = {"data": OmegaConf.load(CONFIGS / "data" / f"{name}.yaml"), "seed": 3}
    if encoder:
        root["encoder"] = OmegaConf.load(CONFIGS / "encoder" / f"{encoder}.yaml")
    cfg = OmegaConf.create(root)
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"data.{key}", value)
    return cfg


@pytest.mark.parametrize("name", ["digits", "docstrings", "speech", "audio", "text", "image"])
def test_each_data_config_composes_on_its_own(name: str, tmp_path: Path) -> None:
    cfg = data_config(name, path=str(tmp_path))
    dm = instantiate(cfg.data)
    assert dm.seed == 3 and dm.modality in ("audio", "text", "vision")
    assert hasattr(dm, "skip_counts")


def test_data_config_follows_encoder_config() -> None:
    if not (CONFIGS / "encoder" / "vision_tiny.yaml").is_file():
        pytest.skip("encoder configs not written yet")
    cfg = data_config("image", encoder="vision_tiny", path="/x")
    assert cfg.data.image_size == cfg.encoder.image_size
    cfg = data_config("audio", encoder="audio_tiny", path="/x")
    assert list(cfg.data.conv_kernel) == list(cfg.encoder.conv_kernel)
    assert cfg.data.normalize == cfg.encoder.do_normalize


def test_user_path_on_embedded_defaults(tmp_path: Path) -> None:
    """`modality=audio data.path=/my/wavs`: the default module reads the user's data instead."""
    for i in range(3):
        sf.write(str(tmp_path / f"{i}.wav"), np.random.default_rng(i).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    dm = instantiate(data_config("speech", path=str(tmp_path), val_fraction=0.0).data)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["inputs"].shape == (3, 16000) and "labels" not in b
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("L", (20, 20), i * 40).save(tmp_path / "imgs" / f"{i}.png")
    dm = instantiate(data_config("digits", path=str(tmp_path / "imgs"), val_fraction=0.0, batch_size=2).data)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["inputs"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- through the models


def _encoder(modality: str, name: str, **changes):
    models = pytest.importorskip("d2v_train.models")
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "encoder" / f"{name}.yaml"))
    cfg.update(changes)
    return models.build_encoder(modality, cfg)


def test_digits_batches_through_vision_encoder() -> None:
    from d2v_train.data import DigitsDataModule

    dm = DigitsDataModule(image_size=32, batch_size=8)
    dm.setup()
    enc = _encoder("vision", "vision_tiny")
    out = enc(next(iter(dm.train_dataloader()))["inputs"])
    assert out.last_hidden_state.shape[0] == 8


def test_text_batches_through_text_encoder(tmp_path: Path) -> None:
    from d2v_train.data import DocstringsDataModule

    dm = DocstringsDataModule(cache_dir=str(tmp_path), max_files=10, vocab_size=600, max_length=64, batch_size=4)
    dm.setup()
    enc = _encoder("text", "text_tiny", vocab_size=dm.vocab_size, pad_token_id=dm.special_token_ids["pad"])
    b = next(iter(dm.train_dataloader()))
    assert enc(b["inputs"], padding_mask=b["padding_mask"]).last_hidden_state.shape[:2] == b["inputs"].shape


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install -y --no-install-recommends espeak-ng)")
def test_speech_batches_through_audio_encoder(tmp_path: Path) -> None:
    from d2v_train.data import SpeechDataModule

    dm = SpeechDataModule(cache_dir=str(tmp_path), words=["yes", "no"], accents=["en-us"], variants=["m1", "f1"], max_tokens=16000 * 8)
    dm.setup()
    enc = _encoder("audio", "audio_tiny")
    b = next(iter(dm.train_dataloader()))
    out = enc(b["inputs"], padding_mask=b["padding_mask"])
    assert out.last_hidden_state.shape[0] == len(b["inputs"])


def test_digits_feed_pretraining_steps() -> None:
    pretrain = pytest.importorskip("d2v_train.lightning.pretrain")
    import lightning as L

    from d2v_train.data import DigitsDataModule

    masking = OmegaConf.to_container(OmegaConf.load(CONFIGS / "masking" / "vision.yaml"))
    masking = {k: v for k, v in masking.items() if not str(k).startswith("_")}
    masking["min_num_patches"] = 4
    try:
        module = pretrain.Data2VecPretraining(_encoder("vision", "vision_tiny"), masking=masking, objective={"top_k": 2})
    except (TypeError, ValueError) as e:  # the pretraining module's interface is still moving
        pytest.skip(f"Data2VecPretraining not constructible yet: {e}")
    dm = DigitsDataModule(image_size=32, batch_size=16)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(torch.as_tensor(trainer.callback_metrics.get("train/loss", 0.0))).all()
    assert dm.skip_counts() == {}


def test_lightning_injects_ddp_rank_into_bucket_sampler(tmp_path: Path) -> None:
    """Under DDP Lightning re-creates the batch sampler with a DistributedSampler: rank must follow."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from d2v_train.data import AudioDataModule

    for i in range(8):
        sf.write(str(tmp_path / f"{i}.wav"), np.zeros(4000 + 1000 * i, np.float32) + 0.1, 16000)
    dm = AudioDataModule(str(tmp_path), val_fraction=0.0, max_tokens=12_000)
    dm.setup()
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    shards = []
    for rank in range(2):
        new = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=rank), mode=RunningStage.TRAINING)
        assert (new.batch_sampler.num_replicas, new.batch_sampler.rank) == (2, rank)
        shards.append({i for b in new.batch_sampler for i in b})
    assert not shards[0] & shards[1]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install -y --no-install-recommends espeak-ng)")
def test_speech_feeds_audio_pretraining_steps(tmp_path: Path) -> None:
    pretrain = pytest.importorskip("d2v_train.lightning.pretrain")
    import lightning as L

    from d2v_train.data import SpeechDataModule

    masking = OmegaConf.to_container(OmegaConf.load(CONFIGS / "masking" / "audio.yaml"))
    masking = {k: v for k, v in masking.items() if not str(k).startswith("_")}
    masking["mask_length"] = 5
    try:
        module = pretrain.Data2VecPretraining(_encoder("audio", "audio_tiny"), masking=masking, objective={"top_k": 2})
    except (TypeError, ValueError) as e:
        pytest.skip(f"Data2VecPretraining not constructible yet: {e}")
    dm = SpeechDataModule(cache_dir=str(tmp_path), words=["yes", "no", "stop"], accents=["en-us"], variants=["m1", "f1"],
                          labels=None, batching="crop", max_tokens=16000 * 4)  # fmt: skip
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
