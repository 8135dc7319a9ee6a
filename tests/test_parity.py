"""Our encoders against transformers' Data2Vec models built from the same random weights.

Each variant builds a random transformers model, saves it, loads it through our interop, and
compares every hidden state in eval mode (<= 1e-5, fp32) with padding exercised; then our encoder
is saved back and reloaded by transformers, which must report no missing or unexpected keys and
give identical outputs. The data2vec target tap is checked against forward hooks.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from d2v_train.interop import load_transformers, save_transformers  # noqa: E402

TOL = 1e-5

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)

AUDIO_VARIANTS = {
    "two_conv_no_bias": dict(conv_dim=[16, 24], conv_kernel=[10, 3], conv_stride=[5, 2], conv_bias=False,
                             num_conv_pos_embeddings=1, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4),
    "three_conv_bias_5pos": dict(conv_dim=[8, 8, 16], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], conv_bias=True,
                                 num_conv_pos_embeddings=5, conv_pos_kernel_size=4, num_conv_pos_embedding_groups=2),
    "odd_hidden": dict(hidden_size=36, num_attention_heads=3, intermediate_size=50, conv_dim=[12, 20],
                       conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=2,
                       conv_pos_kernel_size=3, num_conv_pos_embedding_groups=3, hidden_act="relu"),
    "no_mask_emb_adapter": dict(conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2], mask_time_prob=0.0,
                                num_conv_pos_embeddings=3, conv_pos_kernel_size=7, num_conv_pos_embedding_groups=4,
                                add_adapter=True, output_hidden_size=24, num_adapter_layers=2),
}

TEXT_VARIANTS = {
    "default_types": dict(vocab_size=99, type_vocab_size=2, max_position_embeddings=40, layer_norm_eps=1e-12),
    "roberta_like": dict(vocab_size=120, type_vocab_size=1, max_position_embeddings=34, layer_norm_eps=1e-5),
    "odd_hidden_gelu_new": dict(vocab_size=77, hidden_size=30, num_attention_heads=5, intermediate_size=41,
                                hidden_act="gelu_new", max_position_embeddings=40),
    "three_layers_pad0": dict(vocab_size=64, num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              type_vocab_size=3, max_position_embeddings=40),
}

VISION_VARIANTS = {
    "abs_pos_cls_norm": dict(image_size=32, patch_size=8, use_absolute_position_embeddings=True,
                             use_mean_pooling=False, layer_scale_init_value=0.0, use_mask_token=True),
    "per_layer_rel_bias": dict(image_size=32, patch_size=8, use_relative_position_bias=True,
                               layer_scale_init_value=0.1, use_mean_pooling=True),
    "shared_rel_bias": dict(image_size=24, patch_size=6, use_shared_relative_position_bias=True,
                            layer_scale_init_value=0.1, use_mean_pooling=False, layer_norm_eps=1e-6),
    "both_biases_abs": dict(image_size=32, patch_size=8, use_shared_relative_position_bias=True,
                            use_relative_position_bias=True, use_absolute_position_embeddings=True,
                            layer_scale_init_value=0.1, hidden_size=36, num_attention_heads=3),
}


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (zero-initialised biases and tables would hide mapping errors)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            centre = 1.0 if param.ndim == 1 and name.endswith("weight") else 0.0  # layer-norm scales near 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + centre)


def _compare(theirs, ours, valid=None):
    """Max abs difference of the last and every hidden state, on non-padded positions when given."""
    assert len(theirs.hidden_states) == len(ours.hidden_states)
    worst = (theirs.last_hidden_state - ours.last_hidden_state).abs().max().item()
    for a, b in zip(theirs.hidden_states, ours.hidden_states):
        assert a.shape == b.shape
        if valid is not None:
            a, b = a[valid], b[valid]
        worst = max(worst, (a - b).abs().max().item())
    return worst


def _roundtrip(ours, hf_cls, tmp_path, inputs, hf_kwargs, our_kwargs):
    save_transformers(ours, tmp_path / "export")
    reloaded, info = hf_cls.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded.eval()
    with torch.no_grad():
        a = reloaded(inputs, **hf_kwargs).last_hidden_state
        b = ours(inputs, **our_kwargs).last_hidden_state
    assert torch.equal(a, b) or (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(AUDIO_VARIANTS))
def test_audio_parity(name, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Data2VecAudioConfig(**{**SMALL, **AUDIO_VARIANTS[name]})
    hf = transformers.Data2VecAudioModel(cfg)
    _randomise(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()

    waves = torch.randn(3, 3000)
    attention = torch.ones(3, 3000, dtype=torch.long)
    attention[1, 2100:] = 0
    attention[2, 1200:] = 0
    waves = waves * attention
    with torch.no_grad():
        theirs = hf(waves, attention_mask=attention, output_hidden_states=True)
        out = ours(waves, padding_mask=attention == 0, output_hidden_states=True)
    frames = ours.frame_padding_mask(attention == 0, theirs.hidden_states[0].shape[1])
    assert frames.any() and not frames.all(), "padding must shorten some rows"
    assert _compare(theirs, out, ~frames) <= TOL
    _roundtrip(ours, transformers.Data2VecAudioModel, tmp_path, waves,
               dict(attention_mask=attention), dict(padding_mask=attention == 0))


@pytest.mark.parametrize("name", sorted(TEXT_VARIANTS))
def test_text_parity(name, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Data2VecTextConfig(**{**SMALL, **TEXT_VARIANTS[name]})
    hf = transformers.Data2VecTextModel(cfg)
    _randomise(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()

    pad = cfg.pad_token_id
    ids = torch.randint(3, cfg.vocab_size, (4, 12))
    lengths = torch.tensor([12, 9, 5, 1])
    attention = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(attention == 0, pad)
    types = torch.randint(0, cfg.type_vocab_size, (4, 12))
    with torch.no_grad():
        theirs = hf(ids, attention_mask=attention, token_type_ids=types, output_hidden_states=True)
        out = ours(ids, padding_mask=attention == 0, token_type_ids=types, output_hidden_states=True)
        plain_theirs = hf(ids, attention_mask=attention).pooler_output
    assert _compare(theirs, out, attention.bool()) <= TOL
    assert (plain_theirs - ours(ids, padding_mask=attention == 0).pooler_output).abs().max() <= TOL
    _roundtrip(ours, transformers.Data2VecTextModel, tmp_path, ids,
               dict(attention_mask=attention), dict(padding_mask=attention == 0))


@pytest.mark.parametrize("name", sorted(VISION_VARIANTS))
def test_vision_parity(name, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Data2VecVisionConfig(**{**SMALL, "drop_path_rate": 0.1, **VISION_VARIANTS[name]})
    hf = transformers.Data2VecVisionModel(cfg, add_pooling_layer=True)
    _randomise(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()

    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    kwargs = {}
    if cfg.use_mask_token:
        kwargs["bool_masked_pos"] = torch.rand(2, (cfg.image_size // cfg.patch_size) ** 2) < 0.5
    with torch.no_grad():
        theirs = hf(pixels, output_hidden_states=True, **kwargs)
        out = ours(pixels, output_hidden_states=True, mask=kwargs.get("bool_masked_pos"))
    assert _compare(theirs, out) <= TOL
    assert (theirs.pooler_output - out.pooler_output).abs().max().item() <= TOL
    _roundtrip(ours, transformers.Data2VecVisionModel, tmp_path, pixels, {}, {})


@pytest.mark.parametrize("name", ["abs_pos_cls_norm", "per_layer_rel_bias", "shared_rel_bias"])
def test_vision_other_resolution(name, tmp_path):
    """Interpolated absolute positions and resized relative-position tables at another image size."""
    torch.manual_seed(0)
    cfg = transformers.Data2VecVisionConfig(**{**SMALL, **VISION_VARIANTS[name]})
    hf = transformers.Data2VecVisionModel(cfg)
    _randomise(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()
    size = cfg.image_size + 2 * cfg.patch_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        theirs = hf(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        out = ours(pixels, output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == 1 + (size // cfg.patch_size) ** 2
    assert _compare(theirs, out) <= TOL


def _hooked(module_iter):
    captured = []
    handles = [m.register_forward_hook(lambda _m, _i, o: captured.append(o[0] if isinstance(o, tuple) else o))
               for m in module_iter]
    return captured, handles


def test_target_tap_audio_ffn(tmp_path):
    cfg = transformers.Data2VecAudioConfig(**{**SMALL, **AUDIO_VARIANTS["two_conv_no_bias"]})
    hf = transformers.Data2VecAudioModel(cfg).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()
    captured, handles = _hooked(layer.feed_forward for layer in hf.encoder.layers)
    waves = torch.randn(2, 2400)
    with torch.no_grad():
        hf(waves)
        out = ours(waves, layer_targets="ffn")
    for h in handles:
        h.remove()
    assert len(out.layer_targets) == len(captured) == cfg.num_hidden_layers
    for a, b in zip(captured, out.layer_targets):
        assert (a - b).abs().max().item() <= TOL


def test_target_tap_text_ffn(tmp_path):
    cfg = transformers.Data2VecTextConfig(**{**SMALL, **TEXT_VARIANTS["roberta_like"]})
    hf = transformers.Data2VecTextModel(cfg).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()
    captured, handles = _hooked(layer.output.dense for layer in hf.encoder.layer)
    ids = torch.randint(3, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        hf(ids)
        out = ours(ids, layer_targets="ffn")
    for h in handles:
        h.remove()
    for a, b in zip(captured, out.layer_targets):
        assert (a - b).abs().max().item() <= TOL
    # the tap is not the block output: that would be the post-norm hidden state
    assert (out.layer_targets[-1] - out.last_hidden_state).abs().max() > 1e-3


def test_target_tap_vision_block(tmp_path):
    cfg = transformers.Data2VecVisionConfig(**{**SMALL, **VISION_VARIANTS["shared_rel_bias"]})
    hf = transformers.Data2VecVisionModel(cfg).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_transformers(tmp_path / "hf").eval()
    captured, handles = _hooked(hf.encoder.layer)
    pixels = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        hf(pixels)
        out = ours(pixels, layer_targets="block")
        ffn = ours(pixels, layer_targets="ffn").layer_targets
    for h in handles:
        h.remove()
    for a, b in zip(captured, out.layer_targets):
        assert (a - b).abs().max().item() <= TOL
    assert all(t.shape == out.layer_targets[0].shape for t in ffn)
