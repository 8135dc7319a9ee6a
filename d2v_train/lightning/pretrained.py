"""Where a fine-tuning run's encoder comes from (``pretrained=``).

Any source ``d2v_train.interop.sources`` reads: a ``d2v-pretrain`` or ``d2v-finetune`` checkpoint,
our export directory, a transformers directory (bare or task model: its head weights are kept when
the fine-tuning head is the same class), or a fairseq / BEiT data2vec v1 or 2.0 file. Checkpoints are read
with ``weights_only=True``: a pickle never runs code here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor

from d2v_train.models import Encoder, build_encoder

__all__ = ["Pretrained", "load_pretrained", "rebuild_encoder"]

log = logging.getLogger("d2v_train.finetune")


@dataclass
class Pretrained:
    """An encoder, plus the task-model weights and settings the source carried (if any)."""

    encoder: Encoder
    source: str  # a ``SourceKind``: "pretraining", "finetuning", "native", "transformers", ...
    architecture: Optional[str] = None  # transformers task class of ``task_state``
    task_state: dict[str, Tensor] = field(default_factory=dict)  # full head-model state (encoder.* + head)
    extras: dict[str, Any] = field(default_factory=dict)  # CTC vocabulary, classes, tokenizer.json path


def load_pretrained(spec: str) -> Pretrained:
    """The encoder (and task weights) at ``spec``: a ``.ckpt`` file or a directory with config.json.

    Reading is ``d2v_train.interop.sources.load_source``'s job (shared with ``d2v-export``); this
    only keeps what fine-tuning needs from it.
    """
    from d2v_train.interop.sources import load_source

    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"pretrained={spec}: no such file or directory")
    try:
        loaded = load_source(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"pretrained={spec}: {err}") from None
    encoder = loaded.encoder.train()
    extras = {**loaded.extras, "tokenizer": str(loaded.tokenizer) if loaded.tokenizer else None}
    if loaded.model is encoder:
        return Pretrained(encoder, loaded.kind, extras=extras)
    model = loaded.model
    return Pretrained(encoder, loaded.kind, model.architecture, model.state_dict(), extras)


def rebuild_encoder(encoder: Encoder, overrides: Mapping[str, Any]) -> Encoder:
    """A copy of ``encoder`` whose config has ``overrides`` (dropouts, drop path, layerdrop, mask
    settings: knobs that do not change weight shapes), with the same weights.

    A learned mask embedding / token that the new config needs and the source lacks starts as
    freshly initialised (a checkpoint pretrained without masking has none).
    """
    if not overrides:
        return encoder
    config = encoder.config
    names = {f.name for f in dataclasses.fields(config)} - {"extra"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown encoder setting(s) {unknown}; valid: {sorted(names)}")
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()}
    new = build_encoder(encoder.modality, dataclasses.replace(config, **values))
    expected, state = new.state_dict(), encoder.state_dict()
    fresh = {"mask_embedding", "mask_token"}
    missing = sorted(k for k in set(expected) - set(state) if k not in fresh)
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or reshaped:
        raise ValueError(f"encoder overrides {sorted(overrides)} change the weights ({(missing + reshaped)[:6]}); "
                         "only settings that keep the weight shapes can be changed for fine-tuning")
    new.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return new
