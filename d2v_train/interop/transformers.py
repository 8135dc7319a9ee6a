"""Import and export of transformers' Data2Vec{Audio,Text,Vision}Model directories.

A directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, loaded with
``weights_only=True``). Names are converted at this boundary by the tables in ``keymaps.py``; the
``transformers`` package itself is not needed to read or write these files.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..models import ENCODERS, Encoder, EncoderConfig
from . import keymaps
from .files import load_json, load_weights, save_json, save_safetensors

log = logging.getLogger(__name__)

MODEL_TYPES = {"data2vec-audio": "audio", "data2vec-text": "text", "data2vec-vision": "vision"}
MODEL_TYPE_OF = {v: k for k, v in MODEL_TYPES.items()}
PREFIX = {"audio": "data2vec_audio.", "text": "data2vec_text.", "vision": "data2vec_vision."}
BASE_CLASS = {"audio": "Data2VecAudioModel", "text": "Data2VecTextModel", "vision": "Data2VecVisionModel"}

# Our config fields that transformers' configs do not have (they are implied by the weights).
_OUR_ONLY_FIELDS = {"extra", "add_pooling_layer", "do_normalize", "use_alibi", "use_sincos_position_embeddings", "norm_first",
                    "pos_conv_zero_padding"}
# Buffers older checkpoints saved and transformers ignores.
_IGNORED_KEYS = ("relative_position_index", "embeddings.position_ids", "embeddings.token_type_ids")
# Bookkeeping keys of a config.json that describe the file, not the network.
_META_KEYS = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}


def modality_of(config_json: dict[str, Any], where: Union[str, Path] = "config.json") -> str:
    model_type = config_json.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type is {model_type!r}; expected one of {sorted(MODEL_TYPES)} (a transformers Data2Vec model)"
        )
    return MODEL_TYPES[model_type]


def config_from_transformers(
    config_json: dict[str, Any], modality: str, weight_keys: set[str], where: Union[str, Path] = "config.json"
) -> EncoderConfig:
    """Our encoder config from a transformers ``config.json``: shared fields copied, the rest kept
    in ``extra`` so that saving writes them back unchanged."""
    config_cls = ENCODERS[modality][1]
    names = {f.name for f in dataclasses.fields(config_cls)} - _OUR_ONLY_FIELDS
    ours = {k: v for k, v in config_json.items() if k in names}
    extra = {k: v for k, v in config_json.items() if k not in names and k not in _META_KEYS}
    if modality == "text":
        ours["add_pooling_layer"] = "pooler.dense.weight" in weight_keys
    if modality == "vision":
        ours["add_pooling_layer"] = "pooler.layernorm.weight" in weight_keys
    ours["extra"] = extra
    return config_cls.from_dict(ours, where=str(where))


def config_to_transformers(config: EncoderConfig, modality: str, architecture: str) -> dict[str, Any]:
    values = {k: v for k, v in config.to_dict().items() if k not in _OUR_ONLY_FIELDS}
    if modality == "text":
        values.pop("position_embedding_type", None)  # transformers 5 has no such attribute
    return {
        **config.extra,
        **values,
        "model_type": MODEL_TYPE_OF[modality],
        "architectures": [architecture],
        "dtype": "float32",
    }


def _weight_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin found")


def read_transformers_dir(path: Union[str, Path]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(modality, config.json contents, weights with the base-model prefix stripped)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected a transformers model directory)")
    config_json = load_json(directory / "config.json")
    modality = modality_of(config_json, directory / "config.json")
    weights = load_weights(_weight_file(directory))
    weights = {k: v for k, v in weights.items() if not any(k.endswith(i) for i in _IGNORED_KEYS)}
    prefix = PREFIX[modality]
    if any(k.startswith(prefix) for k in weights):
        base = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        head = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    else:
        base, head = weights, {}
    return modality, config_json, {"base": base, "head": head}  # type: ignore[dict-item]


def load_transformers(path: Union[str, Path], *, ignore_head: bool = False) -> Encoder:
    """Our encoder (in eval mode) for a transformers Data2Vec{Audio,Text,Vision} directory.

    Every encoder weight must be consumed and match in shape. Task-head weights (``lm_head``,
    ``classifier``, ...) are refused unless ``ignore_head=True``, so nothing is dropped silently.
    """
    directory = Path(path)
    modality, config_json, parts = read_transformers_dir(directory)
    base, head = parts["base"], parts["head"]
    if head and not ignore_head:
        arch = ",".join(config_json.get("architectures") or ["?"])
        raise ValueError(
            f"{directory}: a {arch} checkpoint with task-head weights {sorted(head)[:6]}; load_transformers "
            "returns the encoder only: pass ignore_head=True to load it without the head"
        )
    config = config_from_transformers(config_json, modality, set(base), directory / "config.json")
    encoder_cls = ENCODERS[modality][0]
    encoder = encoder_cls(config)
    expected = encoder.state_dict()
    # Parameters transformers builds only in some configurations are kept as initialised here.
    state = keymaps.from_transformers(modality, base, expected)
    encoder.load_state_dict(state, strict=True)
    log.info("loaded %s encoder (%d tensors) from %s", modality, len(state), directory)
    return encoder.eval()  # like transformers' from_pretrained: ready for inference


def no_transformers_equivalent(encoder: nn.Module) -> str | None:
    """Why ``encoder`` cannot be written as a transformers Data2Vec model (None when it can).

    data2vec 2.0 audio's ALiBi biases and 2.0 images' post-norm blocks have no counterpart in
    transformers' Data2Vec models; fixed sin-cos positions do (as absolute position embeddings).
    """
    config = getattr(encoder, "config", None)
    if getattr(config, "use_alibi", False):
        return ("this audio encoder uses ALiBi attention biases (data2vec 2.0), which transformers' "
                "Data2VecAudioModel has no equivalent for: export it with format=safetensors")
    if not getattr(config, "pos_conv_zero_padding", True):
        return ("this audio encoder keeps padded frames un-zeroed before its positional convolutions (fairseq "
                "data2vec 2.0), while transformers' Data2VecAudioModel zeroes them: export it with format=safetensors")
    if getattr(encoder, "modality", None) == "vision" and not getattr(config, "norm_first", True):
        return ("this vision encoder has post-norm blocks (data2vec 2.0), which transformers' "
                "Data2VecVisionModel has no equivalent for: export it with format=safetensors")
    return None


def sincos_as_absolute(encoder: nn.Module) -> Tensor | None:
    """A vision encoder's fixed sin-cos positions as transformers' absolute position embeddings
    ``(1, 1 + patches, dim)`` (zero at the CLS slot); None for other encoders. Call
    ``no_transformers_equivalent`` first."""
    config = getattr(encoder, "config", None)
    if getattr(encoder, "modality", None) != "vision" or not getattr(config, "use_sincos_position_embeddings", False):
        return None
    from ..models.positions import sincos_2d

    pos = sincos_2d(config.hidden_size, config.grid_size)
    return torch.cat([torch.zeros(1, 1, pos.shape[-1]), pos], dim=1)


def encoder_to_transformers(
    encoder: nn.Module, architecture: str | None = None, include_pooler: bool = True
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json contents, transformers-named weights) for ``encoder``.

    A text encoder's pooler is written only when it has one and ``include_pooler`` (the data2vec
    objective never trains it: exports of pretrained encoders leave it out). Without it,
    transformers' ``Data2VecTextModel`` initialises a pooler at load and warns that it is new,
    which is the truth: a random pooler written into the file would look trained.
    """
    modality = getattr(encoder, "modality", None)
    if modality not in ENCODERS or not isinstance(encoder, ENCODERS[modality][0]):
        raise TypeError(f"expected a d2v_train encoder (audio, text or vision), got {type(encoder).__name__}")
    reason = no_transformers_equivalent(encoder)
    if reason is not None:
        raise ValueError(reason)
    state = keymaps.to_transformers(modality, encoder.state_dict())
    sincos = sincos_as_absolute(encoder)
    if sincos is not None:
        state["embeddings.position_embeddings"] = sincos
    if modality == "text" and not include_pooler:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    if modality == "vision" and architecture in (None, BASE_CLASS["vision"]) and encoder.pool_norm is not None:
        # Data2VecVisionModel is built without a pooler; its mean-pooling norm belongs to
        # Data2VecVisionForImageClassification, so the bare-model export leaves it out.
        state.pop("pooler.layernorm.weight")
        state.pop("pooler.layernorm.bias")
        log.warning("Data2VecVisionModel has no pooler: the mean-pooling layer norm is not exported")
    config = config_to_transformers(encoder.config, modality, architecture or BASE_CLASS[modality])
    if sincos is not None:
        config["use_absolute_position_embeddings"] = True
    return config, state


def save_transformers(encoder: nn.Module, path: Union[str, Path], *, include_pooler: bool = True) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``Data2Vec*Model.from_pretrained`` loads
    (a text encoder's pooler only when it has one and ``include_pooler``)."""
    directory = Path(path)
    config, state = encoder_to_transformers(encoder, include_pooler=include_pooler)
    save_safetensors(state, directory / "model.safetensors")
    save_json(config, directory / "config.json")
    return directory
