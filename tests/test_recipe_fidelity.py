"""Choices that follow the reference recipes: the BEiT init of the vision encoder and which
parameters each recipe's AdamW decays."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from d2v_train.lightning.optim import OptimConfig, param_groups
from d2v_train.models import build_encoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_vision_init_is_beit_truncated_normal_with_per_block_rescale() -> None:
    torch.manual_seed(0)
    enc = build_encoder("vision", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                       image_size=32, patch_size=4, initializer_range=0.02))
    for layer_id, block in enumerate(enc.transformer.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * layer_id)  # fix_init_weight: residual writers shrink with depth
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert abs(w.std().item() / expected - 1) < 0.1, (layer_id, w.std().item(), expected)
        for w in (block.attn.qkv.weight, block.mlp.fc1.weight):  # the others keep std 0.02
            assert abs(w.std().item() / 0.02 - 1) < 0.1, (layer_id, w.std().item())
            assert w.abs().max() <= 2.0  # the truncation bound of trunc_normal_ (absolute, as timm)
        assert torch.equal(block.attn.proj.bias, torch.zeros_like(block.attn.proj.bias))


def test_weight_decay_rules_per_recipe() -> None:
    """fairseq v1 audio / text runs decay every parameter; BEiT (vision v1) exempts 1-D params,
    biases, pos_embed and cls_token."""
    enc = build_encoder("vision", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                       image_size=16, patch_size=4, use_mask_token=True))
    every = {id(p) for p in enc.parameters()}
    groups = param_groups({"student": enc}, OptimConfig(weight_decay=0.01, decay_all=True))
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == every and groups[0]["weight_decay"] == 0.01
    recipes = {name: OmegaConf.load(CONFIGS / "experiment" / f"{name}.yaml").optim for name in
               ("audio_base_librispeech", "text_base", "vision_base_imagenet")}
    assert recipes["audio_base_librispeech"].decay_all and recipes["text_base"].decay_all
    vision = recipes["vision_base_imagenet"]
    assert not vision.decay_all
    cfg = OptimConfig(weight_decay=vision.weight_decay, no_decay_names=list(vision.no_decay_names))
    decayed = {id(p) for p in param_groups({"student": enc}, cfg)[0]["params"]}
    names = {n for n, p in enc.named_parameters() if id(p) not in decayed}
    assert "cls_token" in names and "mask_token" not in names  # BEiT decays its mask token
    assert all(p.ndim <= 1 or n in ("cls_token", "pos_embed") for n, p in enc.named_parameters() if id(p) not in decayed)
