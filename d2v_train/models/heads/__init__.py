"""Downstream heads: each wraps one of our encoders (``self.encoder``) and matches, in maths, config
fields and defaults, the transformers Data2Vec* class named by its ``architecture`` attribute."""

from __future__ import annotations

from typing import Any

from torch import nn

from .audio import AudioForCTC, AudioForFrameClassification, AudioForSequenceClassification, AudioForXVector
from .common import HeadOutput, TaskHead
from .text import (
    TextForCausalLM,
    TextForMaskedLM,
    TextForMultipleChoice,
    TextForQuestionAnswering,
    TextForSequenceClassification,
    TextForTokenClassification,
)
from .vision import VisionForImageClassification, VisionForSemanticSegmentation

HEADS: dict[str, type[TaskHead]] = {
    cls.architecture: cls
    for cls in (
        AudioForCTC,
        AudioForSequenceClassification,
        AudioForFrameClassification,
        AudioForXVector,
        TextForMaskedLM,
        TextForCausalLM,
        TextForSequenceClassification,
        TextForMultipleChoice,
        TextForTokenClassification,
        TextForQuestionAnswering,
        VisionForImageClassification,
        VisionForSemanticSegmentation,
    )
}
"""transformers class name -> our head class."""

TASKS: dict[str, dict[str, type[TaskHead]]] = {
    "audio": {
        "ctc": AudioForCTC,
        "sequence_classification": AudioForSequenceClassification,
        "frame_classification": AudioForFrameClassification,
        "xvector": AudioForXVector,
    },
    "text": {
        "masked_lm": TextForMaskedLM,
        "causal_lm": TextForCausalLM,
        "sequence_classification": TextForSequenceClassification,
        "multiple_choice": TextForMultipleChoice,
        "token_classification": TextForTokenClassification,
        "question_answering": TextForQuestionAnswering,
    },
    "vision": {
        "image_classification": VisionForImageClassification,
        "semantic_segmentation": VisionForSemanticSegmentation,
    },
}
"""modality -> short task name (what a ``head=`` config names) -> head class."""


def head_class(task: str, modality: Any) -> type[TaskHead]:
    """The class of the ``task`` head: a short name from ``TASKS`` or a transformers class name."""
    if task in HEADS:
        return HEADS[task]
    tasks = TASKS.get(modality, {})
    if task not in tasks:
        raise ValueError(f"unknown {modality} task {task!r}; expected one of {sorted(tasks)} or a class in {sorted(HEADS)}")
    return tasks[task]


def build_head(task: str, encoder: nn.Module, **settings: Any) -> TaskHead:
    """The ``task`` head on ``encoder``."""
    return head_class(task, getattr(encoder, "modality", None))(encoder, **settings)

__all__ = [
    "AudioForCTC",
    "AudioForFrameClassification",
    "AudioForSequenceClassification",
    "AudioForXVector",
    "HEADS",
    "HeadOutput",
    "TASKS",
    "TaskHead",
    "TextForCausalLM",
    "TextForMaskedLM",
    "TextForMultipleChoice",
    "TextForQuestionAnswering",
    "TextForSequenceClassification",
    "TextForTokenClassification",
    "VisionForImageClassification",
    "VisionForSemanticSegmentation",
    "build_head",
    "head_class",
]
