"""Import of data2vec 2.0 checkpoints: fairseq ``data2vec_multi`` models (audio, text, image).

A 2.0 checkpoint keeps each modality's input side under ``modality_encoders.<AUDIO|TEXT|IMAGE>``
(``local_encoder``, ``project_features``, positional encoders, ``context_encoder`` = the first
``prenet_depth`` blocks and the norm before them, ``decoder``) and the rest of the blocks at the top
(``blocks.N``). Our encoders hold the same network as one stack: prenet block ``i`` is our block
``i``, top-level block ``j`` is our block ``prenet_depth + j``. The tables below name every tensor;
the decoder, the EMA teacher and other pretraining-only parts are dropped, and parts our encoders
cannot compute are refused with the reason.

Facts the tables rely on (fairseq ``examples/data2vec/models``):
- the 2.0 block (``AltBlock``, post-norm) is ``x = norm1(x + attn(x))``, ``x = norm2(x + mlp(x))``,
  with one fused ``qkv`` linear: our post-norm ``Block`` with the same parameter names;
- post-norm models normalise the embedded tokens once before the first block
  (``context_encoder.norm``) and have no final norm: audio's encoder norm after the positional
  convolutions, vision's ``embed_norm``; text adds it only with prenet blocks (refused: our text
  encoder has the embedding layer norm only);
- images: the fixed 2-D sin-cos table (stored, not trained) is added to the patches, the one extra
  token (CLS, without position) goes in front;
- audio ALiBi: a per-head slope times ``-|i - j|`` times a learned scale clamped at 0; padded frames
  are not zeroed before the positional convolutions (``pos_conv_zero_padding=False``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..models.positions import sincos_2d
from .fairseq import Rule, _count, convert_state, infer_config

THEIRS = {"audio": "AUDIO", "text": "TEXT", "vision": "IMAGE"}  # fairseq's Modality names
CONFIG_KEY = {"audio": "audio", "text": "text", "vision": "image"}  # cfg.model.modalities.<key>
DEFAULT_EPS = {"audio": 1e-5, "text": 1e-5, "vision": 1e-6}  # norm_eps of the released base recipes

# our temporary names, resolved after the table: renumbered stacks, checked or reshaped tensors
_MAIN = "transformer.main"
_POS_FROM_1 = "pos_conv.from1"
_SINCOS = "fixed_positions"

_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _block_rules(theirs: str, ours: str, drop_key_bias: bool = False) -> list[Rule]:
    """One 2.0 block. ``drop_key_bias``: our vision blocks have query and value biases only (BEiT);
    a key bias adds ``q . b_k`` to every score of a query, the same for all keys, so softmax
    cancels it and dropping it leaves the output unchanged."""
    rules: list[Rule] = []
    for name in _BLOCK:
        for p in ("weight", "bias"):
            if drop_key_bias and name == "attn.qkv" and p == "bias":
                rules.append(((f"{theirs}.attn.qkv.bias",), (f"{ours}.attn.q_bias", None, f"{ours}.attn.v_bias")))
            else:
                rules.append(((f"{theirs}.{name}.{p}",), f"{ours}.{name}.{p}"))
    return rules


def _stack_rules(enc: str, drop_key_bias: bool = False) -> list[Rule]:
    return [*_block_rules(f"{enc}.context_encoder.blocks.{{n}}", "transformer.blocks.{n}", drop_key_bias),
            *_block_rules("blocks.{n}", f"{_MAIN}.{{n}}", drop_key_bias)]


def _wb(theirs: str, ours: str) -> list[Rule]:
    return [((f"{theirs}.{p}",), f"{ours}.{p}") for p in ("weight", "bias")]


_A, _T, _I = (f"modality_encoders.{THEIRS[m]}" for m in ("audio", "text", "vision"))

AUDIO_TABLE_V2: list[Rule] = [
    ((f"{_A}.local_encoder.conv_layers.{{n}}.0.weight",), "feature_extractor.layers.{n}.conv.weight"),
    ((f"{_A}.local_encoder.conv_layers.{{n}}.0.bias",), "feature_extractor.layers.{n}.conv.bias"),
    *_wb(f"{_A}.local_encoder.conv_layers.{{n}}.2.1", "feature_extractor.layers.{n}.norm"),
    *_wb(f"{_A}.project_features.1", "feature_projection.norm"),
    *_wb(f"{_A}.project_features.2", "feature_projection.proj"),
    # index 0 of fairseq's Sequential is a transpose, so its conv layers count from 1
    *_wb(f"{_A}.relative_positional_encoder.{{n}}.0", f"{_POS_FROM_1}.{{n}}.conv"),
    *_wb(f"{_A}.context_encoder.norm", "norm"),
    ((f"{_A}.alibi_scale",), "alibi_scale"),
    *_stack_rules(_A),
]

TEXT_TABLE_V2: list[Rule] = [
    ((f"{_T}.local_encoder.embed_tokens.weight",), "embeddings.token.weight"),
    ((f"{_T}.local_encoder.embed_positions.weight",), "embeddings.position.weight"),
    *_wb(f"{_T}.local_encoder.layernorm_embedding", "embeddings.norm"),
    *_stack_rules(_T),
]

VISION_TABLE_V2: list[Rule] = [
    ((f"{_I}.extra_tokens",), "cls_token"),
    *_wb(f"{_I}.local_encoder.proj", "patch_embed.proj"),
    ((f"{_I}.fixed_positional_encoder.positions",), _SINCOS),
    *_wb(f"{_I}.context_encoder.norm", "embed_norm"),
    *_stack_rules(_I, drop_key_bias=True),
]

TABLES_V2 = {"audio": AUDIO_TABLE_V2, "text": TEXT_TABLE_V2, "vision": VISION_TABLE_V2}

# Pretraining-only parts: the decoders, the EMA teacher, the MAE-style reconstruction head.
DROPPED_V2 = (r"^_ema", r"^ema\.", r"^modality_encoders\.\w+\.decoder\.", r"^shared_decoder\.", r"^recon_proj\.",
              r"embed_positions\._float_tensor$")
# Fine-tuned 2.0 models wrap the encoder (audio CTC: w2v_encoder.w2v_model.*; image: model.* + head).
HEADS_V2 = (r"^w2v_encoder\.", r"^model\.", r"^head\.", r"^fc_norm\.", r"^classification_heads\.")

_REFUSED_ALL = {
    r"^norm\.(weight|bias)$": "a final norm means a pre-norm model (layer_norm_first=true), whose reference "
                              "block replaces the residual after its feed-forward; our blocks do not compute that",
    r"\.alibi_bias$": "learned ALiBi tables (learned_alibi=true); our audio encoder computes ALiBi from distances",
    r"\.attn\.logit_scale$": "cosine attention (logit_scale); our attention is scaled dot-product",
}
REFUSED_V2: dict[str, dict[str, str]] = {
    "audio": {
        **_REFUSED_ALL,
        r"\.extra_tokens$": "extra tokens (num_extra_tokens > 0); our audio encoder has no prefix token",
        r"\.local_encoder\.conv_layers\.0\.2\.(weight|bias)$": "extractor_mode=default (a group norm in the first "
        "conv layer); our audio CNN has a layer norm in every conv layer (extractor_mode=layer_norm)",
        r"\.relative_positional_encoder\.0\.(weight|bias)$": "conv_pos_pre_ln=true (a layer norm before the "
        "positional convolutions), which our audio encoder does not have",
    },
    "text": {
        **_REFUSED_ALL,
        r"\.extra_tokens$": "extra tokens (num_extra_tokens > 0); our text encoder has no prefix token",
        r"\.context_encoder\.norm\.(weight|bias)$": "a second layer norm after the embeddings (prenet_depth > 0); "
        "our text encoder has the embedding layer norm only",
        r"\.alibi_scale$": "ALiBi for text (use_alibi_encoder=true); our text encoder has learned positions only",
    },
    "vision": {
        **_REFUSED_ALL,
        r"\.alibi_scale$": "2-D ALiBi for images (use_alibi_encoder=true); our vision encoder has none",
    },
}


def detect_modality_v2(state: Mapping[str, Any]) -> str:
    """The one modality a 2.0 checkpoint holds; several need an explicit ``modality``."""
    found = sorted({m.group(1) for k in state if (m := re.match(r"^modality_encoders\.(\w+)\.", k))})
    ours = {v: k for k, v in THEIRS.items()}
    if len(found) != 1:
        raise ValueError(f"data2vec 2.0 checkpoint holds the modality encoders {found}: pass modality= "
                         f"(one of {[ours.get(f, f) for f in found]})")
    if found[0] not in ours:
        raise ValueError(f"data2vec 2.0 checkpoint holds modality {found[0]!r}; supported: {sorted(ours)}")
    return ours[found[0]]


def _renumber(state: dict[str, Tensor], temp: str, final: str, offset: int) -> dict[str, Tensor]:
    """``temp.<i>.rest`` -> ``final.<i + offset>.rest``; other keys unchanged."""
    regex = re.compile("^" + re.escape(temp) + r"\.(\d+)\.(.*)$")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = regex.match(key)
        out[f"{final}.{int(m.group(1)) + offset}.{m.group(2)}" if m else key] = value
    return out


def _stored_modality(stored: Mapping[str, Any], modality: str) -> Mapping[str, Any]:
    return ((stored.get("modalities") or {}).get(CONFIG_KEY[modality])) or {}


def convert_v2(modality: str, state: Mapping[str, Tensor], stored: Mapping[str, Any]) -> dict[str, Tensor]:
    """A 2.0 checkpoint's tensors in our names, for the encoder of ``modality``."""
    if modality not in THEIRS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(THEIRS)}")
    if stored.get("layer_norm_first"):
        raise ValueError("data2vec 2.0 checkpoint has layer_norm_first=true (pre-norm blocks), whose reference "
                         "block replaces the residual after its feed-forward; only post-norm 2.0 models import")
    others = rf"^modality_encoders\.(?!{THEIRS[modality]}\.)"  # a multi-modal model: the other inputs
    out = convert_state(state, TABLES_V2[modality], (*DROPPED_V2, others), HEADS_V2, f"data2vec 2.0 {modality}",
                        REFUSED_V2[modality])
    prenet = max((int(m.group(1)) + 1 for k in out if (m := re.match(r"^transformer\.blocks\.(\d+)\.", k))),
                 default=0)
    out = _renumber(out, _MAIN, "transformer.blocks", prenet)
    if modality == "audio":
        out = _renumber(out, _POS_FROM_1, "pos_conv.layers", -1)
        if "alibi_scale" in out:
            hidden = out["feature_projection.proj.weight"].shape[0]
            out["alibi_scale"] = _alibi_scale(out["alibi_scale"], int(stored.get("num_heads") or hidden // 64))
    if modality == "vision":
        _check_sincos(out.get(_SINCOS))  # kept (as a temporary name) for the grid size; import_v2 drops it
        if "cls_token" not in out:
            raise ValueError(f"data2vec 2.0 image checkpoint has no '{_I}.extra_tokens' (num_extra_tokens=0); "
                             "our vision encoder has a CLS token")
        if out["cls_token"].shape[1] != 1:
            raise ValueError(f"checkpoint key '{_I}.extra_tokens' holds {out['cls_token'].shape[1]} extra tokens; "
                             "our vision encoder has one (CLS)")
    return out


def _alibi_scale(scale: Tensor, heads: int) -> Tensor:
    """fairseq's ``(layers or 1, 1, heads or 1, 1, 1)`` scale (4-D in older files, without the layer
    dimension) -> our per-head ``(heads,)``."""
    if scale.ndim == 4:
        scale = scale.unsqueeze(0)
    if scale.ndim != 5 or scale.shape[1] != 1 or scale.shape[2] not in (1, heads) or scale.shape[3:] != (1, 1):
        raise ValueError(f"checkpoint key '{_A}.alibi_scale' has shape {tuple(scale.shape)}; expected (1, 1, "
                         f"{heads} or 1, 1, 1), a scale per head for {heads} heads")
    if scale.shape[0] != 1:
        raise ValueError(f"checkpoint key '{_A}.alibi_scale' has shape {tuple(scale.shape)}: one ALiBi scale per "
                         "layer (learned_alibi_scale_per_layer=true); our audio encoder shares one per-head scale "
                         "across layers")
    flat = scale.reshape(-1)
    if flat.numel() == 1 and heads > 1:  # one scale for all heads: the same maths per head
        flat = flat.expand(heads).clone()
    return flat


def _check_sincos(positions: Optional[Tensor]) -> None:
    """The stored positions must be the fixed sin-cos table our encoder computes itself."""
    if positions is None:
        raise ValueError(f"data2vec 2.0 image checkpoint has no '{_I}.fixed_positional_encoder.positions' "
                         "(fixed_positions=false); our 2.0 vision encoder adds fixed 2-D sin-cos positions")
    side = int(round(positions.shape[1] ** 0.5))
    expected = sincos_2d(positions.shape[-1], (side, side))
    if side * side != positions.shape[1] or not torch.allclose(positions.float(), expected, atol=1e-5):
        raise ValueError(f"checkpoint key '{_I}.fixed_positional_encoder.positions' is not the fixed 2-D sin-cos "
                         f"table of a {side}x{side} grid; our encoder computes that table and cannot carry other "
                         "positions")


def infer_config_v2(modality: str, state: Mapping[str, Tensor], stored: Mapping[str, Any]) -> dict[str, Any]:
    """Our encoder config from the converted shapes and the stored ``cfg.model`` (heads, norm eps,
    CNN strides), with the base recipes' values where the checkpoint has no config."""
    hidden = {"audio": lambda: state["feature_projection.proj.weight"].shape[0],
              "text": lambda: state["embeddings.token.weight"].shape[1],
              "vision": lambda: state["cls_token"].shape[-1]}[modality]()
    heads = int(stored.get("num_heads") or hidden // 64)
    eps = float(stored.get("norm_eps") or DEFAULT_EPS[modality])
    # the CNN and embedding layer norms of the reference keep torch's default eps (1e-5); ours share
    # layer_norm_eps, which the released audio and text recipes set to 1e-5 as well
    if modality == "audio":
        spec = _stored_modality(stored, modality).get("feature_encoder_spec")
        v1_like = {"conv_feature_layers": spec, "encoder_attention_heads": heads}
        config = infer_config("audio", state, v1_like)
        config.update(use_alibi="alibi_scale" in state, layer_norm_eps=eps, pos_conv_zero_padding=False)
        return config
    if modality == "text":
        config = infer_config("text", state, {"encoder_attention_heads": heads})
        config.update(layer_norm_eps=eps)
        return config
    patch = state["patch_embed.proj.weight"]
    grid = int(round(state[_SINCOS].shape[1] ** 0.5))
    return dict(
        hidden_size=hidden,
        num_hidden_layers=_count(state, r"^transformer\.blocks\.(\d+)\."),
        num_attention_heads=heads,
        intermediate_size=state["transformer.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        num_channels=patch.shape[1],
        use_mask_token=False,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        use_sincos_position_embeddings=True,
        norm_first=False,
        layer_scale_init_value=0.0,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_mean_pooling=True,
        add_pooling_layer=False,
        layer_norm_eps=eps,
    )


def import_v2(modality: str, state: Mapping[str, Tensor], stored: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(our state dict, our encoder config) for the ``modality`` encoder of a 2.0 checkpoint."""
    converted = convert_v2(modality, state, stored)
    config = infer_config_v2(modality, converted, stored)
    converted.pop(_SINCOS, None)  # the encoder computes the sin-cos table itself
    return converted, config
