"""Encoder configs: plain dataclasses whose field names follow transformers' Data2Vec*Config.

Sharing the field names keeps import/export a copy rather than a translation, and lets a Hydra
``encoder`` config read like the ``config.json`` of a released checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

C = TypeVar("C", bound="EncoderConfig")


@dataclass
class EncoderConfig:
    """Fields every modality shares. ``extra`` keeps transformers fields we do not use (head
    settings, label maps) so an imported config is written back unchanged."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, where: str = "encoder config") -> C:
        """Builds a config, refusing unknown keys with a message that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names - {'extra'})}"
            )
        kwargs = {k: _plain(v) for k, v in values.items()}
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Fails early, naming the field, instead of deep inside a layer constructor."""
        for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )


def _plain(value: Any) -> Any:
    """OmegaConf lists and tuples become plain lists so configs compare and serialise simply."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    if type(value).__name__ == "DictConfig":
        return {k: _plain(v) for k, v in value.items()}
    return value
