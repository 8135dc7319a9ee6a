"""The dense and span heads on their own small real data: each data module yields correctly shaped
labels, each data config composes with its head, and each head fine-tunes a few steps on CPU through
``d2v_train.finetune.build`` (the ``d2v-finetune`` path) with its metric moving the right way."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from d2v_train.cli import config_dir
from d2v_train.data.tasks_audio import SpeakersDataModule, SpeechFramesDataModule, conv_frames, frame_labels
from d2v_train.data.tasks_text import DocChoiceDataModule, DocQADataModule, DocTagsDataModule, token_tags, word_tags
from d2v_train.data.tasks_vision import DigitScenesDataModule
from d2v_train.finetune import build, validate_config
from d2v_train.lightning.augment import mask_for_mlm

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "export=false",
         "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1"]  # fmt: skip


def cfg_for(tmp: Path, *overrides: str) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("finetune", overrides=[f"run_dir={tmp}", *QUIET, *overrides])


def fit_and_compare(cfg: Any) -> tuple[dict[str, float], dict[str, float], Any]:
    """(validation metrics before training, after, module)."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    module, dm, trainer = build(cfg)
    before = {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}
    trainer.fit(module, datamodule=dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print(cfg.head.task, "before", before, "after", after)
    return before, after, module


def mean_train_loss(module: Any, dm: Any) -> float:
    """The head's loss over the whole training set (eval mode: no dropout)."""
    from torch.utils.data import DataLoader

    module.eval()
    with torch.no_grad():
        losses = [float(module.model(b["inputs"], padding_mask=b["padding_mask"], labels=b["labels"]).loss)
                  for b in DataLoader(dm.train_set, batch_size=32, collate_fn=dm.collate_fn)]  # fmt: skip
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------ fixtures

# a small docstrings corpus (pydoc topics + a few stdlib files) and a small BPE, shared by the text tests
TEXT = ["data.max_files=25", "data.vocab_size=1000", "data.max_length=64", "data.val_fraction=0.2", "encoder.max_position_embeddings=66"]
TEXT_KW = dict(max_files=25, vocab_size=1000, max_length=64, val_fraction=0.2)
VOICES = ["data.accents=[en-us,en]", "data.variants=[m1,m3,f1]"]


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("docstrings"))


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("speech"))


# ------------------------------------------------------------------------------------------ data units


def test_digit_scenes_masks_match_the_pasted_digits() -> None:
    dm = DigitScenesDataModule(image_size=32, num_train=64, num_val=16, seed=3)
    dm.setup()
    item = dm.train_set[0]
    assert item["inputs"].shape == (3, 32, 32) and item["labels"].shape == (32, 32) and item["labels"].dtype == torch.long
    masks = dm.train_set.masks
    assert 0 <= int(masks.min()) and int(masks.max()) <= 10 and dm.classes[0] == "background" and len(dm.classes) == 11
    digits_per_scene = torch.stack([torch.bincount(m.flatten(), minlength=11)[1:] > 0 for m in masks]).sum(1)
    assert bool((digits_per_scene >= 1).all()) and bool((digits_per_scene <= 4).all())
    # digit pixels are brighter than the background they were pasted on
    img = dm.train_set.images * dm.std + dm.mean
    assert img.mean(1)[masks > 0].mean() > img.mean(1)[masks == 0].mean() + 0.2
    batch = dm.collate_fn([dm.train_set[i] for i in range(4)])
    assert batch["inputs"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4, 32, 32)
    again = DigitScenesDataModule(image_size=32, num_train=64, num_val=16, seed=3)
    again.setup()
    assert torch.equal(again.train_set.masks, masks)  # seeded


def test_word_tags_align_to_bpe_tokens() -> None:
    text = "Return None if x is 42; len(x)"
    starts, ends, tags = word_tags(text)
    words = [text[s:e] for s, e in zip(starts, ends)]
    assert words == ["Return", "None", "if", "x", "is", "42", "len", "x"]
    assert tags.tolist() == [0, 1, 1, 0, 1, 3, 2, 0]
    # tokens: "Return" " No" "ne" " if" " x" " is" " 4" "2" ";" " len" "(" "x" ")"
    offsets = np.array([[0, 6], [6, 9], [9, 11], [11, 14], [14, 16], [16, 19], [19, 21], [21, 22], [22, 23],
                        [23, 27], [27, 28], [28, 29], [29, 30]])  # fmt: skip
    assert token_tags(offsets, starts, ends, tags).tolist() == [0, 1, -100, 1, 0, 1, 3, -100, 0, 2, 0, 0, 0]


def test_text_task_modules_yield_shaped_labels(text_cache: str) -> None:
    tags = DocTagsDataModule(cache_dir=text_cache, **TEXT_KW)
    tags.setup()
    b = tags.collate_fn([tags.train_set[i] for i in range(4)])
    assert b["labels"].shape == b["inputs"].shape and tags.classes == ["O", "KEYWORD", "BUILTIN", "NUMBER"]
    assert set(torch.unique(b["labels"]).tolist()) <= {-100, 0, 1, 2, 3}
    assert bool((b["labels"][b["padding_mask"]] == -100).all()) if b["padding_mask"] is not None else True

    qa = DocQADataModule(cache_dir=text_cache, **TEXT_KW)
    qa.setup()
    b = qa.collate_fn([qa.train_set[i] for i in range(4)])
    assert b["labels"].shape == (4, 2) and bool((b["labels"][:, 0] <= b["labels"][:, 1]).all())
    assert int(b["labels"].max()) < b["inputs"].shape[1] and len(qa.val_set) > 0
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qa.tokenizer_path))
    ids = b["inputs"][0].tolist()
    s, e = b["labels"][0].tolist()
    question, answer = tok.decode(ids[1:6]), tok.decode(ids[s : e + 1]).strip()
    assert question.startswith("What is") and answer and answer in tok.decode(ids[6:])

    mc = DocChoiceDataModule(cache_dir=text_cache, num_choices=3, **TEXT_KW)
    mc.setup()
    b = mc.collate_fn([mc.train_set[i] for i in range(4)])
    assert b["inputs"].dim() == 3 and b["inputs"].shape[:2] == (4, 3) and b["padding_mask"].shape == b["inputs"].shape
    assert b["labels"].shape == (4,) and int(b["labels"].max()) < 3
    assert bool((b["inputs"][:, :, 0] == mc.special_token_ids["bos"]).all())


def test_mlm_masking_keeps_specials_and_padding() -> None:
    ids = torch.tensor([[0, 10, 11, 12, 13, 2, 1, 1], [0, 20, 21, 22, 23, 24, 25, 2]])
    pad = ids == 1
    specials = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_for_mlm(ids, pad, specials, 50, 0.5, 0.0, 0.0, g)
    chosen = labels != -100
    assert bool(chosen.any(1).all()) and not bool(chosen[:, 0].any()) and not bool(chosen[pad].any())
    assert bool((masked[chosen] == 4).all()) and torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])


@needs_espeak
def test_audio_task_modules_yield_shaped_labels(speech_cache: str) -> None:
    frames = SpeechFramesDataModule(words=["yes", "no", "up"], accents=["en-us", "en"], variants=["m1", "f1"],
                                    num_train=8, num_val=4, cache_dir=speech_cache)  # fmt: skip
    frames.setup()
    b = frames.collate_fn([frames.train_set[i] for i in range(4)])
    assert b["labels"].shape == (4, conv_frames(b["inputs"].shape[1], frames.conv_kernel, frames.conv_stride))
    assert frames.classes == ["silence", "yes", "no", "up"] and set(torch.unique(b["labels"]).tolist()) <= {-100, 0, 1, 2, 3}
    assert (b["labels"] == 0).any() and (b["labels"] > 0).any()
    # a frame's label is the sample label at the centre of its 400-sample receptive field (hop 320)
    lab = frame_labels(torch.tensor([0] * 700 + [1] * 700), frames.conv_kernel, frames.conv_stride)
    assert lab.tolist() == [0, 0, 1, 1]

    speakers = SpeakersDataModule(accents=["en-us"], variants=["m1", "f1"], words=["yes", "no"], val_words=["up"],
                                  num_train=4, num_val=2, cache_dir=speech_cache)  # fmt: skip
    speakers.setup()
    b = speakers.collate_fn([speakers.train_set[i] for i in range(4)])
    assert b["labels"].tolist() == [0, 1, 0, 1] and speakers.classes == ["en-us+m1_p50", "en-us+f1_p50"]
    assert b["inputs"].shape[0] == 4 and b["inputs"].shape[1] > 16000 // 2


@pytest.mark.parametrize(
    "head, data",
    [("semantic_segmentation", "digit_scenes"), ("token_classification", "doc_tags"), ("question_answering", "doc_qa"),
     ("multiple_choice", "doc_choice"), ("frame_classification", "speech_frames"), ("xvector", "speakers"),
     ("masked_lm", "docstrings")],
)  # fmt: skip
def test_task_data_configs_compose_with_their_heads(head: str, data: str) -> None:
    from hydra.utils import get_class

    cfg = cfg_for(Path("unused"), f"head={head}", f"data={data}")
    validate_config(cfg)
    assert get_class(cfg.data._target_).modality == cfg.modality
    assert "???" not in str(cfg.head.settings)


def test_image_recipe_adds_randaugment_and_random_erasing() -> None:
    from torchvision.transforms import v2 as T

    from d2v_train.data.image import build_transform

    cfg = cfg_for(Path("unused"), "recipe=image_classification")
    assert (cfg.data.rand_augment_ops, cfg.data.rand_augment_magnitude, cfg.data.random_erasing) == (2, 9, 0.25)
    tf = build_transform("v1", 32, rand_augment_ops=2, rand_augment_magnitude=9, random_erasing=0.25)
    kinds = [type(t) for t in tf.transforms]
    assert T.RandAugment in kinds and T.RandomErasing in kinds and T.ColorJitter not in kinds
    assert kinds.index(T.RandomErasing) > kinds.index(T.Normalize)
    assert T.RandAugment not in [type(t) for t in build_transform("eval", 32, rand_augment_ops=2).transforms]
    from PIL import Image

    out = tf(Image.new("RGB", (40, 40), (120, 30, 200)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------ heads learn

def test_semantic_segmentation_learns_on_digit_scenes(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, "head=semantic_segmentation", "data=digit_scenes", "data.num_train=480", "data.num_val=64",
                  "data.batch_size=16", "trainer.max_epochs=2", "optim.lr=2e-3", "finetune.layer_decay=1.0")  # fmt: skip
    before, after, _ = fit_and_compare(cfg)
    assert after["val/loss"] < before["val/loss"] * 0.5 and after["val/miou"] > before["val/miou"] + 0.01, (before, after)
    assert after["val/pixel_acc"] > before["val/pixel_acc"] + 0.1, (before, after)


def test_token_classification_learns_on_doc_tags(tmp_path: Path, text_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=token_classification", "data=doc_tags", f"data.cache_dir={text_cache}", *TEXT,
                  "data.max_train=480", "data.max_val=96", "data.batch_size=16", "trainer.max_epochs=5", "optim.lr=1e-3")  # fmt: skip
    before, after, _ = fit_and_compare(cfg)
    assert after["val/f1"] > before["val/f1"] + 0.3 and after["val/acc"] > 0.9, (before, after)


def test_question_answering_learns_on_doc_qa(tmp_path: Path, text_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=question_answering", "data=doc_qa", f"data.cache_dir={text_cache}", *TEXT,
                  "data.batch_size=16", "trainer.max_epochs=4", "optim.lr=3e-3")  # fmt: skip
    before, after, _ = fit_and_compare(cfg)
    assert after["val/loss"] < before["val/loss"] - 0.5 and after["val/f1"] > before["val/f1"], (before, after)


def test_multiple_choice_fits_doc_choice(tmp_path: Path, text_cache: str) -> None:
    """Telling the true next sentence from other documents' is beyond a from-scratch 4-block encoder
    in a few CPU steps (validation accuracy stays near chance; a pretrained encoder is what makes it
    generalise), so this checks the head learns: its loss on 64 training examples falls clearly."""
    import lightning as L

    cfg = cfg_for(tmp_path, "head=multiple_choice", "data=doc_choice", f"data.cache_dir={text_cache}", *TEXT,
                  "data.num_choices=2", "data.max_train=64", "data.max_val=32", "data.batch_size=16",
                  "trainer.max_epochs=25", "optim.lr=1e-3", "optim.warmup_ratio=0.05")  # fmt: skip
    L.seed_everything(0, verbose=False)
    module, dm, trainer = build(cfg)
    dm.setup("fit")
    start = mean_train_loss(module, dm)
    trainer.fit(module, datamodule=dm)
    end = mean_train_loss(module, dm)
    assert start > 0.6 and end < 0.5 * start, (start, end)
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0


def test_masked_lm_fine_tuning_masks_and_learns(tmp_path: Path, text_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=masked_lm", "data=docstrings", f"data.cache_dir={text_cache}", *TEXT,
                  "data.batch_size=16", "trainer.max_steps=40", "trainer.max_epochs=-1", "trainer.limit_val_batches=6",
                  "trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=40", "optim.lr=3e-3")  # fmt: skip
    before, after, module = fit_and_compare(cfg)
    assert module.special_token_ids["mask"] == 4
    assert after["val/ppl"] < before["val/ppl"] * 0.7, (before, after)


@needs_espeak
def test_frame_classification_learns_on_speech_frames(tmp_path: Path, speech_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=frame_classification", "data=speech_frames", f"data.cache_dir={speech_cache}", *VOICES,
                  "data.words=[yes,no,up,down]", "data.val_voices=1", "data.num_train=96", "data.num_val=24",
                  "data.batch_size=8", "trainer.max_epochs=3", "optim.lr=3e-3")  # fmt: skip
    before, after, _ = fit_and_compare(cfg)
    assert after["val/acc"] > before["val/acc"] + 0.1 and after["val/loss"] < before["val/loss"], (before, after)


@needs_espeak
def test_xvector_eer_falls_on_speakers(tmp_path: Path, speech_cache: str) -> None:
    cfg = cfg_for(tmp_path, "head=xvector", "data=speakers", f"data.cache_dir={speech_cache}", *VOICES,
                  "data.words=[yes,no,up,down]", "data.val_words=[left,right]", "data.num_train=96", "data.num_val=36",
                  "data.batch_size=12", "trainer.max_epochs=10", "optim.lr=3e-3")  # fmt: skip
    before, after, _ = fit_and_compare(cfg)
    assert after["val/eer"] < before["val/eer"] - 0.02 and after["val/loss"] < before["val/loss"], (before, after)
