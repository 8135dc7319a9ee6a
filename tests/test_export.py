"""``d2v-export``: pretraining checkpoints and model directories out to transformers and safetensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from run_options import NO_PROBE_COMPARISON

import d2v_train
from d2v_train.cli import ConfigError
from d2v_train.export import run
from d2v_train.interop import save_transformers
from d2v_train.interop.files import current_umask, torch_load_safely
from d2v_train.interop.sources import encoder_from_pretraining
from d2v_train.models import build_encoder

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A real (tiny, 4-step) d2v-pretrain run's last checkpoint."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "d2v_train.pretrain", f"hydra.run.dir={run_dir}", "trainer.max_steps=4",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *NO_PROBE_COMPARISON],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def export(checkpoint, output_dir, **kwargs):
    return run(OmegaConf.create({"checkpoint": str(checkpoint), "output_dir": str(output_dir),
                                 "format": "hf", "weights": "student", **kwargs}))


def test_hf_export_loads_in_transformers_with_same_outputs(pretrain_ckpt, tmp_path, capsys):
    export(pretrain_ckpt, tmp_path / "hf")
    printed = capsys.readouterr().out
    assert "student weights" in printed and "parameters" in printed and "float32" in printed
    model, info = transformers.Data2VecVisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    names = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert not [n for n in names if "teacher" in n or "head" in n or "ema" in n]
    student = encoder_from_pretraining(torch_load_safely(pretrain_ckpt)).eval()
    pixels = torch.randn(2, 3, student.config.image_size, student.config.image_size)
    with torch.no_grad():
        assert (model.eval()(pixels).last_hidden_state - student(pixels).last_hidden_state).abs().max() <= 1e-5
    # a complete Hub model: the digits preprocessing of the run, a card from its records, normal modes
    from d2v_train.data import DigitsDataModule

    digits = DigitsDataModule(image_size=student.config.image_size)
    digits.setup("fit")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_mean) == [digits.mean] * 3 and list(processor.image_std) == [digits.std] * 3
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "DigitsDataModule" in card and "max_steps=4" in card and "| train/loss |" in card
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()} == {oct(0o666 & ~current_umask())}


def test_teacher_weights_and_safetensors_format(pretrain_ckpt, tmp_path):
    export(pretrain_ckpt, tmp_path / "teacher", format="safetensors", weights="teacher")
    export(pretrain_ckpt, tmp_path / "student", format="safetensors")
    teacher = d2v_train.load_encoder(tmp_path / "teacher")
    student = d2v_train.load_encoder(tmp_path / "student")
    state = torch_load_safely(pretrain_ckpt)["state_dict"]
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, state[f"teacher.model.{name}"])
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, state[f"student.{name}"])
    differs = [n for n, t in teacher.state_dict().items() if not torch.equal(t, student.state_dict()[n])]
    assert differs, "after 4 updates the EMA teacher must differ from the student"


def test_transformers_directory_converts_to_our_format(tmp_path):
    encoder = build_encoder("text", dict(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8, max_position_embeddings=20)).eval()
    save_transformers(encoder, tmp_path / "hf")
    export(tmp_path / "hf", tmp_path / "ours", format="safetensors")
    ids = torch.randint(3, 30, (2, 6))
    with torch.no_grad():
        assert torch.equal(d2v_train.load_encoder(tmp_path / "ours")(ids).last_hidden_state,
                           encoder(ids).last_hidden_state)


def test_bad_requests_are_one_line_errors(pretrain_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        export(tmp_path / "missing.ckpt", tmp_path / "out")
    encoder = build_encoder("vision", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=8, image_size=8, patch_size=4))
    save_transformers(encoder, tmp_path / "hf")
    with pytest.raises(ConfigError, match="weights=teacher needs a d2v-pretrain checkpoint"):
        export(tmp_path / "hf", tmp_path / "out", weights="teacher")


def test_cli_help_lists_formats_and_rejects_unknown_format(pretrain_ckpt, tmp_path):
    helped = subprocess.run([sys.executable, "-m", "d2v_train.export", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "hf:" in helped.stdout and "safetensors:" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "d2v_train.export", f"checkpoint={pretrain_ckpt}",
                          f"output_dir={tmp_path / 'x'}", "format=onnx"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "d2v-export: error: format='onnx' is not one of ['hf', 'safetensors']"


def test_finetuned_checkpoint_exports_to_its_task_class(pretrain_ckpt, tmp_path):
    run_dir = tmp_path / "ft"
    done = subprocess.run(
        [sys.executable, "-m", "d2v_train.finetune", f"pretrained={pretrain_ckpt}", f"hydra.run.dir={run_dir}",
         "trainer.max_steps=3", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "export=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = sorted((run_dir / "checkpoints").glob("*.ckpt"))[0]
    export(ckpt, tmp_path / "hf")
    model, info = transformers.Data2VecVisionForImageClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from d2v_train.interop.sources import load_source

    ours = load_source(ckpt).model
    size = ours.encoder.config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (model.eval()(pixels).logits - ours(pixels).logits).abs().max() <= 1e-5
    export(ckpt, tmp_path / "enc", format="safetensors")
    assert d2v_train.load_encoder(tmp_path / "enc").modality == "vision"
    # the run's own export (export=true): the image-classification pipeline answers as the model does
    pipe = transformers.pipeline("image-classification", model=str(run_dir / "model"))
    grey = torch.randint(0, 256, (size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(grey.numpy()).convert("RGB")
    processor = pipe.image_processor
    x = (grey.float() / 255 - processor.image_mean[0]) / processor.image_std[0]
    with torch.no_grad():
        predicted = int(ours(x.expand(1, 3, -1, -1)).logits.argmax())
    assert pipe(image, top_k=1)[0]["label"] == ours.settings["id2label"][str(predicted)]
    card = (run_dir / "model" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "| train/loss |" in card and "3 updates" in card


def test_text_tokenizer_travels_from_pretraining_to_export_and_finetuning(tmp_path):
    """A text encoder is only usable with its vocabulary: the run dir, exports and fine-tuning keep it."""
    run_dir, cache = tmp_path / "pre", tmp_path / "cache"
    common = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"data.cache_dir={cache}"]
    done = subprocess.run(
        [sys.executable, "-m", "d2v_train.pretrain", "modality=text", "data.vocab_size=600", "trainer.max_steps=2",
         f"hydra.run.dir={run_dir}", *common, *NO_PROBE_COMPARISON], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tokenizer = run_dir / "tokenizer.json"
    assert tokenizer.is_file()
    files = export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json") in files
    # the same vocabulary, with the <s> A </s> layout added for transformers' tokenizer
    from tokenizers import Tokenizer

    ours, exported = Tokenizer.from_file(str(tokenizer)), Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    text = "Return the sum of two numbers."
    assert exported.get_vocab() == ours.get_vocab()
    assert exported.encode(text).ids == [0, *ours.encode(text, add_special_tokens=False).ids, 2]
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    encoder = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    assert auto.model_max_length == encoder.config.max_position_embeddings - 2
    # the fine-tuning data would train a 4096-token BPE; the pretrained encoder knows 600 tokens
    done = subprocess.run(
        [sys.executable, "-m", "d2v_train.finetune", "head=token_classification",
         f"pretrained={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=2", "trainer.max_epochs=1",
         f"hydra.run.dir={tmp_path / 'ft'}", "export=false", *common], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
