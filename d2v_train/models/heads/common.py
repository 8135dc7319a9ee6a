"""What every downstream head shares: the output object, settings resolution, losses, init.

A head is an ``nn.Module`` that owns its encoder (``self.encoder``) and adds a task head on top.
Head settings use transformers' config field names (``num_labels``, ``final_dropout``, ...) and are
resolved in this order: constructor keyword > the encoder config's ``extra`` dict (where
``load_transformers`` keeps transformers fields the encoder does not use) > transformers' default.
Using the same names and defaults is what lets an imported checkpoint behave exactly as it does in
transformers, and lets an export round-trip through ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class HeadOutput:
    """What a head returns; fields follow transformers' task outputs.

    ``logits`` is always set (QA: ``(batch, length, 2)``, the stacked start and end logits).
    ``loss`` is set when labels are given. ``padding_mask`` is at the resolution of ``logits``'
    time axis (audio frames), True = padding, so CTC decoding and frame metrics can skip padding.
    """

    logits: Tensor
    loss: Optional[Tensor] = None
    embeddings: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None
    auxiliary_logits: Optional[Tensor] = None
    padding_mask: Optional[Tensor] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None


def default_id2label(num_labels: int) -> dict[str, str]:
    return {str(i): f"LABEL_{i}" for i in range(num_labels)}


def resolve_settings(
    defaults: Mapping[str, Any],
    extra: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    with_labels: bool,
    where: str,
) -> dict[str, Any]:
    """Head settings from keyword overrides, then the encoder's ``extra`` dict, then defaults.

    ``num_labels`` follows transformers: it is the length of ``id2label`` when only that is given.
    Unknown override keys are refused so a typo cannot pass silently.
    """
    valid = set(defaults) | ({"num_labels", "id2label"} if with_labels else set())
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"{where}: unknown setting(s) {unknown}; valid settings: {sorted(valid)}")
    settings: dict[str, Any] = {}
    for name, default in defaults.items():
        value = overrides[name] if name in overrides else extra.get(name, default)
        settings[name] = list(value) if isinstance(value, tuple) else value
    if with_labels:
        id2label = overrides.get("id2label")
        if id2label is None and "num_labels" not in overrides:
            id2label = extra.get("id2label")
        if "num_labels" in overrides:
            num_labels = int(overrides["num_labels"])
        elif id2label:
            num_labels = len(id2label)
        else:
            num_labels = int(extra.get("num_labels", 2))
        if num_labels < 0:
            raise ValueError(f"{where}: num_labels must be >= 0, got {num_labels}")
        id2label = {str(k): str(v) for k, v in (id2label or {}).items()}
        if len(id2label) != num_labels:
            id2label = default_id2label(num_labels)
        settings["num_labels"] = num_labels
        settings["id2label"] = id2label
    return settings


class TaskHead(nn.Module):
    """Base of every head: holds the encoder, the resolved settings and the transformers class name.

    Subclasses set ``modality``, ``architecture`` (the transformers class the head matches),
    ``defaults`` (transformers fields read, with transformers' defaults) and ``with_labels``.
    """

    modality: ClassVar[str]
    architecture: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    with_labels: ClassVar[bool] = True

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__()
        if getattr(encoder, "modality", None) != self.modality:
            raise TypeError(
                f"{type(self).__name__} needs a {self.modality} encoder, got {type(encoder).__name__} "
                f"(modality {getattr(encoder, 'modality', None)!r})"
            )
        self.encoder = encoder
        self.settings = resolve_settings(
            self.defaults, encoder.config.extra, overrides, with_labels=self.with_labels, where=type(self).__name__
        )

    @property
    def num_labels(self) -> int:
        return int(self.settings["num_labels"])

    def transformers_fields(self) -> dict[str, Any]:
        """The head's fields for a transformers ``config.json`` (labels as id2label / label2id)."""
        fields = {k: v for k, v in self.settings.items() if k not in ("num_labels", "id2label")}
        if self.with_labels:
            id2label = self.settings["id2label"]
            fields["id2label"] = dict(id2label)
            fields["label2id"] = {label: int(i) for i, label in id2label.items()}
        return fields

    def init_head(self, modules: list[nn.Module]) -> None:
        """transformers-style init of the head's own modules (the encoder keeps its weights)."""
        std = self.encoder.config.initializer_range
        for root in modules:
            for module in root.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)


def replace_config(encoder: nn.Module, **changes: Any) -> None:
    """Gives ``encoder`` a copy of its config with ``changes`` (the caller's config object is kept)."""
    encoder.config = dataclasses.replace(encoder.config, **changes)


def sequence_classification_loss(
    logits: Tensor, labels: Tensor, num_labels: int, problem_type: Optional[str]
) -> Tensor:
    """transformers' rule: regression when ``num_labels == 1``, cross-entropy for integer labels,
    BCE-with-logits (multi-label) otherwise, unless ``problem_type`` names one explicitly."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.float()
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.reshape(-1), labels.reshape(-1).to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.reshape(-1).long())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(
        f"unknown problem_type {problem_type!r}; expected 'regression', 'single_label_classification' "
        "or 'multi_label_classification'"
    )
