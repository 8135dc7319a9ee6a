"""Labelled probe tasks for the embedded text and speech corpora (``ProbeSets``, see ``common.py``).

A self-supervised run is judged by how well a frozen encoder's features separate labels it never
saw. The embedded corpora carry no labels in their pretraining stream, so these tasks are built
beside them:

- text (``docstring_module_task``): which standard-library module or package a docstring belongs
  to (``asyncio``, ``email``, ``tkinter``, ...). The module's own name (and dotted names under it)
  is removed from every docstring, so a probe cannot score by spotting the name: it has to know
  what the text is about. Classes are the public top-level modules with the most docstrings in this
  Python, each capped to the same number of docstrings (balanced, so chance is ``1 / classes``).
  Duplicate texts are dropped, so no docstring is in both splits.
- speech (``spoken_word_probe``): which word an espeak-ng voice says, where the probe's validation
  voices (accents) never appear among its training voices: features that encode the voice rather
  than the word do not transfer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2v_train.data.common import DataError

__all__ = ["DocstringTask", "docstring_module_task", "strip_module_name", "spoken_word_clips"]

# modules whose docstrings are generated boilerplate (codec tables), not prose about the module
EXCLUDED_MODULES = frozenset({"encodings"})


def strip_module_name(text: str, module: str) -> str:
    """``text`` without ``module`` (any case, also as ``module.sub.name`` or ``_module``), spaces tidied."""
    pattern = re.compile(rf"(?<![\w.])_?{re.escape(module)}(?:\.\w+)*(?!\w)", re.IGNORECASE)
    return re.sub(r"[ \t]{2,}", " ", pattern.sub("", text)).strip()


class DocstringTask:
    """Docstrings (module name removed) with their module's class index, split per class."""

    def __init__(self, classes: list[str], train: list[tuple[str, int]], val: list[tuple[str, int]]) -> None:
        self.classes, self.train, self.val = classes, train, val


def docstring_module_task(
    pairs: Sequence[tuple[str, str]],
    *,
    num_classes: int = 20,
    per_class: int = 60,
    min_chars: int = 40,
    val_fraction: float = 0.3,
    seed: int = 0,
) -> DocstringTask:
    """The module-of-a-docstring task from ``(module, docstring)`` pairs.

    Args:
        pairs: from ``embedded.stdlib_docstrings``.
        num_classes: the public top-level modules with the most usable docstrings.
        per_class: docstrings kept per class (seeded sample), so classes are balanced.
        min_chars: shorter docstrings (after the name is removed) say too little to classify.
        val_fraction: share of each class held out for the probe's validation.
    """
    by_module: dict[str, list[str]] = {}
    owners: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for module, doc in pairs:
        if module.startswith("_") or module in EXCLUDED_MODULES:
            continue
        text = strip_module_name(doc, module)
        if len(text) < min_chars:
            continue
        if text in seen:  # the same text twice (even in two modules) would leak across the split
            owners[text] += 1
            continue
        seen[text] = module
        by_module.setdefault(module, []).append(text)
    by_module = {m: [t for t in texts if not owners[t]] for m, texts in by_module.items()}
    eligible = sorted((m for m, texts in by_module.items() if len(texts) >= per_class), key=lambda m: (-len(by_module[m]), m))
    if len(eligible) < num_classes:
        raise DataError(
            f"the docstring probe needs {num_classes} modules with >= {per_class} docstrings each; this "
            f"Python has {len(eligible)} (lower data.probe_classes or data.probe_per_class)"
        )
    classes = sorted(eligible[:num_classes])
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    n_val = max(1, round(per_class * val_fraction))
    for label, module in enumerate(classes):
        chosen = rng.sample(by_module[module], per_class)
        val += [(t, label) for t in chosen[:n_val]]
        train += [(t, label) for t in chosen[n_val:]]
    return DocstringTask(classes, train, val)


def encode_examples(texts: Sequence[str], tok: Any, bos: int, eos: int, max_length: int) -> list[np.ndarray]:
    """``<s> ids </s>``, the body cut to fit ``max_length`` tokens."""
    body = max_length - 2
    return [np.asarray([bos, *e.ids[:body], eos], dtype=np.int64) for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def spoken_word_clips(clips: Sequence[tuple[int, str, Path]], sample_rate: int, normalize: bool) -> tuple[list[Any], list[int]]:
    """Decode ``(word index, voice, wav path)`` rows into waveforms trimmed to their speech (and
    normalised per utterance when ``normalize``); returns (waveforms, word labels) in row order."""
    from d2v_train.data.audio_io import decode_audio, normalize_waveform
    from d2v_train.data.tasks_audio import trim_silence

    waves, labels = [], []
    for word, _, path in clips:
        wav = trim_silence(decode_audio(str(path), sample_rate))
        waves.append(normalize_waveform(wav) if normalize else wav)
        labels.append(word)
    return waves, labels
