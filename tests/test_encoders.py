"""Encoder behaviour beyond parity: padding, masking, train-mode stochasticity, errors, precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2v_train.models import AudioEncoderConfig, build_encoder

BLOCK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
AUDIO = dict(BLOCK, conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=2,
             conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4)
TEXT = dict(BLOCK, vocab_size=40, max_position_embeddings=34)
VISION = dict(BLOCK, image_size=16, patch_size=4, use_mask_token=True, use_shared_relative_position_bias=True)


def test_default_audio_receptive_field_is_400_samples():
    assert AudioEncoderConfig().receptive_field == 400


def test_audio_padding_does_not_change_real_frames():
    """Exact with one positional conv. With several, padded frames are zeroed only before the
    first (as in transformers, whose outputs we match), so the last real frames see the padding:
    the reference pretraining batches crop to the shortest clip instead of padding."""
    torch.manual_seed(0)
    encoder = build_encoder("audio", dict(AUDIO, num_conv_pos_embeddings=1)).eval()
    short = torch.randn(1, 900)
    padded = torch.cat([short, torch.zeros(1, 700)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 1600)])
    padding = torch.zeros(2, 1600, dtype=torch.bool)
    padding[0, 900:] = True
    with torch.no_grad():
        alone = encoder(short, layer_targets="ffn")
        together = encoder(batch, padding_mask=padding, layer_targets="ffn")
    frames = alone.last_hidden_state.shape[1]
    assert together.padding_mask[0].sum() == together.padding_mask.shape[1] - frames
    assert torch.allclose(together.last_hidden_state[0, :frames], alone.last_hidden_state[0], atol=1e-5)
    for a, b in zip(alone.layer_targets, together.layer_targets):
        assert torch.allclose(b[0, :frames], a[0], atol=1e-5)


def test_text_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    encoder = build_encoder("text", TEXT).eval()
    ids = torch.randint(3, 40, (1, 6))
    batch = torch.cat([torch.cat([ids, torch.full((1, 4), 1)], 1), torch.randint(3, 40, (1, 10))])
    padding = batch.eq(1)
    with torch.no_grad():
        alone = encoder(ids).last_hidden_state
        together = encoder(batch, padding_mask=padding).last_hidden_state
    assert torch.allclose(together[0, :6], alone[0], atol=1e-5)


def test_mask_embedding_replaces_masked_frames_only():
    torch.manual_seed(0)
    encoder = build_encoder("audio", AUDIO).eval()
    waves = torch.randn(2, 1600)
    tokens, _ = encoder.embed(waves)
    mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    mask[:, 5:9] = True
    captured = {}
    handle = encoder.pos_conv.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        encoder.contextualize(tokens, mask=mask)
    handle.remove()
    x = captured["x"]
    assert torch.equal(x[mask], encoder.mask_embedding.expand(int(mask.sum()), -1))
    assert torch.equal(x[~mask], tokens[~mask])


def test_vision_mask_requires_mask_token():
    encoder = build_encoder("vision", dict(VISION, use_mask_token=False))
    with pytest.raises(ValueError, match="use_mask_token=True"):
        encoder(torch.randn(1, 3, 16, 16), mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"one entry per patch"):
        build_encoder("vision", VISION)(torch.randn(1, 3, 16, 16), mask=torch.ones(1, 17, dtype=torch.bool))


def test_text_rejects_token_level_mask():
    with pytest.raises(ValueError, match="<mask>"):
        build_encoder("text", TEXT)(torch.randint(3, 40, (1, 5)), mask=torch.ones(1, 5, dtype=torch.bool))


def test_train_mode_is_stochastic_eval_is_not():
    torch.manual_seed(0)
    encoder = build_encoder("vision", dict(VISION, drop_path_rate=0.5, hidden_dropout_prob=0.1))
    pixels = torch.randn(4, 3, 16, 16)
    encoder.train()
    assert not torch.equal(encoder(pixels).last_hidden_state, encoder(pixels).last_hidden_state)
    encoder.eval()
    assert torch.equal(encoder(pixels).last_hidden_state, encoder(pixels).last_hidden_state)


def test_layerdrop_skips_blocks_but_never_when_targets_are_requested():
    torch.manual_seed(0)
    encoder = build_encoder("audio", dict(AUDIO, num_hidden_layers=6, layerdrop=0.5, hidden_dropout=0.0,
                                          attention_dropout=0.0, activation_dropout=0.0)).train()
    waves = torch.randn(1, 1600)
    depths = {len(encoder(waves, output_hidden_states=True).hidden_states) - 1 for _ in range(20)}
    assert min(depths) < 6
    assert len(encoder(waves, layer_targets="ffn").layer_targets) == 6


def test_audio_convolutions_keep_one_memory_layout():
    """Every CNN and positional-conv layer hands on a contiguous (batch, channels, frames) tensor: a
    strided view left by the channel LayerNorm made the activation's backward and the next conv about
    twice as slow on CPU (the speed, not the numbers, is what this guards)."""
    encoder = build_encoder("audio", AUDIO)
    outputs = []
    layers = [*encoder.feature_extractor.layers, *encoder.pos_conv.layers]
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in layers]
    encoder(torch.randn(2, 1600)).last_hidden_state.sum().backward()
    for hook in hooks:
        hook.remove()
    assert len(outputs) == len(layers)
    assert all(out.is_contiguous() for out in outputs)


@pytest.fixture
def sdpa_masks(monkeypatch) -> list:
    """The ``attn_mask`` of every ``scaled_dot_product_attention`` call, in order."""
    masks = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return masks


def test_attention_runs_through_sdpa(sdpa_masks):
    encoder = build_encoder("text", TEXT).eval()
    ids = torch.randint(3, 40, (2, 7))
    encoder(ids, padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    assert len(sdpa_masks) == 2 and sdpa_masks[0].dtype == torch.bool


@pytest.mark.parametrize("modality, config, inputs, padded", [
    ("audio", AUDIO, torch.randn(2, 1600), True),
    ("audio", dict(AUDIO, use_alibi=True), torch.randn(2, 1600), True),
    ("text", TEXT, torch.randint(3, 40, (2, 8)), True),
    ("vision", VISION, torch.randn(2, 3, 16, 16), False),
    ("vision", dict(VISION, use_shared_relative_position_bias=False, use_relative_position_bias=True),
     torch.randn(2, 3, 16, 16), False),
    ("vision", VISION, torch.randn(2, 3, 24, 24), False),  # a resized bias
])
def test_attention_masks_reach_sdpa_with_unit_last_stride(sdpa_masks, modality, config, inputs, padded):
    """CUDA's fused attention kernels refuse a mask whose last dimension is strided and fall back to
    the fp32 math path (the relative position bias as a permuted view cost v1 vision on an H200 about
    0.6 ms of attention per layer); CPU's kernel accepts either, so only the stride can be checked here."""
    padding = None
    if padded:
        padding = torch.zeros(inputs.shape[:2], dtype=torch.bool)
        padding[1, inputs.shape[1] // 2:] = True
    encoder = build_encoder(modality, config)
    encoder(inputs, **({"padding_mask": padding} if padded else {})).last_hidden_state.sum().backward()
    assert len(sdpa_masks) == 2
    assert all(m is not None and m.stride(-1) == 1 for m in sdpa_masks), [m.stride() for m in sdpa_masks if m is not None]


@pytest.mark.parametrize(
    "modality, config, inputs, message",
    [
        ("audio", AUDIO, torch.randn(2, 15), "fewer than the CNN's receptive field"),
        ("audio", AUDIO, torch.randn(2, 1, 1600), r"shape \(batch, samples\)"),
        ("text", TEXT, torch.randint(0, 40, (1, 40)), "allows at most 32"),
        ("text", TEXT, torch.full((1, 4), 99), r"token ids must lie in \[0, 40\)"),
        ("text", TEXT, torch.randn(1, 4), "integer token ids"),
        ("vision", VISION, torch.randn(1, 1, 16, 16), r"\(batch, 3, H, W\)"),
    ],
)
def test_bad_inputs_get_clear_errors(modality, config, inputs, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(modality, config)(inputs)


@pytest.mark.parametrize(
    "modality, config, message",
    [
        ("audio", dict(AUDIO, conv_kernel=[10]), "same length"),
        ("audio", dict(AUDIO, num_conv_pos_embedding_groups=5), "num_conv_pos_embedding_groups"),
        ("text", dict(TEXT, num_attention_heads=5), "multiple of num_attention_heads"),
        ("vision", dict(VISION, image_size=18), "multiple of patch_size"),
        ("nope", {}, "unknown modality"),
    ],
)
def test_bad_configs_get_clear_errors(modality, config, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(modality, config)


def _seeded(seed: int = 0) -> torch.Generator:
    """Inputs made at collection time draw from their own generator: the global one's state there
    depends on which modules were imported before, so a bound checked on them would vary by run."""
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("modality, config, inputs", [
    ("audio", AUDIO, torch.randn(2, 1600, generator=_seeded())),
    ("text", TEXT, torch.randint(3, 40, (2, 8), generator=_seeded())),
    ("vision", VISION, torch.randn(2, 3, 16, 16, generator=_seeded())),
])
def test_bf16_autocast_forward_backward(modality, config, inputs):
    torch.manual_seed(0)
    encoder = build_encoder(modality, config).eval()
    with torch.no_grad():
        reference = encoder(inputs).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(inputs, layer_targets="ffn")
    out.last_hidden_state.float().square().mean().backward()
    assert out.layer_targets[0].dtype == torch.bfloat16  # matmuls ran in bf16
    assert all(p.grad is not None for p in encoder.transformer.parameters())
    assert (out.last_hidden_state.float() - reference).abs().max() < 0.1


def test_relative_position_bias_other_grid_is_resized():
    encoder = build_encoder("vision", VISION).eval()
    with torch.no_grad():
        encoder.rel_pos_bias.table.normal_()
    out = encoder(torch.randn(1, 3, 24, 24))
    assert out.last_hidden_state.shape == (1, 1 + 36, 32)
    assert torch.isfinite(out.last_hidden_state).all()


def test_relative_position_index_cached_in_inference_mode_serves_training():
    encoder = build_encoder("vision", VISION)
    with torch.inference_mode():
        encoder.eval()(torch.randn(1, 3, 16, 16))
    encoder.train()(torch.randn(1, 3, 16, 16)).last_hidden_state.sum().backward()
    assert encoder.rel_pos_bias.table.grad is not None
