"""Fine-tuning: each head family trains a few steps on small real data on CPU and its metric moves;
``pretrained=`` reads each of the three sources; recipe mechanics (layer decay, freezing, masking,
mixup) and the metrics behave as documented."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from d2v_train.cli import config_dir
from d2v_train.finetune import build, train
from d2v_train.lightning.augment import MixupConfig, channel_mask, mixup_cutmix
from d2v_train.lightning.finetune import FineTuning, layer_decay_groups
from d2v_train.lightning.metrics import CharDecoder, EqualErrorRate, SpanQA, ctc_greedy_decode
from d2v_train.lightning.optim import OptimConfig
from d2v_train.models import build_encoder
from d2v_train.models.heads import build_head

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng not installed")
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "export=false"]


def cfg_for(tmp: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("finetune", overrides=[f"run_dir={tmp}", *QUIET, *overrides])


def fit_and_compare(cfg) -> tuple[dict[str, float], dict[str, float], Any]:
    """(metrics before training, metrics after, module)."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    module, dm, trainer = build(cfg)
    before = {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}
    trainer.fit(module, datamodule=dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return before, after, module


# ------------------------------------------------------------------------------------------ heads on data


def test_digits_image_classification_learns(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, "trainer.max_epochs=4", "+trainer.limit_train_batches=15", "optim.lr=3e-3",
                  "data.batch_size=32", "encoder.num_hidden_layers=2")
    before, after, _ = fit_and_compare(cfg)
    assert after["val/acc"] > before["val/acc"] + 0.05 and after["val/loss"] < before["val/loss"], (before, after)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (tmp_path / "metrics.csv").is_file()


SPEECH = ["data.words=[yes,no,up,down]", "data.accents=[en-us,en]", "data.variants=[m1,f1]", "data.val_accents=[en-029]"]


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("speech"))


@needs_espeak
def test_speech_keyword_classification_moves(tmp_path: Path, speech_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=audio_classification", f"data.cache_dir={speech_cache}", *SPEECH,
                  "trainer.max_epochs=8", "optim.lr=3e-3", "data.max_tokens=64000")
    before, after, module = fit_and_compare(cfg)
    assert after["val/loss"] < before["val/loss"], (before, after)
    assert after["val/acc"] != before["val/acc"] or after["val/f1"] != before["val/f1"]
    assert not any(p.requires_grad for p in module.model.encoder.feature_extractor.parameters())


@needs_espeak
def test_speech_ctc_moves_and_decodes(tmp_path: Path, speech_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=ctc", f"data.cache_dir={speech_cache}", *SPEECH, "data.num_sentences=6",
                  "trainer.max_epochs=12", "optim.lr=5e-3", "finetune.mask_time_prob=0.05", "export=true")
    before, after, module = fit_and_compare(cfg)
    assert before["val/cer"] != after["val/cer"] and after["val/loss"] < before["val/loss"], (before, after)
    assert module.vocab[0] == "<blank>" and "|" in module.vocab
    # the vocabulary is saved with the model: in the checkpoint and beside the export
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["vocab"] == module.vocab


def test_xvector_skips_clips_too_short_for_its_tdnn(tmp_path: Path) -> None:
    """Clips past the CNN's receptive field but too short for the x-vector's TDNN and statistics
    pooling are skipped and counted at set-up (they used to stop the run at the batch holding them)."""
    import soundfile as sf

    from d2v_train.models.heads import AudioForXVector

    rng = np.random.default_rng(0)
    for speaker, pitch in (("a", 180.0), ("b", 420.0)):
        (tmp_path / "data" / speaker).mkdir(parents=True)
        for i, n in enumerate([9000] * 10 + [2000] * 3):  # 2,000 samples: 6 frames; the TDNN needs 16
            t = np.arange(n) / 16000
            wave = np.sin(2 * np.pi * pitch * t) + 0.1 * rng.standard_normal(n)
            sf.write(str(tmp_path / "data" / speaker / f"{i}.wav"), wave.astype(np.float32), 16000)
    cfg = cfg_for(tmp_path / "run", "head=xvector", "data=audio", f"data.path={tmp_path / 'data'}", "data.val_fraction=0.25",
                  "data.num_workers=0", "data.pin_memory=false", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0")  # fmt: skip
    module, dm, trainer = build(cfg)
    shortest = AudioForXVector.min_samples(module.model.encoder, dict(cfg.head.settings))
    assert 2000 < dm.min_sample_size == shortest <= 9000
    assert dm.skip_counts()["too_short"] == 6
    trainer.fit(module, datamodule=dm)
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))


def labelled_text(path: Path, n: int = 320) -> Path:
    """A tiny docstring-like labelled set: sentences about files (0) or numbers (1)."""
    rng = random.Random(0)
    topics = [
        ["file", "path", "directory", "open", "read", "write", "folder", "name"],
        ["number", "integer", "float", "sum", "add", "multiply", "digits", "round"],
    ]
    filler = ["return", "the", "a", "given", "value", "of", "this", "function", "if", "is", "and", "from"]
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(topics[label] if rng.random() < 0.4 else filler) for _ in range(rng.randint(6, 14))]
        rows.append({"text": " ".join(words).capitalize() + ".", "label": label})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_text_classification_learns(tmp_path: Path) -> None:
    data = labelled_text(tmp_path / "labelled.jsonl")
    cfg = cfg_for(tmp_path / "run", "head=text_classification", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
                  "data.vocab_size=300", "data.val_fraction=0.25", "data.batch_size=16", "trainer.max_epochs=6", "optim.lr=3e-3")
    before, after, _ = fit_and_compare(cfg)
    assert after["val/acc"] > max(before["val/acc"], 0.7), (before, after)


# ------------------------------------------------------------------------------------------ pretrained=


def tiny_vision() -> Any:
    return build_encoder("vision", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                        image_size=32, patch_size=8, use_mask_token=True, use_mean_pooling=False,
                                        use_shared_relative_position_bias=True, drop_path_rate=0.0))


TINY_RUN = ["trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.limit_val_batches=2", "data.batch_size=16"]


def check_loaded(tmp: Path, source: str, encoder: Any) -> Any:
    cfg = cfg_for(tmp, f"pretrained={source}", *TINY_RUN)
    module, dm, trainer = build(cfg)
    ours = module.model.encoder.state_dict()
    for k, v in encoder.state_dict().items():
        if k in ours:
            assert torch.equal(ours[k], v), k
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    return module


def test_pretrained_from_pretraining_checkpoint(tmp_path: Path) -> None:
    from d2v_train.pretrain import train as pretrain

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        pcfg = compose("pretrain", overrides=[f"run_dir={tmp_path / 'pre'}", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                                              "trainer.enable_model_summary=false", "encoder.num_hidden_layers=2", "objective.top_k=2",
                                              "data.batch_size=16"])
    pretrain(pcfg)
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    student = build_encoder("vision", torch.load(ckpt, weights_only=True)["hyper_parameters"]["encoder"])
    student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    module = check_loaded(tmp_path / "ft", str(ckpt), student)
    assert module.model.encoder.config.num_hidden_layers == 2
    # a fine-tuning checkpoint is itself a valid source, head included
    out = cfg_for(tmp_path / "ft2", f"pretrained={tmp_path / 'ft' / 'checkpoints' / 'last.ckpt'}", *TINY_RUN)
    module2, _, _ = build(out)
    assert torch.equal(module2.model.out_proj.weight, module.model.out_proj.weight)


def test_pretrained_from_export_dir(tmp_path: Path) -> None:
    from d2v_train.interop import save_encoder

    encoder = tiny_vision()
    save_encoder(encoder, tmp_path / "export")
    check_loaded(tmp_path / "run", str(tmp_path / "export"), encoder)


def test_pretrained_from_transformers_dirs(tmp_path: Path) -> None:
    from d2v_train.interop import save_transformers, save_transformers_task

    encoder = tiny_vision()
    save_transformers(encoder, tmp_path / "hf_base")
    check_loaded(tmp_path / "run1", str(tmp_path / "hf_base"), encoder)
    # a task directory of the same class and labels keeps its head
    task = build_head("image_classification", tiny_vision(), num_labels=10)
    save_transformers_task(task, tmp_path / "hf_task")
    module = check_loaded(tmp_path / "run2", str(tmp_path / "hf_task"), task.encoder)
    assert module.model.out_proj.weight.shape == (10, 32)


def test_pretrained_errors_are_one_line(tmp_path: Path) -> None:
    from d2v_train.cli import check_overrides
    from d2v_train.cli import ConfigError

    (tmp_path / "empty").mkdir()
    cfg = cfg_for(tmp_path / "run", f"pretrained={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="without config.json"):
        build(cfg)
    cfg = cfg_for(tmp_path / "run", f"pretrained={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ConfigError, match="no such file"):
        build(cfg)
    assert check_overrides(["head=ctc"], "finetune") is None


# ------------------------------------------------------------------------------------------ mechanics


def test_layer_decay_scales_lr_by_depth() -> None:
    model = build_head("image_classification", tiny_vision(), num_labels=3)
    groups = layer_decay_groups(model, OptimConfig(lr=1.0), 0.5)
    by_layer = {g["layer"]: g["lr"] for g in groups}
    assert by_layer == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


def test_freeze_encoder_then_unfreeze() -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build_head("image_classification", tiny_vision(), num_labels=3)
    module = FineTuning(model, "image_classification", optim=dict(lr=1e-2), finetune=dict(freeze_encoder_steps=2))
    batch = {"inputs": torch.randn(4, 3, 32, 32), "padding_mask": None, "labels": torch.tensor([0, 1, 2, 0])}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(not k.startswith("encoder.") for k in changed)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    assert not torch.equal(model.encoder.patch_embed.proj.weight, start["encoder.patch_embed.proj.weight"])


def test_audio_masks_during_training_only() -> None:
    enc = build_encoder("audio", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                      conv_dim=[16] * 7, num_conv_pos_embeddings=1, conv_pos_kernel_size=5,
                                      num_conv_pos_embedding_groups=4, mask_time_prob=0.5, layerdrop=0.0))
    model = build_head("sequence_classification", enc, num_labels=2)
    module = FineTuning(model, "sequence_classification", finetune=dict(mask_time_prob=0.5, mask_time_length=2, mask_feature_prob=0.5, mask_feature_length=4))
    wav = torch.randn(2, 8000)
    g = torch.Generator().manual_seed(0)
    mask = module._audio_masks(wav, None, g)
    assert mask is not None and mask.shape == (2, 24) and 0 < mask.float().mean() < 1
    cm = module._channel_mask
    assert cm is not None and cm.shape == (2, 32)
    module.train()
    feats = enc.feature_projection(enc.feature_extractor(wav).transpose(1, 2))
    assert bool((feats[:, :, cm[0]][0] == 0).all())
    module.eval()
    feats = enc.feature_projection(enc.feature_extractor(wav).transpose(1, 2))
    assert not bool((feats == 0).any())


def test_mixup_targets_are_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    for cfg in (MixupConfig(0.8, 0.0, label_smoothing=0.1), MixupConfig(0.0, 1.0), MixupConfig(label_smoothing=0.1)):
        mixed, t = mixup_cutmix(x, y, 4, cfg, g)
        assert mixed.shape == x.shape and torch.allclose(t.sum(-1), torch.ones(8))
    assert channel_mask(2, 16, 0.0, 4, g, torch.device("cpu")) is None


def test_metrics() -> None:
    logits = torch.full((1, 6, 4), -5.0)
    for t, i in enumerate([1, 1, 0, 2, 3, 3]):
        logits[0, t, i] = 5.0
    assert ctc_greedy_decode(logits, None, blank=0) == [[1, 2, 3]]
    dec = CharDecoder(["<blank>", "a", "|", "b"])
    assert dec.decode([1, 2, 3]) == "a b"
    assert dec.labels_to_text(torch.tensor([[1, 2, 3, -100]])) == ["a b"]
    eer = EqualErrorRate()
    eer.update(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
    assert float(eer.compute()) == 0.0
    qa = SpanQA()
    start, end = torch.full((2, 5), -9.0), torch.full((2, 5), -9.0)
    start[0, 1] = end[0, 2] = 9.0
    start[1, 0] = end[1, 0] = 9.0
    qa.update(start, end, torch.tensor([[1, 2], [0, 1]]), None)
    res = qa.compute()
    assert float(res["exact_match"]) == 0.5 and abs(float(res["f1"]) - (1 + 2 / 3) / 2) < 1e-6


def test_finetune_resumes_from_its_checkpoint_with_weights_only(tmp_path: Path) -> None:
    """A fine-tuning run continues from its own last.ckpt (read with weights_only=True, written atomically)."""
    from d2v_train.finetune import train

    common = ["encoder.num_hidden_layers=1", "data.batch_size=32", "+trainer.limit_train_batches=3",
              "trainer.limit_val_batches=1"]
    first = train(cfg_for(tmp_path, "trainer.max_epochs=1", *common))
    assert first["global_step"] == 3 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    resumed = train(cfg_for(tmp_path, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
                            *common))
    assert resumed["global_step"] == 6


def test_resuming_a_checkpoint_of_another_model_layout_is_one_line() -> None:
    """A fine-tuning checkpoint whose parameter names differ from this run's model gets one line
    naming them, not torch's missing-keys dump; a matching one loads."""
    from d2v_train.lightning.checkpointing import CheckpointRefusedError

    torch.manual_seed(0)
    module = FineTuning(build_head("image_classification", tiny_vision(), num_labels=3), "image_classification")
    state = dict(module.state_dict())
    name = next(k for k in state if k.startswith("model.encoder."))
    fewer = {k: v for k, v in state.items() if k != name}
    with pytest.raises(CheckpointRefusedError, match=rf"this run's model has {name}, which the checkpoint lacks.*ckpt_path=null"):
        module.on_load_checkpoint({"state_dict": fewer})
    with pytest.raises(CheckpointRefusedError, match=r"the checkpoint holds model\.extra, which this run's model lacks"):
        module.on_load_checkpoint({"state_dict": {**state, "model.extra": state[name]}})
    module.on_load_checkpoint({"state_dict": state})
