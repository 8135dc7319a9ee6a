"""Golden check of the fairseq import against the reference code itself.

``tests/fixtures/fairseq/`` holds tiny data2vec v1 audio and text models built and run by fairseq,
a BEiT-layout vision model built and run by timm, and tiny data2vec 2.0 (``data2vec_multi``) audio,
text and image models built and run by fairseq (``scripts/make_fairseq_golden.py``, in a separate
venv with ``fairseq-fixed`` and ``timm``): their checkpoints and the reference encoder's output on a
fixed input. Our importer must reproduce that output, which checks the key map, the inferred
config and the layer maths against the reference, not against our own inverse map.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from d2v_train.interop.fairseq import detect_checkpoint, load_fairseq, read_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fairseq"
V1 = ["audio", "text", "vision"]
V2 = ["d2v2_audio", "d2v2_text", "d2v2_vision"]


def _output(encoder, io: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, reference) encoder outputs on the fixture input; padded text rows are don't-care."""
    with torch.no_grad():
        out = encoder(io["inputs"], padding_mask=io.get("padding_mask")).last_hidden_state
    expected = io["last_hidden_state"]
    if "padding_mask" in io:  # padded positions are don't-care: compare the real tokens / frames
        valid = ~io.get("output_padding_mask", io["padding_mask"])
        return out[valid], expected[valid]
    return out, expected


@pytest.mark.parametrize("name", V1 + V2)
def test_reference_checkpoint_reproduces_reference_output(name: str) -> None:
    modality = name.removeprefix("d2v2_")
    encoder = load_fairseq(FIXTURES / f"{name}.pt")
    assert encoder.modality == modality
    out, expected = _output(encoder, torch.load(FIXTURES / f"{name}_io.pt", weights_only=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.1  # a real signal, not all zeros


def test_versions_and_modalities_are_told_apart() -> None:
    found = {name: detect_checkpoint(read_checkpoint(FIXTURES / f"{name}.pt")[0]) for name in V1 + V2}
    assert found == {**{m: ("v1", m) for m in V1}, **{f"d2v2_{m}": ("2.0", m) for m in V1}}


def test_v2_import_uses_the_stored_config_and_drops_pretraining_parts() -> None:
    raw, stored = read_checkpoint(FIXTURES / "d2v2_audio.pt")
    assert any(".decoder." in k for k in raw)  # the fixture has the decoder the import must drop
    encoder = load_fairseq(FIXTURES / "d2v2_audio.pt")
    c = encoder.config
    assert (c.conv_stride, c.num_attention_heads, c.num_hidden_layers) == ([5, 2, 2], stored["num_heads"], 2)
    assert c.use_alibi and encoder.alibi_scale.tolist()[2] < 0  # stored as trained; clamped when used
    # the reference leaves padded frames un-zeroed before the positional convolutions; zeroing them
    # (v1 / transformers) changes the padded clip's real frames
    io = torch.load(FIXTURES / "d2v2_audio_io.pt", weights_only=True)
    assert not c.pos_conv_zero_padding and io["output_padding_mask"][1].any()
    with torch.no_grad():
        padded = encoder(io["inputs"], padding_mask=io["padding_mask"])
    assert torch.equal(padded.padding_mask, io["output_padding_mask"])
    out, expected = _output(load_fairseq(FIXTURES / "d2v2_audio.pt", pos_conv_zero_padding=True), io)
    assert (out - expected).abs().max() > 1e-2
    vision = load_fairseq(FIXTURES / "d2v2_vision.pt").config
    assert vision.use_sincos_position_embeddings and not vision.norm_first and vision.image_size == 16


def _rewrite(tmp_path: Path, name: str, edit) -> Path:
    """The fixture's checkpoint with ``edit(state, cfg)`` applied, saved as fairseq does (OmegaConf cfg)."""
    checkpoint = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    state, cfg = dict(checkpoint["model"]), checkpoint["cfg"]["model"]
    edit(state, cfg)
    path = tmp_path / f"{name}.pt"
    torch.save({"model": state, "cfg": OmegaConf.create({"model": cfg}), "args": None}, path)
    return path


def test_v2_teacher_and_other_modalities_are_skipped(tmp_path: Path) -> None:
    """A released file carries the EMA teacher (``_ema``, a dict of tensors); a multi-modal model
    carries other modalities' input encoders, and then the modality must be named."""
    def add(state, cfg):
        state["_ema"] = {k: v.clone() for k, v in state.items() if k.startswith("blocks.")}
        state["modality_encoders.TEXT.local_encoder.embed_tokens.weight"] = torch.zeros(5, 32)

    path = _rewrite(tmp_path, "d2v2_audio", add)
    with pytest.raises(ValueError, match=r"holds the modality encoders \['AUDIO', 'TEXT'\]: pass modality="):
        load_fairseq(path)
    out, expected = _output(load_fairseq(path, modality="audio"),
                            torch.load(FIXTURES / "d2v2_audio_io.pt", weights_only=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, edit, message", [
    ("d2v2_vision", lambda s, c: s.update({"blocks.0.mlp.fc3.weight": s.pop("blocks.0.mlp.fc2.weight")}),
     r"'blocks\.0\.mlp\.fc3\.weight' is not in the data2vec 2\.0 vision key table"),
    ("d2v2_vision", lambda s, c: s.pop("modality_encoders.IMAGE.context_encoder.norm.bias"),
     r"missing \['embed_norm\.bias'\]"),
    ("d2v2_vision", lambda s, c: s["modality_encoders.IMAGE.fixed_positional_encoder.positions"].mul_(1.01),
     r"positions' is not the fixed 2-D sin-cos table of a 4x4 grid"),
    ("d2v2_audio", lambda s, c: s.update({"modality_encoders.AUDIO.alibi_scale": torch.ones(2, 1, 4, 1, 1)}),
     r"alibi_scale' has shape \(2, 1, 4, 1, 1\): one ALiBi scale per layer"),
    ("d2v2_audio", lambda s, c: s.update({"modality_encoders.AUDIO.alibi_scale": torch.ones(1, 1, 3, 1, 1)}),
     r"alibi_scale' has shape \(1, 1, 3, 1, 1\); expected \(1, 1, 4 or 1, 1, 1\)"),
    ("d2v2_vision", lambda s, c: s.pop("modality_encoders.IMAGE.extra_tokens"), r"no '.*extra_tokens' \(num_extra"),
    ("d2v2_text", lambda s, c: s.update({"modality_encoders.TEXT.context_encoder.norm.weight": torch.ones(32)}),
     r"context_encoder\.norm\.weight' cannot be imported: a second layer norm after the embeddings"),
    ("d2v2_text", lambda s, c: s.update({"norm.weight": torch.ones(32)}),
     r"'norm\.weight' cannot be imported: a final norm means a pre-norm model"),
    ("d2v2_text", lambda s, c: c.update({"layer_norm_first": True}), r"layer_norm_first=true"),
])
def test_v2_corrupt_or_unsupported_checkpoints_fail_in_one_line(tmp_path: Path, name, edit, message) -> None:
    with pytest.raises(ValueError, match=message) as err:
        load_fairseq(_rewrite(tmp_path, name, edit))
    assert "\n" not in str(err.value)


def test_v2_alibi_scale_shared_by_all_heads_is_spread_over_them(tmp_path: Path) -> None:
    path = _rewrite(tmp_path, "d2v2_audio",
                    lambda s, c: s.update({"modality_encoders.AUDIO.alibi_scale": torch.full((1, 1, 1, 1, 1), 0.7)}))
    assert load_fairseq(path).alibi_scale.tolist() == pytest.approx([0.7] * 4)


def test_v2_checkpoint_exports_end_to_end(tmp_path: Path) -> None:
    """``d2v-export`` on a fairseq 2.0 file: text to transformers (its architecture is RoBERTa's),
    audio with ALiBi to our safetensors format (transformers has no ALiBi audio model: one line)."""
    transformers = pytest.importorskip("transformers")
    import d2v_train
    from d2v_train.cli import ConfigError
    from d2v_train.export import run

    def export(name: str, out: Path, fmt: str):
        return run(OmegaConf.create({"checkpoint": str(FIXTURES / f"{name}.pt"), "output_dir": str(out),
                                     "format": fmt, "weights": "student"}))

    export("d2v2_text", tmp_path / "text", "hf")
    model = transformers.Data2VecTextModel.from_pretrained(tmp_path / "text", add_pooling_layer=False).eval()
    io = torch.load(FIXTURES / "d2v2_text_io.pt", weights_only=True)
    with torch.no_grad():
        out = model(io["inputs"], attention_mask=(~io["padding_mask"]).long()).last_hidden_state
    valid = ~io["padding_mask"]
    torch.testing.assert_close(out[valid], io["last_hidden_state"][valid], rtol=1e-4, atol=1e-4)

    with pytest.raises(ConfigError, match="ALiBi"):
        export("d2v2_audio", tmp_path / "audio_hf", "hf")
    export("d2v2_audio", tmp_path / "audio", "safetensors")
    out, expected = _output(d2v_train.load_encoder(tmp_path / "audio"),
                            torch.load(FIXTURES / "d2v2_audio_io.pt", weights_only=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
