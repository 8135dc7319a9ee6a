"""Judging representations: features from any source, linear probe, kNN, few-label subsets,
``d2v-eval`` (a probe / fine-tune table for a checkpoint vs its architecture at random init) and
``d2v-report`` (plots and a summary of a run). See docs/evaluation.md."""

from .features import POOLINGS, Features, embed, extract_features, load_encoder, token_idf
from .probe import few_label_indices, knn_accuracy, linear_probe, spread, torch_linear_probe

__all__ = [
    "POOLINGS",
    "Features",
    "embed",
    "extract_features",
    "few_label_indices",
    "knn_accuracy",
    "linear_probe",
    "load_encoder",
    "spread",
    "token_idf",
    "torch_linear_probe",
]
