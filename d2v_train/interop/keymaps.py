"""Explicit, reviewed key maps between our encoder state dicts and transformers' Data2Vec* models.

Each rule pairs one of our parameter names with one or more transformers names; ``{n}`` stands for
a layer index. Several transformers names mean our tensor is their concatenation along dim 0 (our
attention keeps q, k and v in one fused matrix). Conversion in either direction fails, naming the
key, on any key no rule covers, any key left unused and any shape that does not match.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import Tensor

Rule = tuple[str, tuple[str, ...]]


def _block_rules(ours: str, theirs: str, names: Iterable[tuple[str, tuple[str, ...]]]) -> list[Rule]:
    return [(f"{ours}.{a}", tuple(f"{theirs}.{b}" for b in bs)) for a, bs in names]


def _wb(ours: str, theirs: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{ours}.weight", (f"{theirs}.weight",)), (f"{ours}.bias", (f"{theirs}.bias",))]


AUDIO_RULES: list[Rule] = [
    ("mask_embedding", ("masked_spec_embed",)),
    *_block_rules(
        "feature_extractor.layers.{n}", "feature_extractor.conv_layers.{n}", _wb("conv", "conv") + _wb("norm", "layer_norm")
    ),
    *_block_rules("feature_projection", "feature_projection", _wb("norm", "layer_norm") + _wb("proj", "projection")),
    *_block_rules("pos_conv.layers.{n}", "encoder.pos_conv_embed.layers.{n}", _wb("conv", "conv")),
    *_wb("norm", "encoder.layer_norm"),
    *_block_rules(
        "transformer.blocks.{n}",
        "encoder.layers.{n}",
        [
            ("attn.qkv.weight", ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight")),
            ("attn.qkv.bias", ("attention.q_proj.bias", "attention.k_proj.bias", "attention.v_proj.bias")),
            *_wb("attn.proj", "attention.out_proj"),
            *_wb("norm1", "layer_norm"),
            *_wb("mlp.fc1", "feed_forward.intermediate_dense"),
            *_wb("mlp.fc2", "feed_forward.output_dense"),
            *_wb("norm2", "final_layer_norm"),
        ],
    ),
    *_block_rules("adapter", "adapter", _wb("proj", "proj") + _wb("proj_norm", "proj_layer_norm")),
    ("adapter.layers.{n}.weight", ("adapter.layers.{n}.conv.weight",)),
    ("adapter.layers.{n}.bias", ("adapter.layers.{n}.conv.bias",)),
]

TEXT_RULES: list[Rule] = [
    ("embeddings.token.weight", ("embeddings.word_embeddings.weight",)),
    ("embeddings.position.weight", ("embeddings.position_embeddings.weight",)),
    ("embeddings.token_type.weight", ("embeddings.token_type_embeddings.weight",)),
    *_block_rules("embeddings", "embeddings", _wb("norm", "LayerNorm")),
    *_block_rules(
        "transformer.blocks.{n}",
        "encoder.layer.{n}",
        [
            ("attn.qkv.weight", tuple(f"attention.self.{p}.weight" for p in ("query", "key", "value"))),
            ("attn.qkv.bias", tuple(f"attention.self.{p}.bias" for p in ("query", "key", "value"))),
            *_wb("attn.proj", "attention.output.dense"),
            *_wb("norm1", "attention.output.LayerNorm"),
            *_wb("mlp.fc1", "intermediate.dense"),
            *_wb("mlp.fc2", "output.dense"),
            *_wb("norm2", "output.LayerNorm"),
        ],
    ),
    *_block_rules("pooler", "pooler", _wb("dense", "dense")),
]

VISION_RULES: list[Rule] = [
    ("cls_token", ("embeddings.cls_token",)),
    ("mask_token", ("embeddings.mask_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    *_block_rules("patch_embed", "embeddings.patch_embeddings", _wb("proj", "projection")),
    ("rel_pos_bias.table", ("encoder.relative_position_bias.relative_position_bias_table",)),
    *_block_rules(
        "transformer.blocks.{n}",
        "encoder.layer.{n}",
        [
            ("ls1", ("lambda_1",)),
            ("ls2", ("lambda_2",)),
            ("attn.qkv.weight", tuple(f"attention.attention.{p}.weight" for p in ("query", "key", "value"))),
            ("attn.q_bias", ("attention.attention.query.bias",)),
            ("attn.v_bias", ("attention.attention.value.bias",)),
            ("attn.rel_pos_bias.table", ("attention.attention.relative_position_bias.relative_position_bias_table",)),
            *_wb("attn.proj", "attention.output.dense"),
            *_wb("norm1", "layernorm_before"),
            *_wb("norm2", "layernorm_after"),
            *_wb("mlp.fc1", "intermediate.dense"),
            *_wb("mlp.fc2", "output.dense"),
        ],
    ),
    *_wb("norm", "layernorm"),
    *_wb("pool_norm", "pooler.layernorm"),
]

RULES: dict[str, list[Rule]] = {"audio": AUDIO_RULES, "text": TEXT_RULES, "vision": VISION_RULES}


def compile_pattern(pattern: str, suffix: str = "") -> re.Pattern:
    """Regex for a key pattern whose ``{n}`` placeholders capture layer indices."""
    return re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)") + suffix + "$")


def fill_pattern(template: str, numbers: tuple[str, ...]) -> str:
    """Puts captured layer indices back into a pattern's ``{n}`` placeholders, in order."""
    for number in numbers:
        template = template.replace("{n}", number, 1)
    return template


def their_names(modality: str, our_key: str) -> tuple[str, ...]:
    """The transformers names our parameter ``our_key`` maps to; KeyError when no rule covers it."""
    for ours, theirs in RULES[modality]:
        match = compile_pattern(ours).match(our_key)
        if match:
            return tuple(fill_pattern(t, match.groups()) for t in theirs)
    raise KeyError(f"no {modality} key-map rule covers our parameter {our_key!r}")


def to_transformers(modality: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> transformers' names (fused q/k/v split into three tensors)."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        names = their_names(modality, key)
        if tensor.shape[0] % len(names):
            raise ValueError(f"{key}: dim 0 ({tensor.shape[0]}) does not split into {len(names)} parts")
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            out[name] = part.detach().clone().contiguous()
    return out


def from_transformers(
    modality: str, theirs: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """transformers' tensors -> our state dict, for every key of ``expected`` (our model's state).

    Raises ValueError naming each of their keys left unused, each of ours not found, and any
    shape mismatch.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, ours in expected.items():
        names = their_names(modality, key)
        absent = [n for n in names if n not in theirs]
        if absent:
            missing.extend(absent)
            continue
        tensor = torch.cat([theirs[n] for n in names], dim=0) if len(names) > 1 else theirs[names[0]]
        if tensor.shape != ours.shape:
            raise ValueError(
                f"shape mismatch for {', '.join(names)} -> {key}: checkpoint has {tuple(tensor.shape)}, "
                f"the model built from config.json expects {tuple(ours.shape)}"
            )
        out[key] = tensor
        used.update(names)
    unused = sorted(set(theirs) - used)
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {sorted(missing)}")
        if unused:
            parts.append(f"not consumed by the {modality} encoder: {unused}")
        raise ValueError("transformers weights do not match the encoder; " + "; ".join(parts))
    return out
