"""Encoders for the three modalities, built on one shared transformer (see ``transformer.py``)."""

from __future__ import annotations

from typing import Any, Mapping, Union

from torch import nn

from .audio import AudioEncoder, AudioEncoderConfig
from .base import EncoderBase
from .config import EncoderConfig
from .text import TextEncoder, TextEncoderConfig
from .transformer import Block, EncoderOutput, TransformerStack
from .vision import VisionEncoder, VisionEncoderConfig

ENCODERS: dict[str, tuple[type[nn.Module], type[EncoderConfig]]] = {
    "audio": (AudioEncoder, AudioEncoderConfig),
    "text": (TextEncoder, TextEncoderConfig),
    "vision": (VisionEncoder, VisionEncoderConfig),
}

Encoder = Union[AudioEncoder, TextEncoder, VisionEncoder]


def build_encoder(modality: str, config: Union[EncoderConfig, Mapping[str, Any], None] = None) -> Encoder:
    """Builds the encoder of ``modality`` from a config object or a plain mapping of its fields."""
    if modality not in ENCODERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(ENCODERS)}")
    encoder_cls, config_cls = ENCODERS[modality]
    if config is None:
        config = config_cls()
    elif not isinstance(config, EncoderConfig):
        config = config_cls.from_dict(config, where=f"{modality} encoder config")
    elif not isinstance(config, config_cls):
        raise TypeError(f"{modality} encoder needs a {config_cls.__name__}, got {type(config).__name__}")
    return encoder_cls(config)


__all__ = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "Block",
    "Encoder",
    "EncoderBase",
    "EncoderConfig",
    "EncoderOutput",
    "ENCODERS",
    "TextEncoder",
    "TextEncoderConfig",
    "TransformerStack",
    "VisionEncoder",
    "VisionEncoderConfig",
    "build_encoder",
]
