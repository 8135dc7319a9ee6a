"""Which modality a config choice belongs to, so ``data=`` and ``encoder=`` can imply ``modality=``.

``d2v-pretrain data=text`` means text pretraining: the data module's class says so (``modality``
attribute). ``encoder=vision_tiny`` means vision: its keys fit only the vision encoder's config. The
entry point adds the implied ``modality=`` (which picks the matching masking and objective), and a
choice that contradicts an explicit ``modality=`` is one line naming both, not a traceback from deep
inside the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from d2v_train.cli import ConfigError, config_dir

__all__ = ["data_modality", "encoder_modality", "imply_modality", "mismatch", "options_for"]


def data_modality(target: Optional[str]) -> Optional[str]:
    """The ``modality`` of the data module class ``target`` (a ``_target_`` path), or None."""
    if not target:
        return None
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - a custom target that does not import is reported later
        return None
    return getattr(cls, "modality", None) or None


def encoder_modality(node: Mapping[str, Any]) -> Optional[str]:
    """The one modality whose encoder config accepts every key of ``node``, or None."""
    from d2v_train.models import ENCODERS

    keys = set(node)
    fits = [m for m, (_, cfg_cls) in ENCODERS.items() if keys <= set(cfg_cls.__dataclass_fields__)]
    return fits[0] if len(fits) == 1 else None


def _yaml(group: str, name: str) -> dict[str, Any]:
    path = Path(config_dir()) / group / f"{name}.yaml"
    if not path.is_file():
        return {}  # an unknown option: the override check names the valid ones
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def options_for(group: str, modality: str) -> list[str]:
    """Options of ``group`` (data / encoder) that belong to ``modality``."""
    out = []
    for path in sorted((Path(config_dir()) / group).glob("*.yaml")):
        node = _yaml(group, path.stem)
        found = data_modality(node.get("_target_")) if group == "data" else encoder_modality(
            {k: v for k, v in node.items() if k != "defaults"})
        if found == modality:
            out.append(path.stem)
    return out


def _group_choice(overrides: Sequence[str], group: str) -> Optional[str]:
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and key == group and value and "," not in value:
            return value
    return None


def imply_modality(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with ``modality=M`` added when ``data=`` or ``encoder=`` implies M and no
    ``modality=`` / ``experiment=`` is given; ConfigError when the two imply different modalities."""
    if _group_choice(overrides, "experiment"):
        return list(overrides)
    implied: dict[str, str] = {}
    data = _group_choice(overrides, "data")
    if data:
        m = data_modality(_yaml("data", data).get("_target_"))
        if m:
            implied[f"data={data}"] = m
    encoder = _group_choice(overrides, "encoder")
    if encoder:
        node = {k: v for k, v in _yaml("encoder", encoder).items() if k != "defaults"}
        m = encoder_modality(node) if node else None
        if m:
            implied[f"encoder={encoder}"] = m
    explicit = _group_choice(overrides, "modality")
    if explicit:
        for choice, m in sorted(implied.items()):
            if m != explicit:
                raise ConfigError(mismatch(choice, m, explicit))
        return list(overrides)
    found = sorted(set(implied.values()))
    if len(found) > 1:
        (a, ma), (b, mb) = sorted(implied.items())
        raise ConfigError(f"{a} is {ma} but {b} is {mb}; choose a {ma} or a {mb} pair (modality={ma} or modality={mb} "
                          "picks matching defaults)")
    return [f"modality={found[0]}", *overrides] if found else list(overrides)


def mismatch(choice: str, found: str, modality: str) -> str:
    """One line for ``data=`` / ``encoder=`` of another modality than ``modality=``."""
    group = choice.split("=", 1)[0]
    what = f"{found} data" if group == "data" else f"a {found} encoder"
    fitting = ", ".join(options_for(group, modality))
    return (f"{choice} is {what} but modality={modality}; drop modality= ({group}= picks it) or choose "
            f"{'a ' if group == 'encoder' else ''}{modality} {group}: {fitting}")
