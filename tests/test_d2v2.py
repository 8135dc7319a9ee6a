"""data2vec 2.0: visible-only student, multi-mask targets, conv decoder, ALiBi, presets that learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from d2v_train.lightning import Data2VecPretraining
from d2v_train.lightning.optim import OptimConfig, param_groups
from d2v_train.models import ENCODERS, build_encoder
from d2v_train.models.positions import alibi_bias, alibi_slopes, sincos_2d
from d2v_train.models.visible import gather_tokens, keep_index, scatter_tokens
from d2v_train.objective.config import DecoderConfig
from d2v_train.objective.decoder import ConvDecoder
from d2v_train.objective.masking import MaskingConfig, compute_mask
from d2v_train.objective.multimask import clone_targets, teacher_targets
from d2v_train.pretrain import validate_config

from test_configs import compose_cfg
from test_pretrain import SPECIAL, fixed_batch, run

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def v2_encoder(modality: str) -> torch.nn.Module:
    if modality == "vision":
        extra = dict(
            image_size=16, patch_size=4, use_mean_pooling=True, drop_path_rate=0.0, layer_scale_init_value=0.0,
            use_sincos_position_embeddings=True, norm_first=False,
        )
    elif modality == "audio":
        extra = dict(
            conv_dim=[16] * 7, num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
            use_alibi=True,
        )
    else:
        extra = dict(
            vocab_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, add_pooling_layer=False,
        )
    torch.manual_seed(0)
    return build_encoder(modality, {**COMMON, **extra})


def embedded(modality: str, enc: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    batch = fixed_batch(modality)
    return enc.embed(batch["inputs"], batch["padding_mask"])


# ------------------------------------------------------------------------------- gather / scatter


def test_gather_scatter_round_trip_keeps_order() -> None:
    g = torch.Generator().manual_seed(0)
    mask = compute_mask(MaskingConfig(kind="random", mask_prob=0.6), (5, 12), generator=g)
    x = torch.randn(5, 12, 3, generator=g)
    idx = keep_index(mask)
    assert idx.shape == (5, 12 - int(0.6 * 12)) and bool((idx[:, 1:] > idx[:, :-1]).all())
    kept = gather_tokens(x, idx)
    assert torch.equal(kept, x[~mask].view(5, -1, 3))  # the kept tokens, in their original order
    fill = torch.full_like(x, -7.0)
    back = scatter_tokens(kept, idx, fill)
    assert torch.equal(back[~mask], x[~mask]) and bool((back[mask] == -7.0).all())
    uneven = mask.clone()
    uneven[0, idx[0, 0]] = True
    with pytest.raises(ValueError, match="same number of masked tokens"):
        keep_index(uneven)


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("inverse_block", dict(mask_prob=0.8, block_size=3, mask_adjust=0.07)),
        ("block_1d", dict(mask_prob=0.5, block_size=5, mask_adjust=0.05)),
        ("random", dict(mask_prob=0.48)),
        ("span", dict(mask_prob=0.65, mask_length=4)),
    ],
)
def test_exact_masked_counts_per_row(kind: str, extra: dict[str, Any]) -> None:
    cfg = MaskingConfig(kind=kind, **extra)
    g = torch.Generator().manual_seed(3)
    if kind == "inverse_block":
        mask = compute_mask(cfg, (64, 196), grid=(14, 14), generator=g)
        assert bool((mask.sum(1) == 196 - int(196 * 0.2)).all())  # 157 of 196, as the reference
        return
    pad = torch.zeros(48, 90, dtype=torch.bool)
    pad[::3, 60:] = True  # a third of the rows are padded: counts follow the shortest
    mask = compute_mask(cfg, tuple(pad.shape), padding_mask=pad, generator=g)
    counts = mask.sum(1)
    assert int(counts.min()) == int(counts.max()) > 0
    assert not bool((mask & pad).any())
    if kind != "span":
        assert int(counts[0]) == int(60 * cfg.mask_prob)
    keep_index(mask)  # gatherable


# ------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("modality", ["audio", "text", "vision"])
def test_drop_masked_encodes_kept_tokens_with_their_positions(modality: str) -> None:
    enc = v2_encoder(modality).eval()
    tokens, pad = embedded(modality, enc)
    batch, length = tokens.shape[:2]
    # nothing masked: the kept-only path is exactly the ordinary forward
    none = torch.zeros(batch, length, dtype=torch.bool)
    full = enc.contextualize(tokens, pad)
    kept_all = enc.contextualize(tokens, pad, mask=none, drop_masked=True)
    torch.testing.assert_close(kept_all.last_hidden_state, full.last_hidden_state, rtol=1e-5, atol=1e-5)
    # with a mask: only kept tokens come out, and the masked tokens' content cannot leak in
    g = torch.Generator().manual_seed(0)
    mask = compute_mask(MaskingConfig(kind="random", mask_prob=0.5), (batch, length), padding_mask=pad, generator=g)
    out = enc.contextualize(tokens, pad, mask=mask, drop_masked=True)
    prefix = enc.num_prefix_tokens
    assert out.last_hidden_state.shape == (batch, prefix + int((~mask[0]).sum()), tokens.shape[-1])
    assert torch.equal(out.kept_index, keep_index(mask))
    noisy = torch.where(mask[..., None], torch.randn_like(tokens) * 5, tokens)
    again = enc.contextualize(noisy, pad, mask=mask, drop_masked=True)
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state, rtol=1e-5, atol=1e-5)
    # positions come in before masking: moving the kept tokens elsewhere changes the output
    if modality != "text":  # text positions live in the embeddings themselves
        shifted = enc.contextualize(tokens, pad, mask=mask.roll(1, dims=1), drop_masked=True)
        assert not torch.allclose(shifted.last_hidden_state[:, prefix:], out.last_hidden_state[:, prefix:])


def test_alibi_bias_equals_explicit_distance_matrix() -> None:
    for heads in (4, 6, 12):
        slopes = alibi_slopes(heads)
        low = 2 ** (heads.bit_length() - 1)
        assert slopes[0] == pytest.approx(2 ** (-8 / low)) and len(slopes) == heads
        assert bool((slopes > 0).all()) and bool((slopes <= 1).all())
    slopes = alibi_slopes(4)
    assert torch.allclose(slopes, torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    scale = torch.tensor([1.0, 0.5, -1.0, 2.0])  # a negative learned scale is clamped to 0
    pos = torch.tensor([[0, 2, 3, 7], [1, 4, 5, 6]])
    bias = alibi_bias(pos, slopes, scale)
    expected = torch.zeros(2, 4, 4, 4)
    for b in range(2):
        for h in range(4):
            for i in range(4):
                for j in range(4):
                    expected[b, h, i, j] = -float(slopes[h]) * max(float(scale[h]), 0.0) * abs(int(pos[b, i]) - int(pos[b, j]))
    torch.testing.assert_close(bias, expected)
    # the kept tokens' bias is the full sequence's bias at their rows and columns
    full = alibi_bias(torch.arange(8), slopes, scale)[0]
    torch.testing.assert_close(bias[0], full[:, pos[0]][:, :, pos[0]])


def test_alibi_reaches_attention_and_its_scale_learns_without_weight_decay() -> None:
    enc = v2_encoder("audio")
    tokens, pad = embedded("audio", enc)
    before = enc.contextualize(tokens, pad).last_hidden_state
    with torch.no_grad():
        enc.alibi_scale.zero_()
    assert not torch.allclose(enc.contextualize(tokens, pad).last_hidden_state, before)
    enc.contextualize(tokens, pad).last_hidden_state.sum().backward()
    assert enc.alibi_scale.grad is not None
    groups = param_groups({"student": enc}, OptimConfig(weight_decay=0.01))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(enc.alibi_scale) in no_decay


def test_cls_token_init_is_the_2_0_references_for_the_2_0_layout_only() -> None:
    # data2vec 2.0 draws its image CLS from N(0, 1); the BEiT/v1 layout keeps truncated N(0, 0.02)
    layout = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "configs/encoder/vision_large_v2.yaml"))
    small = dict(num_hidden_layers=1, intermediate_size=64, image_size=32)
    stds = {}
    for name, extra in (("v2", {}), ("v1", dict(use_sincos_position_embeddings=False, norm_first=True))):
        torch.manual_seed(0)
        cls = build_encoder("vision", {**layout, **small, **extra}).cls_token.detach()  # type: ignore[dict-item]
        assert cls.shape == (1, 1, 1024)
        stds[name] = cls.std().item()
        if name == "v2":
            assert abs(cls.mean().item()) < 0.1 and cls.abs().max() > 2.5  # N(0, 1), not cut at +-2 as trunc_normal_ cuts by default
    assert stds["v2"] == pytest.approx(1.0, abs=0.08) and stds["v1"] == pytest.approx(0.02, abs=0.003)


def test_sincos_positions_are_fixed_and_distinct() -> None:
    pos = sincos_2d(16, (3, 5))
    assert pos.shape == (1, 15, 16)
    assert torch.cdist(pos[0], pos[0]).add(torch.eye(15)).min() > 0.1  # every patch has its own code
    enc = v2_encoder("vision")
    assert not any("pos" in n for n, _ in enc.named_parameters())  # not trained


# ------------------------------------------------------------------------------- decoder


@pytest.mark.parametrize(
    "spatial, cfg",
    [
        (False, DecoderConfig(dim=48, kernel=7, layers=4, groups=16, residual=True)),  # audio
        (False, DecoderConfig(dim=32, kernel=9, layers=5, groups=1, residual=False, projection_layers=2)),  # text
        (True, DecoderConfig(dim=32, kernel=3, layers=6, groups=16, residual=True, input_dropout=0.0)),  # images
    ],
)
def test_decoder_shapes(spatial: bool, cfg: DecoderConfig) -> None:
    dec = ConvDecoder(32, 32, cfg, spatial=spatial)
    x = torch.randn(6, 20, 32)
    out = dec(x, (4, 5)) if spatial else dec(x)
    assert out.shape == (6, 20, 32)
    first = dec.blocks[0][0]
    assert isinstance(first, torch.nn.Conv2d if spatial else torch.nn.Conv1d) and first.groups == cfg.groups
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in dec.modules())  # channel norm has no affine
    # memory layout each conv receives (speed): contiguous over time, channels-last over the grid
    normed = []
    hook = dec.blocks[0][1].register_forward_hook(lambda _m, _i, out: normed.append(out))
    dec(x, (4, 5)) if spatial else dec(x)
    hook.remove()
    fmt = torch.channels_last if spatial else torch.contiguous_format
    assert normed[0].is_contiguous(memory_format=fmt)
    if spatial:  # one k=3 layer sees the 3x3 neighbourhood on the patch grid, nothing else
        one = ConvDecoder(32, 32, DecoderConfig(dim=32, kernel=3, layers=1, groups=16, input_dropout=0.0), spatial=True)
        y = x.clone()
        y[:, 7] += 1.0  # row 1, column 2 of a 4x5 grid
        changed = (one(y, (4, 5)) - one(x, (4, 5))).abs().sum((0, 2)) > 0
        near = {r * 5 + c for r in (0, 1, 2) for c in (1, 2, 3)}
        assert {int(i) for i in changed.nonzero()} == near


# ------------------------------------------------------------------------------- objective


def v2_module(modality: str, clones: int = 3, **objective: Any) -> Data2VecPretraining:
    decoder = dict(dim=32, kernel=3, layers=2, groups=4, input_dropout=0.0)
    if modality == "vision":
        obj = dict(top_k=2, layer_norm="instance", final_norm="layer", teacher_input="raw", cls_loss=0.01)
        mask = dict(kind="inverse_block", mask_prob=0.6, block_size=2, mask_adjust=0.07)
    elif modality == "audio":
        obj = dict(top_k=2, layer_norm="instance", teacher_input="embed",
                   ema=dict(decay=0.99, end_decay=0.999, share=["feature_extractor", "feature_projection"]))
        mask = dict(kind="block_1d", mask_prob=0.5, block_size=3, mask_adjust=0.05)
    else:
        obj = dict(top_k=2, layer_norm="instance", teacher_input="embed", loss_scale=1.0,
                   ema=dict(decay=0.99, end_decay=0.999, share=["embeddings"]))
        mask = dict(kind="random", mask_prob=0.5)
    obj.update(version=2, clones=clones, decoder=decoder, **objective)
    return Data2VecPretraining(
        v2_encoder(modality), objective=obj, masking=mask, optim=dict(lr=2e-3, warmup_steps=3),
        special_token_ids=SPECIAL if modality == "text" else None,
    )


@pytest.mark.parametrize("modality", ["audio", "text", "vision"])
def test_targets_repeated_per_clone_match_a_per_clone_teacher_run(modality: str) -> None:
    model = v2_module(modality, clones=3)
    batch = fixed_batch(modality)
    inputs, pad = batch["inputs"], batch["padding_mask"]
    out = model.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    mask = out["mask"]
    assert mask.shape[0] == 3 * inputs.shape[0]
    teacher, obj, prefix = model.teacher.model, model.objective, model.num_prefix
    tokens, tpad = model.student.embed(inputs, pad)
    targets = teacher_targets(teacher, obj, inputs, tokens, pad, tpad, prefix)
    got = clone_targets(targets, mask, 3)
    offset = 0
    for row in range(mask.shape[0]):  # the teacher on this clone's own sample, alone
        b = row // 3
        one_pad = None if pad is None else pad[b : b + 1]
        t_tok, t_pad = model.student.embed(inputs[b : b + 1], one_pad)
        alone = teacher_targets(teacher, obj, inputs[b : b + 1], t_tok, one_pad, t_pad, prefix)[0]
        n = int(mask[row].sum())
        torch.testing.assert_close(got[offset : offset + n], alone[mask[row]], rtol=1e-4, atol=1e-4)
        offset += n
    assert offset == got.shape[0] == int(out["masked"])


def test_gradients_reach_student_and_decoder_and_teacher_covers_the_right_parts() -> None:
    model = v2_module("audio")
    batch = fixed_batch("audio")
    out = model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert model.student.alibi_scale.grad is not None and model.head.blocks[0][0].weight.grad is not None
    assert model.student.feature_extractor.layers[0].conv.weight.grad is not None
    ema = set(model.teacher.ema_names)
    assert "alibi_scale" in ema and any(n.startswith("pos_conv") for n in ema)
    assert not any(n.startswith(("feature_extractor", "feature_projection")) for n in ema)
    assert not any("head" in n for n in model.teacher.state_dict())  # the decoder is the student's alone


@pytest.mark.parametrize("modality", ["audio", "text", "vision"])
def test_preset_composes_and_a_short_run_lowers_the_loss(modality: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"modality={modality}", f"objective=d2v2_{modality}"], tmp_path)
    validate_config(cfg)
    assert cfg.objective.version == 2 and cfg.masking.kind == {
        "audio": "block_1d", "text": "random", "vision": "inverse_block"}[modality]
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    masking = OmegaConf.to_container(cfg.masking, resolve=True)
    enc_cfg = OmegaConf.to_container(cfg.encoder, resolve=True)
    # the preset's objective, masking and encoder switches on the test's small encoder and batch
    small = {k: v for k, v in enc_cfg.items() if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "intermediate_size", "conv_dim", "image_size", "vocab_size",
                                                           "max_position_embeddings", "pad_token_id", "bos_token_id",
                                                           "eos_token_id", "num_conv_pos_embeddings",
                                                           "conv_pos_kernel_size", "num_conv_pos_embedding_groups")}
    base = {k: v for k, v in v2_encoder(modality).config.to_dict().items() if k != "extra"}
    torch.manual_seed(0)
    enc = build_encoder(modality, {**base, **small, **COMMON})
    objective.update(clones=4, decoder={**objective["decoder"], "dim": 32, "groups": 4 if modality != "text" else 1})
    masking.update({"min_num_patches": 2, "block_size": 2} if modality == "vision" else {})
    model = Data2VecPretraining(enc, objective=objective, masking=masking, optim=dict(lr=2e-3, warmup_steps=3),
                                special_token_ids=SPECIAL if modality == "text" else None)
    rec = run(model, fixed_batch(modality), steps=100)  # text's loss falls slowest: 0.76x its start after 60 updates
    first, last = sum(rec.losses[:3]) / 3, sum(rec.losses[-5:]) / 5
    assert last < 0.8 * first, (modality, rec.losses)


@pytest.mark.parametrize(
    "option, expected",
    [
        ("d2v2_audio_base_librispeech", dict(clones=8, top_k=8, dim=384, lr=7.5e-4, anneal=75000, kind="block_1d", gpus=8)),
        ("d2v2_vision_base_imagenet", dict(clones=16, top_k=10, dim=768, lr=1e-3, anneal=100000, kind="inverse_block", gpus=16)),
        ("d2v2_text_base", dict(clones=8, top_k=12, dim=768, lr=2e-4, anneal=100000, kind="random", gpus=16)),
        ("d2v2_audio_large_librilight", dict(clones=12, top_k=16, dim=768, lr=4e-4, anneal=300000, kind="block_1d", gpus=48)),
        ("d2v2_vision_large_imagenet", dict(clones=16, top_k=18, dim=1024, lr=4e-4, anneal=150000, kind="inverse_block", gpus=16)),
        ("d2v2_text_large", dict(clones=8, top_k=24, dim=768, lr=1e-4, anneal=100000, kind="random", gpus=32)),
    ],
)
def test_recipes_carry_the_published_values(option: str, expected: dict[str, Any], tmp_path: Path) -> None:
    cfg = compose_cfg([f"experiment={option}", "data.path=/nonexistent"], tmp_path)
    validate_config(cfg)
    obj = cfg.objective
    assert (obj.version, obj.clones, obj.top_k, obj.decoder.dim) == (2, expected["clones"], expected["top_k"], expected["dim"])
    assert cfg.optim.lr == pytest.approx(expected["lr"]) and obj.ema.anneal_steps == expected["anneal"]
    assert cfg.masking.kind == expected["kind"] and cfg.trainer.num_nodes * cfg.trainer.devices == expected["gpus"]
    # the tiny modality presets' EMA caps must not leak into a published recipe: its decays are taken as written
    assert obj.ema.get("max_horizon") is None and obj.ema.get("anneal_fraction") is None
    enc = OmegaConf.to_container(cfg.encoder, resolve=True)
    ENCODERS[cfg.modality][1].from_dict(enc)  # type: ignore[arg-type]
    large = "_large" in option
    assert (enc["num_hidden_layers"], enc["hidden_size"], enc["num_attention_heads"]) == ((24, 1024, 16) if large else (12, 768, 12))
    assert obj.top_k <= enc["num_hidden_layers"] and enc["intermediate_size"] == 4 * enc["hidden_size"]
    assert cfg.trainer.precision == "16-mixed"
    if cfg.modality == "audio":
        assert enc["use_alibi"] and enc["mask_time_prob"] == 0.0
        assert cfg.data.max_tokens == (320_000 if large else 1_000_000)
        assert (cfg.masking.mask_prob, cfg.masking.mask_adjust) == ((0.55, 0.1) if large else (0.5, 0.05))
        assert (obj.ema.decay, obj.ema.end_decay) == ((0.9997, 1.0) if large else (0.999, 0.99999))
        assert enc["layerdrop"] == (0.0 if large else 0.05)
        assert cfg.trainer.gradient_clip_val == (1.0 if large else None)
        decoder = (obj.decoder.dim, obj.decoder.kernel, obj.decoder.layers, obj.decoder.groups)
        assert decoder == ((768, 7, 4, 16) if large else (384, 7, 4, 16))
    if cfg.modality == "vision":
        assert enc["use_sincos_position_embeddings"] and not enc["norm_first"] and obj.cls_loss == 0.01
        assert enc["drop_path_rate"] == 0.0 and enc["attention_probs_dropout_prob"] == 0.0
        assert cfg.data.batch_size * 16 == (128 if large else 256) and cfg.optim.betas == [0.9, 0.95]
        decoder = (obj.decoder.kernel, obj.decoder.layers, obj.decoder.groups)
        assert decoder == ((5, 3, 16) if large else (3, 6, 16))
        assert (cfg.masking.mask_prob, cfg.masking.mask_adjust) == ((0.75, 0.1) if large else (0.8, 0.07))
    if cfg.modality == "text":
        assert not obj.decoder.residual and obj.decoder.projection_layers == 2 and obj.loss_scale == 1.0
        assert cfg.data.batch_size * expected["gpus"] == 64 and cfg.masking.mask_prob == (0.5 if large else 0.48)
        assert (obj.layer_norm, obj.final_norm) == (("layer", "instance") if large else ("instance", "none"))


# ------------------------------------------------------------------------------- afterwards: a normal encoder


def test_vision_2_0_run_finetunes_and_exports(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from d2v_train.cli import ConfigError, config_dir
    from d2v_train.interop.sources import load_source
    from d2v_train.pretrain import train as pretrain

    from test_export import export
    from test_finetune import check_loaded

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        pcfg = compose("pretrain", overrides=[
            f"run_dir={tmp_path / 'pre'}", "modality=vision", "objective=d2v2_vision", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "encoder.num_hidden_layers=2",
            "objective.top_k=2", "objective.clones=2", "data.batch_size=8"])
    GlobalHydra.instance().clear()
    pretrain(pcfg)
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    student = load_source(ckpt).encoder
    assert student.config.use_sincos_position_embeddings and not student.config.norm_first
    module = check_loaded(tmp_path / "ft", str(ckpt), student)  # d2v-finetune pretrained=<2.0 checkpoint>
    assert not module.model.encoder.config.norm_first
    with pytest.raises(ConfigError, match="post-norm.*format=safetensors"):
        export(ckpt, tmp_path / "hf")
    export(ckpt, tmp_path / "st", format="safetensors")
    again = load_source(tmp_path / "st").encoder
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).last_hidden_state, student.eval()(pixels).last_hidden_state)


def test_alibi_audio_exports_to_safetensors_and_says_why_not_transformers(tmp_path: Path) -> None:
    from d2v_train.interop import save_encoder
    from d2v_train.interop.sources import load_source
    from d2v_train.interop.transformers import encoder_to_transformers

    enc = v2_encoder("audio").eval()
    with pytest.raises(ValueError, match="ALiBi") as err:
        encoder_to_transformers(enc)
    assert "\n" not in str(err.value)
    with torch.no_grad():
        enc.alibi_scale.mul_(0.5)  # a trained scale travels
    save_encoder(enc, tmp_path / "st")
    again = load_source(tmp_path / "st").encoder
    wav = fixed_batch("audio")["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(again(wav).last_hidden_state, enc(wav).last_hidden_state)


def test_sincos_pre_norm_vision_exports_to_transformers_with_same_outputs(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from d2v_train.interop import save_transformers

    enc = build_encoder("vision", {**COMMON, "image_size": 16, "patch_size": 4, "use_sincos_position_embeddings": True,
                                   "use_mean_pooling": False, "drop_path_rate": 0.0}).eval()
    save_transformers(enc, tmp_path / "hf")
    model, info = transformers.Data2VecVisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixels).last_hidden_state, enc(pixels).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_compile_switch_compiles_in_place_and_keeps_parameter_names(tmp_path: Path) -> None:
    # compiling itself is lazy (first call); a real compiled step is too slow for CPU CI: this checks
    # the wiring (config -> module) and that names, hence EMA, checkpoints and export, do not change
    cfg = compose_cfg(["modality=vision", "objective=d2v2_vision", "compile=true"], tmp_path)
    assert cfg.compile is True
    torch.manual_seed(0)
    plain = v2_module("vision")
    names = list(plain.state_dict())
    objective, masking = plain.objective, plain.masking
    compiled = Data2VecPretraining(v2_encoder("vision"), objective=objective, masking=masking, compile=True)
    for part in (compiled.student.transformer, compiled.teacher.model.transformer, compiled.head):
        assert part._compiled_call_impl is not None
    assert plain.student.transformer._compiled_call_impl is None
    assert list(compiled.state_dict()) == names
