"""Build tiny data2vec v1 and 2.0 models with the reference code (fairseq) and save golden fixtures.

Run with a Python that has the reference packages (NOT the project's venv), e.g.:

    python3 -m venv /tmp/fsvenv
    /tmp/fsvenv/bin/pip install "numpy<2" torch cython setuptools wheel
    /tmp/fsvenv/bin/pip install --no-build-isolation fairseq-fixed==0.12.3.1
    /tmp/fsvenv/bin/pip install timm torchvision        # BEiT layout for the vision fixture
    /tmp/fsvenv/bin/python scripts/make_fairseq_golden.py tests/fixtures/fairseq

For audio, text and vision (BEiT layout, via timm) it writes ``<modality>.pt`` (a checkpoint shaped like a fairseq one: ``model``
state dict + ``cfg.model`` as plain dicts, so ``torch.load(weights_only=True)`` reads it) and
``<modality>_io.pt`` (the input and the reference model's final encoder output, eval mode).
For data2vec 2.0 (fairseq ``data2vec_multi``) it writes ``d2v2_<modality>.pt`` / ``_io.pt`` the same
way: the pretraining state with its decoder (the EMA teacher is left out for size) and the output of ``extract_features(mask=False)``, the path fine-tuning takes.
``tests/test_fairseq_golden.py`` loads them with ``d2v_train.interop.fairseq.load_fairseq``
and compares, without fairseq installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DIM, LAYERS, HEADS, FFN = 32, 2, 4, 64
CONV = "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2"


def audio(out: Path) -> None:
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel

    cfg = Data2VecAudioConfig(
        conv_feature_layers=CONV, extractor_mode="layer_norm", encoder_embed_dim=DIM, encoder_layers=LAYERS,
        encoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0, conv_pos=15, pos_conv_depth=5,
        conv_pos_groups=4, layer_norm_first=False, ema_anneal_end_step=10, average_top_k_layers=2,
    )
    torch.manual_seed(0)
    model = Data2VecAudioModel(cfg).eval()
    with torch.no_grad():  # leave fairseq's init zeros/ones: every tensor random, so a wrong map shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wav = torch.randn(2, 1600, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = model.extract_features(wav, None, mask=False)
    keep = {"conv_feature_layers": CONV, "encoder_attention_heads": HEADS, "normalize": True}
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}, "cfg": {"model": keep}}, out / "audio.pt")
    torch.save({"inputs": wav, "last_hidden_state": res["x"].clone()}, out / "audio_io.pt")


def text(out: Path) -> None:
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerConfig

    # data2vec_text.py uses a dataclass instance as a field default, which Python >= 3.11 refuses
    # (it treats unhashable defaults as mutable); a hash lets the module import unchanged
    TransformerConfig.__hash__ = object.__hash__  # type: ignore[method-assign]
    from fairseq.examples.data2vec.models.data2vec_text import Data2VecTextConfig, Data2VecTextEncoder

    d = Dictionary()  # <s>=0 <pad>=1 </s>=2 <unk>=3, then symbols, then <mask>
    for i in range(20):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")
    tcfg = TransformerConfig()
    enc = tcfg.encoder
    enc.embed_dim, enc.ffn_embed_dim, enc.layers, enc.attention_heads = DIM, FFN, LAYERS, HEADS
    enc.normalize_before = False
    enc.learned_pos = True  # RoBERTa-style learned positions (offset by the pad index)
    tcfg.dropout = tcfg.attention_dropout = tcfg.activation_dropout = 0.0
    tcfg.layernorm_embedding = True
    tcfg.no_scale_embedding = True
    tcfg.max_source_positions = 16
    tcfg.activation_fn = "gelu"
    cfg = Data2VecTextConfig(max_positions=16, transformer=tcfg, average_top_k_layers=2, ema_anneal_end_step=10)
    torch.manual_seed(0)
    encoder = Data2VecTextEncoder(cfg, d, None).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        encoder.sentence_encoder.embed_tokens.weight[d.pad()].zero_()
    ids = torch.randint(4, len(d) - 1, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = d.bos(), d.eos()
    ids[1, 9:] = d.pad()
    ids[1, 8] = d.eos()
    with torch.no_grad():
        x, _ = encoder.extract_features(ids)
    state = {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    keep = {"encoder_attention_heads": HEADS}
    torch.save({"model": state, "cfg": {"model": keep}}, out / "text.pt")
    torch.save({"inputs": ids, "padding_mask": ids == d.pad(), "last_hidden_state": x.clone()}, out / "text_io.pt")


def vision(out: Path) -> None:
    """data2vec v1 vision was trained in the BEiT code base (not on PyPI); timm's ``Beit`` has the
    same module layout and key names (``blocks.N.attn.q_bias``, ``gamma_1``, the shared
    ``rel_pos_bias``), so it stands in for it here."""
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(img_size=16, patch_size=4, num_classes=0, embed_dim=DIM, depth=LAYERS, num_heads=HEADS,
                 mlp_ratio=FFN / DIM, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                 init_values=0.1, qkv_bias=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.forward_features(pixels)
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}}, out / "vision.pt")
    torch.save({"inputs": pixels, "last_hidden_state": x.clone()}, out / "vision_io.pt")


# ---------------------------------------------------------------------------------------------
# data2vec 2.0 (fairseq examples/data2vec/models/data2vec2.py, ``data2vec_multi``)

CONV2 = "[(16, 10, 5), (16, 3, 2), (16, 2, 2)]"  # a short CNN (stride 20) so a short clip gives many frames


def _import_data2vec2() -> tuple:
    """The reference 2.0 modules, importable under Python >= 3.11 and numpy >= 1.24.

    Their config dataclasses use dataclass instances as field defaults, which Python >= 3.11 refuses
    (it treats unhashable defaults as mutable); giving every dataclass created from here on
    ``object.__hash__`` lets them import unchanged. ``mae.py`` still uses the removed ``np.float``
    alias. The modules import themselves as the top-level package ``examples``.
    """
    import dataclasses
    import os

    import numpy as np

    if not getattr(dataclasses, "_d2v_hashable", False):
        process = dataclasses._process_class

        def hashable(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = process(cls, *args, **kwargs)
            if out.__hash__ is None:
                out.__hash__ = object.__hash__
            return out

        dataclasses._process_class = hashable
        dataclasses._d2v_hashable = True
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
    import fairseq

    sys.path.insert(0, os.path.dirname(fairseq.__file__))
    from examples.data2vec.data.modality import Modality
    from examples.data2vec.models.data2vec2 import D2vModalitiesConfig, Data2VecMultiConfig, Data2VecMultiModel
    from examples.data2vec.models.modalities.audio import D2vAudioConfig
    from examples.data2vec.models.modalities.images import D2vImageConfig
    from examples.data2vec.models.modalities.modules import D2vDecoderConfig
    from examples.data2vec.models.modalities.text import D2vTextConfig

    return (Modality, D2vModalitiesConfig, Data2VecMultiConfig, Data2VecMultiModel, D2vAudioConfig,
            D2vImageConfig, D2vTextConfig, D2vDecoderConfig)


def _plain(value):  # type: ignore[no-untyped-def]
    """A config as plain Python values (enums by name) so ``weights_only`` loading reads it."""
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _d2v2_model(modality: str, prenet: int, depth: int, modality_cfg_kwargs: dict, task=None):  # type: ignore[no-untyped-def]
    """A tiny ``Data2VecMultiModel`` for one modality, every trained tensor moved off its init."""
    (Modality, D2vModalitiesConfig, Data2VecMultiConfig, Data2VecMultiModel, D2vAudioConfig,
     D2vImageConfig, D2vTextConfig, D2vDecoderConfig) = _import_data2vec2()
    kind = {"audio": Modality.AUDIO, "text": Modality.TEXT, "vision": Modality.IMAGE}[modality]
    mod_cls = {"audio": D2vAudioConfig, "text": D2vTextConfig, "vision": D2vImageConfig}[modality]
    decoder = D2vDecoderConfig(decoder_dim=16, decoder_groups=4, decoder_kernel=3, decoder_layers=2, input_dropout=0.0)
    # the reference leaves these as interpolations ("${model.num_heads}") resolved by Hydra
    mod_cfg = mod_cls(prenet_depth=prenet, num_alibi_heads=HEADS, model_depth=depth, decoder=decoder,
                      **modality_cfg_kwargs)
    modalities = D2vModalitiesConfig(**{{"vision": "image"}.get(modality, modality): mod_cfg})
    cfg = Data2VecMultiConfig(
        depth=depth, num_heads=HEADS, embed_dim=DIM, mlp_ratio=FFN / DIM,
        norm_eps=1e-6 if modality == "vision" else 1e-5,
        encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0,
        layerdrop=0.0, average_top_k_layers=prenet + depth, instance_norm_target_layer=True,
        ema_anneal_end_step=10, max_update=10, seed=1, supported_modality=kind, modalities=modalities,
        ema_encoder_only=modality == "text",  # as the base recipes: audio and image EMA the whole model
    )
    torch.manual_seed(0)
    model = Data2VecMultiModel(cfg, [kind], task=task).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("fixed_positional_encoder.positions"):
                continue  # the fixed sin-cos table is not trained: a real checkpoint holds it unchanged
            p.add_(0.05 * torch.randn_like(p))
    return model, cfg


def _save_d2v2(out: Path, modality: str, model, cfg, io: dict) -> None:  # type: ignore[no-untyped-def]
    # "_ema" (the EMA teacher, a nested dict of tensors) is left out to keep the fixture small: it
    # would double the file, and the importer skips it as it skips every non-tensor entry (the tests
    # put one back to check that)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "_ema"}
    torch.save({"model": state, "cfg": {"model": _plain(cfg)}}, out / f"d2v2_{modality}.pt")
    torch.save(io, out / f"d2v2_{modality}_io.pt")


def d2v2_audio(out: Path) -> None:
    """ALiBi with a learned per-head scale (one head's scale pushed below 0: it must clamp to 0),
    a 2-layer conv positional encoder, 1 prenet block + 1 main block; one full and one padded clip."""
    model, cfg = _d2v2_model(
        "audio", prenet=1, depth=1,
        modality_cfg_kwargs=dict(feature_encoder_spec=CONV2, conv_pos_width=10, conv_pos_depth=2, conv_pos_groups=4,
                                 use_alibi_encoder=True, learned_alibi_scale=True, learned_alibi_scale_per_head=True,
                                 prenet_dropout=0.0),
    )
    enc = model.modality_encoders["AUDIO"]
    with torch.no_grad():
        enc.alibi_scale.copy_(torch.tensor([0.5, 1.5, -0.3, 1.0]).view(1, 1, HEADS, 1, 1))
    wav = torch.randn(2, 800, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 800, dtype=torch.bool)
    padding[1, 500:] = True  # the second clip is shorter: padded as a collater pads it
    wav[padding] = 0.0
    with torch.no_grad():
        res = model.extract_features(wav, padding_mask=padding, mask=False)
    _save_d2v2(out, "audio", model, cfg, {"inputs": wav, "padding_mask": padding, "last_hidden_state": res["x"].clone(),
                                          "output_padding_mask": res["padding_mask"].clone()})


def d2v2_text(out: Path) -> None:
    """The base text recipe's layout: no prenet (so no norm between the embeddings and the blocks)."""
    import types

    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(20):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")
    model, cfg = _d2v2_model("text", prenet=0, depth=LAYERS, modality_cfg_kwargs=dict(max_source_positions=16, dropout=0.0),
                             task=types.SimpleNamespace(source_dictionary=d))
    ids = torch.randint(4, len(d) - 1, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = d.bos(), d.eos()
    ids[1, 9:] = d.pad()
    ids[1, 8] = d.eos()
    padding = ids.eq(d.pad())
    with torch.no_grad():
        res = model.extract_features(ids, padding_mask=padding, mask=False)
    _save_d2v2(out, "text", model, cfg, {"inputs": ids, "padding_mask": padding, "last_hidden_state": res["x"].clone()})


def d2v2_vision(out: Path) -> None:
    """16x16 images, 4x4 patches, one CLS token (kept in the compared output), 1 prenet + 1 main block."""
    model, cfg = _d2v2_model(
        "vision", prenet=1, depth=1,
        modality_cfg_kwargs=dict(input_size=16, patch_size=4, embed_dim=DIM, num_extra_tokens=1,
                                 init_extra_token_zero=False, use_alibi_encoder=False),
    )
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = model.extract_features(pixels, mask=False, remove_extra_tokens=False)
    _save_d2v2(out, "vision", model, cfg, {"inputs": pixels, "last_hidden_state": res["x"].clone()})


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "tests/fixtures/fairseq")
    out.mkdir(parents=True, exist_ok=True)
    audio(out)
    text(out)
    vision(out)
    d2v2_audio(out)
    d2v2_text(out)
    d2v2_vision(out)
    for f in sorted(out.glob("*.pt")):
        print(f, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
