"""Exports are complete Hub models: for the bare encoder of each modality and for each of the 12
fine-tuned heads, transformers' ``pipeline()`` (or its Auto classes where no pipeline exists)
loads the export directory alone and answers as our model does on the same raw input.

Our side always starts from what our data modules do to raw input (the image eval transform or the
digits scaling, waveform normalisation, ``<s> ... </s>`` token layout), so the test checks the
preprocessing files as well as the weights. Models are tiny and random (no training needed: the
same weights must give the same answer on both sides).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from d2v_train.data.audio_io import normalize_waveform  # noqa: E402
from d2v_train.data.image import build_transform  # noqa: E402
from d2v_train.data.tokenizer import train_bpe  # noqa: E402
from d2v_train.export import export  # noqa: E402
from d2v_train.interop.run_record import RunRecord  # noqa: E402
from d2v_train.interop.sources import LoadedModel  # noqa: E402
from d2v_train.lightning.metrics import CharDecoder, ctc_greedy_decode  # noqa: E402
from d2v_train.models import build_encoder  # noqa: E402
from d2v_train.models.heads import build_head  # noqa: E402

FEATURE_TOL = 1e-4
POSITIONS = 64  # text encoder positions: it takes POSITIONS - 2 tokens (RoBERTa positions start at pad + 1)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
AUDIO = dict(SMALL, conv_dim=[16, 24], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=2,
             conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4)
VISION = dict(SMALL, image_size=32, patch_size=8)
SEGMENT_HEAD = dict(out_indices=[1, 2, 3, 4], pool_scales=[1, 2], auxiliary_channels=8, id2label={
    "0": "background", "1": "digit", "2": "other"})
IMAGE_DATA = {"_target_": "d2v_train.data.ImageDataModule", "image_size": 32, "mean": [0.5, 0.45, 0.4],
              "std": [0.2, 0.25, 0.3]}
DIGITS = {"_target_": "d2v_train.data.DigitsDataModule", "path": None, "image_size": 32, "val_fraction": 0.2,
          "labels_per_class": None, "batch_size": 64, "seed": 0}
SCENES = {"_target_": "d2v_train.data.tasks_vision.DigitScenesDataModule", "image_size": 32, "num_train": 40,
          "num_val": 8, "seed": 0}
SPEECH = {"_target_": "d2v_train.data.SpeechDataModule", "kind": "sentences", "normalize": True}
CHARS = ["<blank>", "'", "a", "d", "e", "h", "l", "o", "r", "w", "|"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "return the sum of two numbers from the list",
         "open the file and read every line of it", "a python function that adds values"]

transformers.logging.set_verbosity_error()


def _save(model, tmp_path: Path, data: dict, kind: str = "finetuning", **extras) -> Path:
    """Our export of ``model`` as if it came from a run whose data config is ``data``."""
    torch.manual_seed(0)
    model.eval()
    record = RunRecord(kind=kind, config={"data": data} if data else {}, step=6, updates=7, metrics={"val/acc": 0.5})
    out = tmp_path / "export"
    source = LoadedModel(model, kind, tmp_path / "run" / "checkpoints" / "last.ckpt", extras=extras)
    export(source, out, "hf", record)
    return out


def _labels(n: int) -> dict[str, str]:
    return {str(i): f"class_{chr(97 + i)}" for i in range(n)}


def _seeded(model):
    """Random, non-trivial head weights (init leaves biases at zero and some outputs tied)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("encoder."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


# ---------------------------------------------------------------------------------------- vision

def _image(size=(32, 32), seed=0, grey=False) -> Image.Image:
    rng = np.random.RandomState(seed)
    if grey:
        return Image.fromarray(rng.randint(0, 256, size[::-1], dtype=np.uint8)).convert("RGB")
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _digits_pixels(image: Image.Image, pre: dict) -> torch.Tensor:
    """What DigitsDataModule does to a [0, 1] image already at the encoder size: standardise."""
    x = torch.as_tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    return (x - pre["image_mean"][0]) / pre["image_std"][0]


def test_vision_encoder_feature_extraction(tmp_path):
    encoder = build_encoder("vision", VISION)
    out = _save(encoder, tmp_path, IMAGE_DATA, kind="pretraining")
    image = _image((45, 60))  # not square, not the model size: resize + centre crop are exercised
    theirs = torch.tensor(transformers.pipeline("image-feature-extraction", model=str(out))(image))
    ours_in = build_transform("eval", 32, IMAGE_DATA["mean"], IMAGE_DATA["std"])(image)[None]
    with torch.no_grad():
        ours = encoder(ours_in).last_hidden_state
    assert (theirs - ours).abs().max() <= FEATURE_TOL
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "ImageDataModule" in card


def test_vision_image_classification(tmp_path):
    model = _seeded(build_head("image_classification", build_encoder("vision", VISION), id2label=_labels(4)))
    out = _save(model, tmp_path, DIGITS)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    images = [_image(seed=s, grey=True) for s in range(4)]
    pipe = transformers.pipeline("image-classification", model=str(out))
    for image in images:
        with torch.no_grad():
            logits = model(_digits_pixels(image, pre)).logits[0]
        assert pipe(image, top_k=1)[0]["label"] == model.settings["id2label"][str(int(logits.argmax()))]


def test_vision_semantic_segmentation(tmp_path):
    model = _seeded(build_head("semantic_segmentation", build_encoder("vision", dict(VISION, num_hidden_layers=4)),
                               **SEGMENT_HEAD))
    out = _save(model, tmp_path, SCENES)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    image = _image(seed=5, grey=True)
    segments = transformers.pipeline("image-segmentation", model=str(out))(image, subtask="semantic")
    label_ids = {name: int(i) for i, name in model.settings["id2label"].items()}
    theirs = np.full((32, 32), -1)
    for segment in segments:
        theirs[np.asarray(segment["mask"]) > 0] = label_ids[segment["label"]]
    with torch.no_grad():
        logits = model(_digits_pixels(image, pre)).logits
    ours = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert len(np.unique(ours)) > 1 and (theirs == ours).all()


# ----------------------------------------------------------------------------------------- audio

def _wave(seed=0, n=6000) -> np.ndarray:
    return np.random.RandomState(seed).randn(n).astype(np.float32)


def _ours_wave(wave: np.ndarray) -> torch.Tensor:
    return normalize_waveform(torch.from_numpy(wave))[None]


def _auto_inputs(out: Path, wave: np.ndarray) -> dict:
    extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
    return extractor(wave, sampling_rate=16000, return_tensors="pt")


def test_audio_encoder_features(tmp_path):
    encoder = build_encoder("audio", AUDIO)
    out = _save(encoder, tmp_path, SPEECH, kind="pretraining")
    wave = _wave()
    with torch.no_grad():
        theirs = transformers.AutoModel.from_pretrained(out).eval()(**_auto_inputs(out, wave)).last_hidden_state
        ours = encoder(_ours_wave(wave)).last_hidden_state
    assert (theirs - ours).abs().max() <= FEATURE_TOL


def test_audio_ctc_transcript(tmp_path):
    model = _seeded(build_head("ctc", build_encoder("audio", AUDIO), vocab_size=len(CHARS), pad_token_id=0))
    out = _save(model, tmp_path, SPEECH, vocab=CHARS)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<blank>" and config["word_delimiter_token"] == "|"
    assert json.loads((out / "vocab.json").read_text()) == {s: i for i, s in enumerate(CHARS)}
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(out))
    tokenizer = transformers.AutoProcessor.from_pretrained(out).tokenizer
    assert tokenizer.pad_token_id == 0 and len(tokenizer) == len(CHARS)
    checked = 0
    for seed in range(3):
        wave = _wave(seed, 9000)
        with torch.no_grad():
            ids = ctc_greedy_decode(model(_ours_wave(wave)).logits, None, blank=0)[0]
        ours = CharDecoder(CHARS).decode(ids)
        text = pipe(wave)["text"]
        assert "<blank>" not in text and "<pad>" not in text and "<unk>" not in text
        # the tokenizer keeps a double space where the model emits '|', blank, '|' (ours collapses it)
        assert " ".join(text.split()) == ours and ours
        if "||" not in "".join(CHARS[i] for i in ids):
            assert text == ours
            checked += 1
    assert checked


def test_audio_classification(tmp_path):
    model = _seeded(build_head("sequence_classification", build_encoder("audio", AUDIO), id2label=_labels(5),
                               classifier_proj_size=8))
    out = _save(model, tmp_path, SPEECH)
    pipe = transformers.pipeline("audio-classification", model=str(out))
    for seed in range(3):
        wave = _wave(seed)
        with torch.no_grad():
            logits = model(_ours_wave(wave)).logits[0]
        assert pipe(wave, top_k=1)[0]["label"] == model.settings["id2label"][str(int(logits.argmax()))]


def test_audio_frame_classification(tmp_path):
    model = _seeded(build_head("frame_classification", build_encoder("audio", AUDIO), id2label=_labels(3)))
    out = _save(model, tmp_path, SPEECH)
    wave = _wave(1)
    hf = transformers.AutoModelForAudioFrameClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(**_auto_inputs(out, wave)).logits
        ours = model(_ours_wave(wave)).logits
    assert (theirs.argmax(-1) == ours.argmax(-1)).all() and (theirs - ours).abs().max() <= FEATURE_TOL


def test_audio_xvector(tmp_path):
    model = _seeded(build_head("xvector", build_encoder("audio", AUDIO), id2label=_labels(4), tdnn_dim=[8, 8, 12],
                               tdnn_kernel=[3, 3, 1], tdnn_dilation=[1, 2, 1], xvector_output_dim=10))
    out = _save(model, tmp_path, SPEECH)
    wave = _wave(2)
    hf = transformers.AutoModelForAudioXVector.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(**_auto_inputs(out, wave)).embeddings
        ours = model(_ours_wave(wave)).embeddings
    assert (theirs - ours).abs().max() <= FEATURE_TOL


# ------------------------------------------------------------------------------------------ text

@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_bpe(TEXTS * 20, 300, folder / "tokenizer.json"), folder / "tokenizer.json"


def _text_encoder(bpe, **extra):
    return build_encoder("text", dict(SMALL, vocab_size=bpe[0].get_vocab_size(), max_position_embeddings=POSITIONS,
                                      type_vocab_size=1, **extra))


def _text_save(model, tmp_path, bpe, kind="finetuning") -> Path:
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_bytes(bpe[1].read_bytes())  # beside the run, as d2v-pretrain keeps it
    return _save(model, tmp_path, {"_target_": "d2v_train.data.TextDataModule"}, kind=kind)


def _ids(bpe, *texts: str) -> list[int]:
    """Our data modules' layout: ``<s> A </s>`` and ``<s> A </s></s> B </s>``."""
    tok = bpe[0]
    ids = [0]
    for i, text in enumerate(texts):
        ids += ([2] if i else []) + tok.encode(text, add_special_tokens=False).ids + [2]
    return ids


def test_text_encoder_features_and_truncation(tmp_path, bpe):
    encoder = _text_encoder(bpe)
    out = _text_save(encoder, tmp_path, bpe, kind="pretraining")
    pipe = transformers.pipeline("feature-extraction", model=str(out))
    with torch.no_grad():
        ours = encoder(torch.tensor([_ids(bpe, TEXTS[0])])).last_hidden_state
    assert (torch.tensor(pipe(TEXTS[0])) - ours).abs().max() <= FEATURE_TOL
    long = " ".join(TEXTS * 8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == POSITIONS - 2
    assert len(tokenizer(long, truncation=True).input_ids) == POSITIONS - 2
    assert torch.tensor(pipe(long, tokenize_kwargs={"truncation": True})).shape[1] == POSITIONS - 2
    # the never-trained pooler is not shipped; the card says so
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(out / "model.safetensors")) if k.startswith("pooler.")]
    assert "pooler" in (out / "README.md").read_text()


def test_text_fill_mask(tmp_path, bpe):
    model = _seeded(build_head("masked_lm", _text_encoder(bpe)))
    out = _text_save(model, tmp_path, bpe)
    text = "the quick brown<mask> jumps over the lazy dog"
    ids = _ids(bpe, text)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, ids.index(4)]
    assert transformers.pipeline("fill-mask", model=str(out))(text, top_k=1)[0]["token"] == int(logits.argmax())


def test_text_generation(tmp_path, bpe):
    """Greedy generation. transformers 5's ``generate`` numbers positions from 0 unless given
    ``position_ids``, while the model itself (and ours, and RoBERTa) starts at ``pad + 1``: passed
    explicitly, the pipeline continues the prompt exactly as our model does."""
    model = _seeded(build_head("causal_lm", _text_encoder(bpe, is_decoder=True)))
    out = _text_save(model, tmp_path, bpe)
    pipe = transformers.pipeline("text-generation", model=str(out))
    prompt = "open the file"
    ids = _ids(bpe, prompt)
    assert pipe.tokenizer(prompt).input_ids == ids
    positions = torch.arange(len(ids))[None] + 2
    result = pipe(prompt, max_new_tokens=4, do_sample=False, return_tensors=True, position_ids=positions)
    result = [int(i) for i in result[0]["generated_token_ids"]]
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert result == ids


def test_text_classification(tmp_path, bpe):
    model = _seeded(build_head("sequence_classification", _text_encoder(bpe), id2label=_labels(3)))
    out = _text_save(model, tmp_path, bpe)
    pipe = transformers.pipeline("text-classification", model=str(out))
    for text in TEXTS:
        with torch.no_grad():
            logits = model(torch.tensor([_ids(bpe, text)])).logits[0]
        assert pipe(text)[0]["label"] == model.settings["id2label"][str(int(logits.argmax()))]


def test_text_multiple_choice(tmp_path, bpe):
    model = _seeded(build_head("multiple_choice", _text_encoder(bpe)))
    out = _text_save(model, tmp_path, bpe)
    context, choices = TEXTS[0], TEXTS[1:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    enc = tokenizer([context] * 3, choices, padding=True, return_tensors="pt")
    hf = transformers.AutoModelForMultipleChoice.from_pretrained(out).eval()
    rows = [_ids(bpe, context, c) for c in choices]
    width = max(map(len, rows))
    ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])[None]
    with torch.no_grad():
        theirs = hf(**{k: v[None] for k, v in enc.items()}).logits
        ours = model(ids, padding_mask=ids == 1).logits
    assert torch.equal(enc.input_ids, ids[0]) and (theirs - ours).abs().max() <= FEATURE_TOL


def test_text_token_classification(tmp_path, bpe):
    model = _seeded(build_head("token_classification", _text_encoder(bpe), id2label=_labels(4)))
    out = _text_save(model, tmp_path, bpe)
    ids = _ids(bpe, TEXTS[2])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].argmax(-1)
    found = transformers.pipeline("token-classification", model=str(out))(TEXTS[2])
    theirs = {e["index"]: e["entity"] for e in found}
    assert theirs == {i: model.settings["id2label"][str(int(ours[i]))] for i in range(1, len(ids) - 1)}


def test_text_question_answering(tmp_path, bpe):
    """transformers 5 removed the question-answering pipeline: the Auto classes must give the same
    start / end logits and the same best answer span."""
    model = _seeded(build_head("question_answering", _text_encoder(bpe)))
    out = _text_save(model, tmp_path, bpe)
    question, context = "what does the function add", TEXTS[3]
    enc = transformers.AutoTokenizer.from_pretrained(out)(question, context, return_tensors="pt")
    ids = _ids(bpe, question, context)
    assert enc.input_ids[0].tolist() == ids
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(**enc)
        ours = model(torch.tensor([ids]))
    assert (theirs.start_logits - ours.start_logits).abs().max() <= FEATURE_TOL
    assert (theirs.end_logits - ours.end_logits).abs().max() <= FEATURE_TOL


# ------------------------------------------------------------------------------------ files, hub

def test_files_are_readable_by_others_and_card_tells_the_run(tmp_path):
    model = build_head("image_classification", build_encoder("vision", VISION), id2label=_labels(2))
    out = _save(model, tmp_path, DIGITS)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "val/acc | 0.5" in card and "7 updates" in card
    assert "class_a" in card and "DigitsDataModule" in card


def _umask() -> int:
    from d2v_train.interop.files import current_umask

    return current_umask()


def test_push_to_hub_uploads_the_export(tmp_path, monkeypatch):
    """Everything up to the network: the repository is created and the folder uploaded."""
    import huggingface_hub

    from d2v_train.export import run
    from d2v_train.interop.transformers import save_transformers

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, **kwargs):
            calls.append(("create", kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs, sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    save_transformers(build_encoder("vision", VISION), tmp_path / "src")
    from omegaconf import OmegaConf

    run(OmegaConf.create({"checkpoint": str(tmp_path / "src"), "output_dir": str(tmp_path / "out"), "format": "hf",
                          "weights": "student", "push_to_hub": "me/tiny-d2v", "private": True}))
    (_, create), (_, upload, names) = calls[1], calls[2]
    assert create["repo_id"] == "me/tiny-d2v" and create["private"] is True and create["exist_ok"]
    assert upload["repo_id"] == "me/tiny-d2v" and Path(upload["folder_path"]) == tmp_path / "out"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(names)


def test_push_to_hub_refusals_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from omegaconf import OmegaConf

    from d2v_train.cli import ConfigError, UserError
    from d2v_train.export import run, validate
    from d2v_train.interop.transformers import save_transformers

    base = {"checkpoint": str(tmp_path / "src"), "output_dir": str(tmp_path / "out"), "format": "hf",
            "weights": "student", "private": None}
    with pytest.raises(ConfigError, match="push_to_hub='a/b/c'"):
        validate(OmegaConf.create({**base, "push_to_hub": "a/b/c"}))
    with pytest.raises(ConfigError, match="with format=hf"):
        validate(OmegaConf.create({**base, "format": "safetensors", "push_to_hub": "me/x"}))

    class OfflineApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, **kwargs):
            raise OSError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    save_transformers(build_encoder("vision", VISION), tmp_path / "src")
    with pytest.raises(UserError, match=r"export in .* is complete, but the upload to me/x failed: Name or service") as err:
        run(OmegaConf.create({**base, "push_to_hub": "me/x"}))
    assert "\n" not in str(err.value) and (tmp_path / "out" / "README.md").is_file()


def test_transformers_source_keeps_its_own_preprocessing(tmp_path):
    """Re-exporting a transformers directory carries its preprocessor instead of guessing one."""
    from d2v_train.interop.transformers import save_transformers

    save_transformers(build_encoder("vision", VISION), tmp_path / "src")
    own = {"image_processor_type": "BeitImageProcessor", "size": {"height": 32, "width": 32},
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (tmp_path / "src" / "preprocessor_config.json").write_text(json.dumps(own))
    from d2v_train.export import export as write
    from d2v_train.interop.sources import load_source

    write(load_source(tmp_path / "src"), tmp_path / "out", "hf")
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text()) == own
    card = (tmp_path / "out" / "README.md").read_text()
    assert "carried over from the source model" in card and "not recorded" in card


def test_ctc_export_without_tokenizer_config_is_completed(tmp_path):
    """An older export (weights + vocab.json only) re-exported gains a working CTC tokenizer."""
    from d2v_train.export import export as write
    from d2v_train.interop.heads import save_transformers_task
    from d2v_train.interop.sources import load_source

    model = build_head("ctc", build_encoder("audio", AUDIO), vocab_size=len(CHARS), pad_token_id=0)
    save_transformers_task(model, tmp_path / "old")
    (tmp_path / "old" / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(CHARS)}))
    write(load_source(tmp_path / "old"), tmp_path / "new", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "new")
    assert tokenizer.pad_token == "<blank>" and tokenizer.decode([5, 0, 4, 6, 6, 0, 6, 10, 7, 7]) == "hell o"
