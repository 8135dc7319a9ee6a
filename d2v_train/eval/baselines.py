"""The baseline a user would try before any pretraining, on the same probe task: an encoder's
features are only worth their cost if they beat it.

- images (fixed-size float inputs): the raw pixels, flattened;
- text (token ids): TF-IDF over the tokens (unigrams and bigrams), fitted on the training texts;
- audio (1-D waveforms): a log-mel spectrogram resized to a fixed number of frames, which keeps a
  word's time course (a strong baseline for single words).

``raw_baseline(train, val, collate_fn)`` picks the one that fits the inputs and returns it as a pair
of ``Features`` with its name; the linear probe and kNN then treat it like any encoder's features.
``baseline_probe`` is its all-labels linear probe, cached: it does not depend on any run, so only a
task's first run pays for it (14 s on digits' 3,072 pixel values, 9 s for TF-IDF on the docstrings).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .features import Features

__all__ = ["baseline_probe", "logmel_features", "raw_baseline", "tfidf_features"]

PIXELS, TFIDF, LOGMEL = "raw inputs", "TF-IDF", "log-mel"  # the rows' names in d2v-eval's table


def _labels(ds: Dataset) -> Optional[torch.Tensor]:
    first = ds[0]
    if "labels" not in first:
        return None
    return torch.as_tensor([int(ds[i]["labels"]) for i in range(len(ds))])  # type: ignore[arg-type]


def tfidf_features(train: Dataset, val: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF over each example's token ids without its first and last (the BOS / EOS every
    sequence carries), unigrams and bigrams, fitted on the training examples alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def docs(ds: Dataset) -> list[str]:
        return [" ".join(map(str, torch.as_tensor(ds[i]["inputs"]).tolist()[1:-1])) for i in range(len(ds))]  # type: ignore[arg-type]

    vec = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform(docs(train))
    return x_train.toarray().astype(np.float32), vec.transform(docs(val)).toarray().astype(np.float32)


def logmel_features(train: Dataset, val: Dataset, sample_rate: int = 16000, frames: int = 24, mels: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel spectrogram (25 ms windows, 10 ms hop) of each waveform, resized to ``frames``."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=sample_rate // 40, hop_length=sample_rate // 100, n_mels=mels)

    def feats(ds: Dataset) -> np.ndarray:
        out = []
        for i in range(len(ds)):  # type: ignore[arg-type]
            spec = torch.log(mel(ds[i]["inputs"].float()) + 1e-6)  # (mels, T)
            spec = torch.nn.functional.interpolate(spec[None], size=frames, mode="linear", align_corners=False)[0]
            out.append(spec.flatten().numpy())
        return np.stack(out)

    return feats(train), feats(val)


def _pixels(ds: Dataset, collate_fn: Callable) -> Optional[Features]:
    """The inputs flattened, when every batch is fixed-size (no padding)."""
    xs, ys = [], []
    loader = DataLoader(ds, batch_size=512, shuffle=False, collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))
    for batch in loader:
        if batch.get("padding_mask") is not None:
            return None
        xs.append(batch["inputs"].flatten(1).float())
        ys.append(batch["labels"])
    return Features(torch.cat(xs), torch.cat(ys))


def raw_baseline(train: Dataset, val: Dataset, collate_fn: Callable, *, sample_rate: int = 16000) -> Optional[tuple[str, Features, Features]]:
    """(name, train features, val features) of the baseline that fits these inputs; None when none
    does (e.g. an empty set, or variable-size images)."""
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        return None
    inputs = torch.as_tensor(train[0]["inputs"])
    if not inputs.is_floating_point():
        name, (xt, xv) = TFIDF, tfidf_features(train, val)
    elif inputs.dim() == 1:
        name, (xt, xv) = LOGMEL, logmel_features(train, val, sample_rate)
    else:
        pair = _pixels(train, collate_fn), _pixels(val, collate_fn)
        if pair[0] is None or pair[1] is None:
            return None
        return PIXELS, pair[0], pair[1]
    return name, Features(torch.from_numpy(xt), _labels(train)), Features(torch.from_numpy(xv), _labels(val))


def baseline_probe(
    train: Dataset, val: Dataset, collate_fn: Callable, C: Union[float, str] = "cv", *, sample_rate: int = 16000, cache: bool = True
) -> Optional[tuple[str, float, float]]:
    """(name, accuracy, C) of the baseline's linear probe with every training label (``d2v-eval``'s
    probe, ``C`` as there); None when no baseline fits. Cached under ``$D2V_CACHE/baselines/`` by a
    hash of the baseline's features, labels and ``C``."""
    from d2v_train.data.common import default_cache_dir
    from d2v_train.interop.files import atomic_write

    from .probe import linear_probe, resolve_C

    baseline = raw_baseline(train, val, collate_fn, sample_rate=sample_rate)
    if baseline is None:
        return None
    name, tr, va = baseline
    digest = hashlib.sha1(f"{name}|{C}".encode())
    for t in (tr.features, tr.labels, va.features, va.labels):
        digest.update(t.contiguous().numpy().tobytes() if t is not None else b"-")
    path = default_cache_dir("baselines") / f"{digest.hexdigest()}.json"
    if cache and path.is_file():
        try:
            hit = json.loads(path.read_text())
            return name, float(hit["accuracy"]), float(hit["C"])
        except (ValueError, KeyError, OSError):  # a damaged entry is measured again
            pass
    chosen = resolve_C(C, tr.features, tr.labels)
    accuracy = linear_probe(tr.features, tr.labels, va.features, va.labels, C=chosen)
    if cache:
        try:
            atomic_write(path, lambda p: p.write_text(json.dumps({"name": name, "accuracy": accuracy, "C": chosen})))
        except OSError:  # a read-only cache costs time, never the result
            pass
    return name, accuracy, chosen
