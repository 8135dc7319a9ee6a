"""Import of released data2vec v1 checkpoints: fairseq audio and text, BEiT-based vision.

data2vec 2.0 checkpoints (fairseq ``data2vec_multi``) have their tables in ``fairseq2.py`` and go
through the same ``convert_state`` and ``load_fairseq``.

fairseq is not a dependency. A checkpoint is read with ``torch.load(weights_only=True)``; the only
non-tensor classes allowed are the plain config containers fairseq stores beside the weights
(OmegaConf containers, ``argparse.Namespace``), so a file that needs anything else is refused.
The architecture comes from the tensor shapes, with the few facts shapes cannot tell (attention
heads, conv strides) read from the stored config when present, else the data2vec defaults, and
overridable by the caller. Names map by the explicit tables below (the fairseq -> transformers
tables of ``peers.md``, composed with our own names).
"""

from __future__ import annotations

import argparse
import ast
import collections
import logging
import operator
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..models import Encoder, build_encoder
from .files import check_state, torch_load_safely
from .keymaps import compile_pattern, fill_pattern

log = logging.getLogger(__name__)

# (fairseq patterns, our pattern or patterns); {n} is a layer index. Several fairseq names fuse into
# one of ours; a tuple of ours splits one of theirs (see ``convert_state``).
Rule = tuple[tuple[str, ...], Union[str, tuple[Optional[str], ...]]]

AUDIO_TABLE: list[Rule] = [
    (("mask_emb",), "mask_embedding"),
    (("feature_extractor.conv_layers.{n}.0.weight",), "feature_extractor.layers.{n}.conv.weight"),
    (("feature_extractor.conv_layers.{n}.0.bias",), "feature_extractor.layers.{n}.conv.bias"),
    (("feature_extractor.conv_layers.{n}.2.1.weight",), "feature_extractor.layers.{n}.norm.weight"),
    (("feature_extractor.conv_layers.{n}.2.1.bias",), "feature_extractor.layers.{n}.norm.bias"),
    (("layer_norm.weight",), "feature_projection.norm.weight"),
    (("layer_norm.bias",), "feature_projection.norm.bias"),
    (("post_extract_proj.weight",), "feature_projection.proj.weight"),
    (("post_extract_proj.bias",), "feature_projection.proj.bias"),
    (("encoder.pos_conv.{n}.0.weight",), "pos_conv.layers.{n}.conv.weight"),
    (("encoder.pos_conv.{n}.0.bias",), "pos_conv.layers.{n}.conv.bias"),
    (("encoder.layer_norm.weight",), "norm.weight"),
    (("encoder.layer_norm.bias",), "norm.bias"),
]
_W2V_LAYER = [
    (("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"), "attn.qkv.{p}"),
    (("self_attn.out_proj.{p}",), "attn.proj.{p}"),
    (("self_attn_layer_norm.{p}",), "norm1.{p}"),
    (("fc1.{p}",), "mlp.fc1.{p}"),
    (("fc2.{p}",), "mlp.fc2.{p}"),
    (("final_layer_norm.{p}",), "norm2.{p}"),
]


def _layer_rules(theirs: str, ours: str) -> list[Rule]:
    return [
        (tuple(f"{theirs}.{t.format(p=p, n='{n}')}" for t in ts), f"{ours}.{o.format(p=p)}")
        for ts, o in _W2V_LAYER
        for p in ("weight", "bias")
    ]


AUDIO_TABLE += _layer_rules("encoder.layers.{n}", "transformer.blocks.{n}")

TEXT_TABLE: list[Rule] = [
    (("encoder.sentence_encoder.embed_tokens.weight",), "embeddings.token.weight"),
    (("encoder.sentence_encoder.embed_positions.weight",), "embeddings.position.weight"),
    (("encoder.sentence_encoder.layernorm_embedding.weight",), "embeddings.norm.weight"),
    (("encoder.sentence_encoder.layernorm_embedding.bias",), "embeddings.norm.bias"),
    *_layer_rules("encoder.sentence_encoder.layers.{n}", "transformer.blocks.{n}"),
]

VISION_TABLE: list[Rule] = [
    (("cls_token",), "cls_token"),
    (("mask_token",), "mask_token"),
    (("pos_embed",), "pos_embed"),
    (("patch_embed.proj.weight",), "patch_embed.proj.weight"),
    (("patch_embed.proj.bias",), "patch_embed.proj.bias"),
    (("rel_pos_bias.relative_position_bias_table",), "rel_pos_bias.table"),
    (("blocks.{n}.gamma_1",), "transformer.blocks.{n}.ls1"),
    (("blocks.{n}.gamma_2",), "transformer.blocks.{n}.ls2"),
    (("blocks.{n}.attn.qkv.weight",), "transformer.blocks.{n}.attn.qkv.weight"),
    (("blocks.{n}.attn.q_bias",), "transformer.blocks.{n}.attn.q_bias"),
    (("blocks.{n}.attn.v_bias",), "transformer.blocks.{n}.attn.v_bias"),
    (("blocks.{n}.attn.relative_position_bias_table",), "transformer.blocks.{n}.attn.rel_pos_bias.table"),
    *[((f"blocks.{{n}}.{a}.{p}",), f"transformer.blocks.{{n}}.{b}.{p}")
      for a, b in (("attn.proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
      for p in ("weight", "bias")],
    (("norm.weight",), "norm.weight"),
    (("norm.bias",), "norm.bias"),
    (("fc_norm.weight",), "pool_norm.weight"),
    (("fc_norm.bias",), "pool_norm.bias"),
]

TABLES = {"audio": AUDIO_TABLE, "text": TEXT_TABLE, "vision": VISION_TABLE}

# Pretraining-only parts and teacher copies: never part of the encoder.
DROPPED = {
    "audio": (r"^_ema", r"^ema\.", r"^final_proj\.", r"^project_q\.", r"^quantizer\."),
    "text": (r"^_ema", r"^ema\.", r"^encoder\.regression_head\.", r"^encoder\.lm_head\.",
             r"^encoder\.sentence_encoder\.version$", r"embed_positions\._float_tensor$"),
    "vision": (r"^_ema", r"^ema\.", r"^lm_head\.", r"relative_position_index$", r"^final_proj\."),
}
# Fine-tuning heads belong to the heads' importers, not to the encoder.
HEADS = {"audio": (r"^w2v_encoder\.",), "text": (r"^encoder\.classification_heads\.", r"^classification_heads\."),
         "vision": (r"^head\.",)}


def _safe_globals() -> list[Any]:
    """The plain container classes fairseq stores beside the weights, and nothing else."""
    allowed: list[Any] = [argparse.Namespace, collections.defaultdict, collections.OrderedDict, typing.Any,
                          dict, list, int, float, bool, str, tuple, set]
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf import nodes

        allowed += [DictConfig, ListConfig, ContainerMetadata, Metadata]
        allowed += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                 "BooleanNode", "EnumNode", "BytesNode", "PathNode")
                    if hasattr(nodes, n)]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return allowed


def read_checkpoint(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, model config as a plain dict or {}) from a fairseq / BEiT checkpoint."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):  # + fairseq's plain config containers
            checkpoint = torch_load_safely(path, kind="data2vec checkpoint")
    except ValueError as err:
        if str(err).startswith("refused"):
            raise ValueError(
                f"{err}. If you trust the file, extract its weights once with "
                "torch.load(..., weights_only=False)['model'] and torch.save that dict."
            ) from None
        raise
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    state = checkpoint
    for key in ("model", "module", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    config: dict[str, Any] = {}
    cfg = checkpoint.get("cfg")
    if cfg is not None and hasattr(cfg, "get"):
        model_cfg = cfg.get("model")
        if model_cfg is not None:
            try:
                from omegaconf import OmegaConf

                config = OmegaConf.to_container(model_cfg) if not isinstance(model_cfg, dict) else dict(model_cfg)
            except Exception:
                config = dict(model_cfg)
    elif isinstance(checkpoint.get("args"), argparse.Namespace):
        config = vars(checkpoint["args"])
    return state, config


def is_data2vec2(state: Mapping[str, Any]) -> bool:
    """Whether the keys are those of fairseq's data2vec 2.0 model (``data2vec_multi``)."""
    return any(k.startswith("modality_encoders.") for k in state)


def detect_checkpoint(state: Mapping[str, Any]) -> tuple[str, str]:
    """``(version, modality)`` of a checkpoint from its key names: ``"2.0"`` for fairseq's
    ``data2vec_multi`` models (``modality_encoders.*``), else ``"v1"``."""
    if is_data2vec2(state):
        from .fairseq2 import detect_modality_v2

        return "2.0", detect_modality_v2(state)
    if any(k.startswith("feature_extractor.conv_layers") or k.startswith("w2v_encoder.") for k in state):
        return "v1", "audio"
    if any(k.startswith("encoder.sentence_encoder.") for k in state):
        return "v1", "text"
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return "v1", "vision"
    raise ValueError("cannot tell the modality: the keys match neither a fairseq data2vec audio or text model, "
                     "a BEiT-based data2vec vision model, nor a fairseq data2vec 2.0 (data2vec_multi) model")


def detect_modality(state: Mapping[str, Any]) -> str:
    """The modality of a data2vec v1 or 2.0 checkpoint (see ``detect_checkpoint``)."""
    return detect_checkpoint(state)[1]


def convert_state(
    state: Mapping[str, Tensor],
    table: Sequence[Rule],
    dropped: Sequence[str],
    heads: Sequence[str],
    what: str,
    refused: Optional[Mapping[str, str]] = None,
) -> dict[str, Tensor]:
    """Applies a key table. Every tensor must be mapped, dropped on purpose, or a head.

    A rule maps one or more of their names (``{n}`` = layer index) to ours: several of theirs fuse
    into one of ours (concatenated along dim 0); a tuple of our names splits their one tensor into
    that many equal dim-0 parts (a ``None`` part is discarded). ``refused`` pairs a key pattern with
    the reason our encoder cannot represent what it stands for.
    """
    dropped_re = [re.compile(p) for p in dropped]
    heads_re = [re.compile(p) for p in heads]
    refused_re = [(re.compile(p), why) for p, why in (refused or {}).items()]
    compiled = [(tuple(compile_pattern(t) for t in theirs), theirs, ours) for theirs, ours in table]
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for key in state:
        if any(p.search(key) for p in dropped_re) or key in used:
            continue
        if any(p.search(key) for p in heads_re):
            raise ValueError(
                f"checkpoint key {key!r} belongs to a fine-tuning head; this importer reads encoders "
                "(pretrained checkpoints)"
            )
        for pattern, why in refused_re:
            if pattern.search(key):
                raise ValueError(f"checkpoint key {key!r} cannot be imported: {why}")
        for patterns, theirs, ours in compiled:
            # any member of a fused group may come first (fairseq stores k_proj before q_proj)
            match = next((m for m in (p.match(key) for p in patterns) if m), None)
            if not match:
                continue
            numbers = match.groups()
            names = [fill_pattern(t, numbers) for t in theirs]
            missing = [n for n in names if n not in state]
            if missing:
                raise ValueError(f"checkpoint has {key!r} but not {missing}, which fuse with it into {ours}")
            used.update(names)
            if isinstance(ours, str):
                out[fill_pattern(ours, numbers)] = torch.cat([state[n] for n in names]) if len(names) > 1 else state[key]
                break
            tensor = state[key]
            if tensor.ndim == 0 or tensor.shape[0] % len(ours):
                raise ValueError(f"checkpoint key {key!r} of shape {tuple(tensor.shape)} does not split into "
                                 f"{len(ours)} equal parts")
            for name, part in zip(ours, tensor.chunk(len(ours))):
                if name is not None:
                    out[fill_pattern(name, numbers)] = part
            break
        else:
            raise ValueError(f"checkpoint key {key!r} is not in the {what} key table")
    return out


def _convert(modality: str, state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Applies the v1 table of ``modality``."""
    return convert_state(state, TABLES[modality], DROPPED[modality], HEADS[modality], modality)


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluates fairseq's ``conv_feature_layers`` string (lists of tuples, + and *), nothing else."""
    ops = {ast.Add: operator.add, ast.Mult: operator.mul}

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"unsupported conv_feature_layers expression: {spec!r}")

    return [tuple(layer) for layer in value(ast.parse(spec, mode="eval"))]


def infer_config(modality: str, state: Mapping[str, Tensor], stored: Mapping[str, Any]) -> dict[str, Any]:
    """Our encoder config from tensor shapes, plus the stored config for what shapes cannot tell."""
    if modality == "audio":
        n_conv = _count(state, r"^feature_extractor\.layers\.(\d+)\.conv\.weight$")
        conv_w = [state[f"feature_extractor.layers.{i}.conv.weight"] for i in range(n_conv)]
        strides = [5, 2, 2, 2, 2, 2, 2] if n_conv == 7 else None
        if stored.get("conv_feature_layers"):
            strides = [s for _, _, s in _conv_layers(str(stored["conv_feature_layers"]))]
        hidden = state["feature_projection.proj.weight"].shape[0]
        pos_w = state["pos_conv.layers.0.conv.weight"]
        config = dict(
            hidden_size=hidden,
            num_hidden_layers=_count(state, r"^transformer\.blocks\.(\d+)\."),
            num_attention_heads=int(stored.get("encoder_attention_heads") or hidden // 64),
            intermediate_size=state["transformer.blocks.0.mlp.fc1.weight"].shape[0],
            conv_dim=[w.shape[0] for w in conv_w],
            conv_kernel=[w.shape[-1] for w in conv_w],
            conv_bias="feature_extractor.layers.0.conv.bias" in state,
            num_conv_pos_embeddings=_count(state, r"^pos_conv\.layers\.(\d+)\."),
            conv_pos_kernel_size=pos_w.shape[-1],
            num_conv_pos_embedding_groups=hidden // pos_w.shape[1],
            mask_time_prob=0.05 if "mask_embedding" in state else 0.0,
            do_normalize=bool(stored.get("normalize", True)),
        )
        if strides is not None:
            config["conv_stride"] = strides
        return config
    if modality == "text":
        hidden = state["embeddings.token.weight"].shape[1]
        return dict(
            vocab_size=state["embeddings.token.weight"].shape[0],
            hidden_size=hidden,
            num_hidden_layers=_count(state, r"^transformer\.blocks\.(\d+)\."),
            num_attention_heads=int(stored.get("encoder_attention_heads") or hidden // 64),
            intermediate_size=state["transformer.blocks.0.mlp.fc1.weight"].shape[0],
            max_position_embeddings=state["embeddings.position.weight"].shape[0],
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            add_pooling_layer=False,
        )
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    heads = hidden // 64
    grid = None
    for key in ("rel_pos_bias.table", "transformer.blocks.0.attn.rel_pos_bias.table"):
        if key in state:
            heads = state[key].shape[1]
            side = (int(round((state[key].shape[0] - 3) ** 0.5)) + 1) // 2
            grid = side
    if "pos_embed" in state:
        grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    return dict(
        hidden_size=hidden,
        num_hidden_layers=_count(state, r"^transformer\.blocks\.(\d+)\."),
        num_attention_heads=heads,
        intermediate_size=state["transformer.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=(grid or 14) * patch,
        patch_size=patch,
        use_mask_token="mask_token" in state,
        use_absolute_position_embeddings="pos_embed" in state,
        use_shared_relative_position_bias="rel_pos_bias.table" in state,
        use_relative_position_bias="transformer.blocks.0.attn.rel_pos_bias.table" in state,
        layer_scale_init_value=0.1 if "transformer.blocks.0.ls1" in state else 0.0,
        use_mean_pooling="pool_norm.weight" in state,
        add_pooling_layer="pool_norm.weight" in state,
        layer_norm_eps=1e-6,
        drop_path_rate=0.0,
    )


def load_fairseq(path: Union[str, Path], modality: Optional[str] = None, **overrides: Any) -> Encoder:
    """Our encoder for a data2vec checkpoint: v1 (fairseq audio/text, BEiT-based vision) or 2.0
    (fairseq ``data2vec_multi`` audio, text, image).

    ``modality`` picks one when a 2.0 checkpoint holds several. ``overrides`` set config fields the
    checkpoint cannot tell (e.g. ``num_attention_heads``, ``conv_stride`` for a non-standard CNN).
    """
    raw, stored = read_checkpoint(path)
    tensors = {k: v for k, v in raw.items() if isinstance(v, Tensor)}
    version = "2.0" if is_data2vec2(tensors) else "v1"
    modality = modality or detect_checkpoint(raw)[1]
    if version == "2.0":
        from .fairseq2 import import_v2

        state, config = import_v2(modality, tensors, stored)
        config.update(overrides)
    else:
        state = _convert(modality, tensors)
        config = {**infer_config(modality, state, stored), **overrides}
    if modality == "text":
        # fairseq's RoBERTa-style encoder has no token types: one all-zero row adds nothing.
        state["embeddings.token_type.weight"] = torch.zeros(1, config["hidden_size"])
    encoder = build_encoder(modality, config)
    check_state(encoder.state_dict(), state, f"{path} (data2vec {version} {modality} encoder inferred from its shapes)")
    encoder.load_state_dict(state)
    log.info("loaded data2vec %s %s encoder from %s (%d tensors)", version, modality, path, len(state))
    return encoder.eval()
