"""Config nodes to plain values and typed settings, shared by the pretraining and fine-tuning apps
and their LightningModules (one copy, so both read configs the same way)."""

from __future__ import annotations

from typing import Any, TypeVar

from omegaconf import OmegaConf

__all__ = ["as_settings", "plain"]

T = TypeVar("T")


def plain(node: Any) -> Any:
    """A Hydra/OmegaConf node as plain dicts and lists with interpolations resolved (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def as_settings(cls: type[T], value: Any) -> T:
    """``value`` as a ``cls`` settings dataclass: ``None`` -> defaults, an instance as is, a mapping
    through ``cls.from_dict`` when it has one (it validates), else ``cls(**value)``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    from_dict = getattr(cls, "from_dict", None)
    if from_dict is not None:
        return from_dict(dict(value))
    return cls(**dict(value))
