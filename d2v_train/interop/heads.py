"""Import and export of transformers' Data2Vec* task models (CTC, classification, LM, QA, ...).

The encoder part goes through the per-modality tables in ``keymaps.py`` under the base-model
prefix (``data2vec_audio.`` ...); the head part goes through the explicit tables below, one per
transformers class. Every key must be consumed and every shape must match, in both directions.
Tied LM decoder weights (``lm_head.decoder.*``) are never written, as transformers does not write
them either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from torch import Tensor

from ..models import ENCODERS
from ..models.heads import HEADS, TaskHead
from . import keymaps
from .files import save_json, save_safetensors
from .transformers import (
    BASE_CLASS,
    PREFIX,
    config_from_transformers,
    config_to_transformers,
    no_transformers_equivalent,
    read_transformers_dir,
    sincos_as_absolute,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadRule:
    """``ours`` / ``theirs``: a parameter name or a module prefix (its ``.weight``, ``.bias``,
    BatchNorm buffers... map one to one); ``{n}`` is an index. ``layout`` names a tensor
    conversion when the two sides store a weight differently."""

    ours: str
    theirs: str
    layout: Optional[str] = None


def _tdnn_from_theirs(tensor: Tensor, ours_shape: tuple[int, ...]) -> Tensor:
    """transformers keeps each TDNN kernel as a Linear ``(out, kernel * in)`` (frame-major);
    ours is a Conv1d weight ``(out, in, kernel)``."""
    out_dim, in_dim, kernel = ours_shape
    if tensor.numel() != out_dim * in_dim * kernel:
        raise ValueError(f"TDNN kernel has {tensor.numel()} values, expected {out_dim}x{in_dim}x{kernel}")
    return tensor.reshape(out_dim, kernel, in_dim).transpose(1, 2).contiguous()


def _tdnn_to_theirs(tensor: Tensor) -> Tensor:
    out_dim, in_dim, kernel = tensor.shape
    return tensor.transpose(1, 2).reshape(out_dim, kernel * in_dim).contiguous()


_LAYOUTS: dict[str, tuple[Callable[[Tensor, tuple[int, ...]], Tensor], Callable[[Tensor], Tensor]]] = {
    "tdnn": (_tdnn_from_theirs, _tdnn_to_theirs),
}


def _conv_unit(ours: str, theirs: str) -> list[HeadRule]:
    """Our ConvNormAct (``conv``, ``bn``) <-> transformers' conv layer (``convolution``, ``normalization``)."""
    return [HeadRule(f"{ours}.conv", f"{theirs}.convolution"), HeadRule(f"{ours}.bn", f"{theirs}.normalization")]


_LAYER_MIX = [HeadRule("layer_mix.weights", "layer_weights")]
_LM = [
    HeadRule("lm.dense", "lm_head.dense"),
    HeadRule("lm.norm", "lm_head.layer_norm"),
    HeadRule("lm.bias", "lm_head.bias"),
    HeadRule("lm.decoder", "lm_head.decoder"),  # only when tie_word_embeddings=False
]

HEAD_RULES: dict[str, list[HeadRule]] = {
    "Data2VecAudioForCTC": [HeadRule("out_proj", "lm_head")],
    "Data2VecAudioForSequenceClassification": [
        *_LAYER_MIX,
        HeadRule("proj", "projector"),
        HeadRule("out_proj", "classifier"),
    ],
    "Data2VecAudioForAudioFrameClassification": [*_LAYER_MIX, HeadRule("out_proj", "classifier")],
    "Data2VecAudioForXVector": [
        *_LAYER_MIX,
        HeadRule("proj", "projector"),
        HeadRule("tdnn.layers.{n}.weight", "tdnn.{n}.kernel.weight", layout="tdnn"),
        HeadRule("tdnn.layers.{n}.bias", "tdnn.{n}.kernel.bias"),
        HeadRule("embed_proj", "feature_extractor"),
        HeadRule("out_proj", "classifier"),
        HeadRule("am_softmax.weight", "objective.weight"),
    ],
    "Data2VecTextForMaskedLM": _LM,
    "Data2VecTextForCausalLM": _LM,
    "Data2VecTextForSequenceClassification": [
        HeadRule("classifier.dense", "classifier.dense"),
        HeadRule("classifier.out_proj", "classifier.out_proj"),
    ],
    "Data2VecTextForMultipleChoice": [HeadRule("out_proj", "classifier")],
    "Data2VecTextForTokenClassification": [HeadRule("out_proj", "classifier")],
    "Data2VecTextForQuestionAnswering": [HeadRule("out_proj", "qa_outputs")],
    "Data2VecVisionForImageClassification": [HeadRule("out_proj", "classifier")],
    "Data2VecVisionForSemanticSegmentation": [
        HeadRule("pyramid.up4.{n}", "fpn1.{n}"),
        HeadRule("pyramid.up2", "fpn2.0"),
        HeadRule("decode.psp.{n}.conv", "decode_head.psp_modules.blocks.{n}.conv.convolution"),
        HeadRule("decode.psp.{n}.bn", "decode_head.psp_modules.blocks.{n}.conv.normalization"),
        *_conv_unit("decode.psp_fuse", "decode_head.psp_bottleneck"),
        *_conv_unit("decode.lateral.{n}", "decode_head.lateral_convs.{n}"),
        *_conv_unit("decode.fpn.{n}", "decode_head.fpn_convs.{n}"),
        *_conv_unit("decode.fuse", "decode_head.fpn_bottleneck"),
        HeadRule("decode.out_proj", "decode_head.classifier"),
        *_conv_unit("aux.convs.{n}", "auxiliary_head.convs.{n}"),
        *_conv_unit("aux.concat", "auxiliary_head.conv_cat"),
        HeadRule("aux.out_proj", "auxiliary_head.classifier"),
    ],
}

# Tied LM weights: transformers does not write them, older checkpoints may; never loaded.
_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")
# Pooler parameters a retargeted encoder may gain (left as initialised) or lose (dropped).
_OUR_POOLER = {"audio": (), "text": ("pooler.",), "vision": ("pool_norm.",)}
_THEIR_POOLER = "pooler."


def head_key(architecture: str, our_key: str) -> tuple[str, Optional[str]]:
    """(transformers name, layout) for our head parameter ``our_key`` (relative to the head)."""
    for rule in HEAD_RULES[architecture]:
        match = keymaps.compile_pattern(rule.ours, r"(\.[A-Za-z_]+)?").match(our_key)
        if match:
            *numbers, leaf = match.groups()
            return keymaps.fill_pattern(rule.theirs, tuple(numbers)) + (leaf or ""), rule.layout
    raise KeyError(f"no {architecture} head-map rule covers our parameter {our_key!r}")


def _split(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    head = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return encoder, head


def head_from_transformers(
    architecture: str, theirs: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """(our head tensors, their keys left unused, their keys missing) for the head part."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, ours in expected.items():
        name, layout = head_key(architecture, key)
        if name not in theirs:
            missing.append(name)
            continue
        tensor = theirs[name]
        if layout is not None:
            tensor = _LAYOUTS[layout][0](tensor, tuple(ours.shape))
        if tensor.shape != ours.shape:
            raise ValueError(
                f"shape mismatch for {name} -> {key}: checkpoint has {tuple(tensor.shape)}, "
                f"the head built from config.json expects {tuple(ours.shape)}"
            )
        out[key] = tensor
        used.add(name)
    return out, sorted(set(theirs) - used), missing


def head_to_transformers(architecture: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name, layout = head_key(architecture, key)
        tensor = tensor.detach()
        out[name] = (_LAYOUTS[layout][1](tensor) if layout else tensor).clone().contiguous()
    return out


def _architecture_of(config_json: Mapping[str, Any], where: Path) -> str:
    names = config_json.get("architectures") or []
    if not names:
        raise ValueError(f"{where}: config.json names no architectures; pass architecture=... (one of {sorted(HEADS)})")
    return str(names[0])


def load_transformers_task(
    path: Union[str, Path], architecture: Optional[str] = None, **overrides: Any
) -> TaskHead:
    """Our head model for a transformers Data2Vec* task directory, all weights loaded.

    The class comes from config.json's ``architectures``. With ``architecture`` naming another
    task class (the usual start of fine-tuning: a bare ``Data2VecTextModel`` or an MLM checkpoint
    loaded as a classifier), the encoder is loaded strictly, the new head is freshly initialised,
    the checkpoint's own head weights are dropped with a warning, and a pooler the new class
    does not have is dropped (one it needs and the checkpoint lacks is initialised).
    ``overrides`` are head settings (``num_labels``, ``final_dropout``, ...).
    """
    directory = Path(path)
    modality, config_json, parts = read_transformers_dir(directory)
    source = _architecture_of(config_json, directory / "config.json")
    target = architecture or source
    if target not in HEADS:
        hint = ""
        if target in BASE_CLASS.values():
            hint = " (a bare encoder: use load_transformers, or pass architecture=<task class>)"
        raise ValueError(f"{directory}: architecture {target!r} is not a Data2Vec task class we support{hint}; "
                         f"supported: {sorted(HEADS)}")
    head_cls = HEADS[target]
    if head_cls.modality != modality:
        raise ValueError(f"{directory}: {target} is a {head_cls.modality} class but the checkpoint is {modality}")
    base, head = parts["base"], dict(parts["head"])
    config = config_from_transformers(config_json, modality, set(base), directory / "config.json")
    model = head_cls(ENCODERS[modality][0](config), **overrides)
    encoder_expected, head_expected = _split(model.state_dict())

    retarget = target != source
    if retarget:
        ours_pooler = [k for k in encoder_expected if k.startswith(_OUR_POOLER[modality])]
        if ours_pooler and not any(k.startswith(_THEIR_POOLER) for k in base):
            log.warning("%s: no pooler in the checkpoint; %s starts with a freshly initialised one", directory, target)
            encoder_expected = {k: v for k, v in encoder_expected.items() if k not in ours_pooler}
        if not ours_pooler:
            base = {k: v for k, v in base.items() if not k.startswith(_THEIR_POOLER)}
    state = {"encoder." + k: v for k, v in keymaps.from_transformers(modality, base, encoder_expected).items()}

    if model.settings.get("tie_word_embeddings", False):
        head = {k: v for k, v in head.items() if k not in _TIED}
    if retarget:
        if head:
            log.warning("%s: dropping the %s head weights %s; %s starts with a new head",
                        directory, source, sorted(head)[:8], target)
        log.info("%s: loaded the %s encoder of a %s checkpoint into a new %s", directory, modality, source, target)
    else:
        head_state, unused, missing = head_from_transformers(target, head, head_expected)
        if unused or missing:
            parts_msg = [f"missing from the checkpoint: {missing}"] if missing else []
            parts_msg += [f"not consumed by {head_cls.__name__}: {unused}"] if unused else []
            raise ValueError(f"{directory}: {target} head weights do not match; " + "; ".join(parts_msg))
        state.update(head_state)
    result = model.load_state_dict(state, strict=not retarget)
    if retarget:
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise ValueError(f"{directory}: unexpected keys {unexpected}")
    log.info("loaded %s (%d tensors) from %s", target, len(state), directory)
    return model


def task_to_transformers(model: TaskHead) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json contents, transformers-named weights) for one of our head models."""
    if not isinstance(model, TaskHead) or model.architecture not in HEAD_RULES:
        raise TypeError(f"expected a d2v_train head model, got {type(model).__name__}")
    encoder = model.encoder
    modality = encoder.modality
    reason = no_transformers_equivalent(encoder)
    if reason is not None:
        raise ValueError(reason)
    encoder_state, head_state = _split(model.state_dict())
    prefix = PREFIX[modality]
    state = {prefix + k: v for k, v in keymaps.to_transformers(modality, encoder_state).items()}
    sincos = sincos_as_absolute(encoder)
    if sincos is not None:
        state[prefix + "embeddings.position_embeddings"] = sincos
    state.update(head_to_transformers(model.architecture, head_state))
    config = config_to_transformers(encoder.config, modality, model.architecture)
    if sincos is not None:
        config["use_absolute_position_embeddings"] = True
    config.update(model.transformers_fields())
    return config, state


def save_transformers_task(model: TaskHead, path: Union[str, Path]) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``<architecture>.from_pretrained`` loads
    with no missing or unexpected keys."""
    directory = Path(path)
    config, state = task_to_transformers(model)
    save_safetensors(state, directory / "model.safetensors")
    save_json(config, directory / "config.json")
    return directory
