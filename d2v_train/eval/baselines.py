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

``lsa_features`` is a reference of another kind for text: TF-IDF of the unlabelled pretraining
corpus compressed by a truncated SVD to an encoder's width, i.e. what a classic unsupervised method
learns from the same text in as many numbers per example.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Collection, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .features import Features

__all__ = ["baseline_probe", "logmel_features", "lsa_features", "raw_baseline", "tfidf_features"]

PIXELS, TFIDF, LOGMEL = "raw inputs", "TF-IDF", "log-mel"  # the rows' names in d2v-eval's table


def _labels(ds: Dataset) -> Optional[torch.Tensor]:
    first = ds[0]
    if "labels" not in first:
        return None
    return torch.as_tensor([int(ds[i]["labels"]) for i in range(len(ds))])  # type: ignore[arg-type]


def _token_docs(ds: Dataset, drop_ends: bool = True, skip_ids: Collection[int] = ()) -> list[str]:
    """Each example's token ids as one space-separated string (the vectorisers' input), without its
    first and last (the BOS / EOS every probe example carries) and without ``skip_ids``."""
    docs = []
    for i in range(len(ds)):  # type: ignore[arg-type]
        ids = torch.as_tensor(ds[i]["inputs"]).tolist()
        docs.append(" ".join(str(t) for t in (ids[1:-1] if drop_ends else ids) if t not in skip_ids))
    return docs


def _tfidf_vectoriser() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), min_df=2, sublinear_tf=True)


def tfidf_features(train: Dataset, val: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF over each example's token ids without its first and last (the BOS / EOS every
    sequence carries), unigrams and bigrams, fitted on the training examples alone."""
    vec = _tfidf_vectoriser()
    x_train = vec.fit_transform(_token_docs(train))
    return x_train.toarray().astype(np.float32), vec.transform(_token_docs(val)).toarray().astype(np.float32)


def lsa_features(corpus: Dataset, train: Dataset, val: Dataset, dims: int, skip_ids: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Latent semantic analysis: TF-IDF (as ``tfidf_features``) fitted on an unlabelled ``corpus`` of
    token-id sequences (``skip_ids`` left out, e.g. padding and separators), compressed to ``dims``
    by a truncated SVD fitted on that corpus alone, applied to ``train`` and ``val``.

    An unsupervised reference for a text encoder's pooled features: as many numbers per example, and
    learnt from the same unlabelled text the encoder pretrains on, with no labels involved."""
    from sklearn.decomposition import TruncatedSVD

    vec = _tfidf_vectoriser()
    try:
        counts = vec.fit_transform(_token_docs(corpus, drop_ends=False, skip_ids=set(skip_ids)))
    except ValueError as e:  # an empty corpus, or no n-gram in two documents
        raise ValueError(f"LSA: the corpus gives no vocabulary to fit ({len(corpus)} sequences): {e}") from None  # type: ignore[arg-type]
    if not 0 < dims < counts.shape[1]:
        raise ValueError(f"LSA: dims must lie in [1, {counts.shape[1]}) for this corpus's {counts.shape[1]} n-grams, got {dims}")
    svd = TruncatedSVD(dims, random_state=0).fit(counts)
    return tuple(svd.transform(vec.transform(_token_docs(ds))).astype(np.float32) for ds in (train, val))  # type: ignore[return-value]


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
