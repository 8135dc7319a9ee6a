"""Judging frozen features: linear probe, weighted kNN, few-label subsets, mean +- spread.

- ``linear_probe``: scikit-learn ``StandardScaler`` + ``LogisticRegression`` (lbfgs, multinomial),
  C fixed at 1.0 by default. A fixed C keeps every row of a table on the same footing (a per-row
  search on 10 labels per class would mostly fit noise); pass ``C=`` to change it.
- ``torch_linear_probe``: the same objective (cross-entropy + ``||W||^2 / (2 C N)``, standardised
  features) fitted with torch's L-BFGS from zeros: deterministic, no scikit-learn, a few ms on the
  cached features of a small probe set. The online probe callback uses it during training.
- ``knn_accuracy``: weighted k-nearest-neighbours as in DINO-style monitors: cosine similarity
  (features centred on the labelled set's mean, then L2-normalised), the ``k`` nearest labelled
  examples vote with weight ``exp(similarity / temperature)``.
- ``few_label_indices``: ``labels_per_class`` examples of every class, drawn with a seed; every
  method sees the same subset for a given (k, seed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Spread",
    "few_label_indices",
    "knn_accuracy",
    "linear_probe",
    "parse_labels_per_class",
    "spread",
    "torch_linear_probe",
]

LabelsPerClass = Optional[int]  # None = all labels


def parse_labels_per_class(value: Union[int, str, None]) -> LabelsPerClass:
    """``1`` / ``"10"`` -> that many labels per class; ``"all"`` / ``None`` / ``0`` -> every label."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "none", "")):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"labels_per_class: expected a positive integer or 'all', got {value!r}") from None
    if k < 0:
        raise ValueError(f"labels_per_class: expected a positive integer or 'all', got {value!r}")
    return k or None


def few_label_indices(labels: Union[Tensor, Sequence[int]], labels_per_class: LabelsPerClass, seed: int) -> list[int]:
    """Indices of ``labels_per_class`` examples of each class (all of a class that has fewer), drawn
    with ``seed``; every index when ``labels_per_class`` is None. Sorted."""
    y = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    if labels_per_class is None:
        return list(range(len(y)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(y):
        by_class.setdefault(c, []).append(i)
    keep: list[int] = []
    for c in sorted(by_class):
        members = by_class[c]
        keep += rng.sample(members, min(labels_per_class, len(members)))
    return sorted(keep)


def _np(x: Union[Tensor, np.ndarray]) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def linear_probe(
    train_x: Union[Tensor, np.ndarray],
    train_y: Union[Tensor, np.ndarray],
    val_x: Union[Tensor, np.ndarray],
    val_y: Union[Tensor, np.ndarray],
    *,
    C: float = 1.0,
    max_iter: int = 2000,
) -> float:
    """Accuracy on ``val`` of standardised features + logistic regression fitted on ``train``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xt, yt, xv, yv = _np(train_x).astype(np.float64), _np(train_y), _np(val_x).astype(np.float64), _np(val_y)
    if len(np.unique(yt)) < 2:
        return float(np.mean(yv == yt[0])) if len(yt) else 0.0
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xt, yt)
    return float(np.mean(clf.predict(xv) == yv))


def torch_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    *,
    C: float = 1.0,
    max_iter: int = 100,
) -> float:
    """``linear_probe``'s objective fitted with torch L-BFGS (see the module docstring)."""
    xt, xv = train_x.double(), val_x.double()
    mean, std = xt.mean(0), xt.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xt, xv = (xt - mean) / std, (xv - mean) / std
    yt = train_y.long()
    w = torch.zeros(xt.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    reg = 1.0 / (2.0 * C * max(len(yt), 1))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + reg * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (xv @ w + b).argmax(1)
    return float((pred == val_y.long()).double().mean())


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: Optional[int] = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted kNN accuracy (cosine, ``exp(sim / T)`` votes, see the module docstring)."""
    xt, xv = train_x.float(), val_x.float()
    centre = xt.mean(0, keepdim=True)
    xt = torch.nn.functional.normalize(xt - centre, dim=1)
    xv = torch.nn.functional.normalize(xv - centre, dim=1)
    yt = train_y.long()
    classes = int(num_classes) if num_classes else int(max(int(yt.max()), int(val_y.max())) + 1)
    k = max(1, min(int(k), len(yt)))
    correct = 0
    for start in range(0, len(xv), chunk):
        sim = xv[start : start + chunk] @ xt.T  # (chunk, train)
        top, idx = sim.topk(k, dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], classes).scatter_add_(1, yt[idx], weights)
        correct += int((votes.argmax(1) == val_y[start : start + chunk].long()).sum())
    return correct / max(len(xv), 1)


@dataclass
class Spread:
    """Mean and sample standard deviation over seeds (0 for a single value)."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


def spread(values: Sequence[float]) -> Spread:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return Spread(float("nan"), float("nan"), 0)
    arr = np.asarray(vals)
    return Spread(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr))
