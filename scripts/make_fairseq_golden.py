"""Build tiny data2vec v1 models with the reference code (fairseq) and save golden fixtures.

Run with a Python that has the reference packages (NOT the project's venv), e.g.:

    python3 -m venv /tmp/fsvenv
    /tmp/fsvenv/bin/pip install "numpy<2" torch cython setuptools wheel
    /tmp/fsvenv/bin/pip install --no-build-isolation fairseq-fixed==0.12.3.1
    /tmp/fsvenv/bin/pip install timm torchvision        # BEiT layout for the vision fixture
    /tmp/fsvenv/bin/python scripts/make_fairseq_golden.py tests/fixtures/fairseq

For audio, text and vision (BEiT layout, via timm) it writes ``<modality>.pt`` (a checkpoint shaped like a fairseq one: ``model``
state dict + ``cfg.model`` as plain dicts, so ``torch.load(weights_only=True)`` reads it) and
``<modality>_io.pt`` (the input and the reference model's final encoder output, eval mode).
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


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "tests/fixtures/fairseq")
    out.mkdir(parents=True, exist_ok=True)
    audio(out)
    text(out)
    vision(out)
    for f in sorted(out.glob("*.pt")):
        print(f, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
