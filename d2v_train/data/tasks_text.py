"""Labelled text tasks built from Python's own documentation (the ``DocstringsDataModule`` corpus).

Real sentences, labels derived from the text by rules we control, nothing to download:

- ``DocTagsDataModule`` (``data=doc_tags``, token classification): every word is tagged ``KEYWORD``
  (a Python keyword, case-sensitive), ``BUILTIN`` (a name in ``builtins``: ``len``, ``ValueError``),
  ``NUMBER`` or ``O``; the tag goes on a word's first BPE token, its other tokens are -100 (the
  usual sub-word scheme), punctuation is ``O``.
- ``DocQADataModule`` (``data=doc_qa``, extractive QA): a paragraph is the context and a cue in it
  gives the question and the answer span: "What is returned?" -> the clause after "Return(s)",
  "What is raised?" -> the exception named after "raise(s)", "What is the default?" -> the value after
  "default(s) is / to". Labels ``(2,)`` = start and end token of the span in ``<s> q </s></s> ctx </s>``.
- ``DocChoiceDataModule`` (``data=doc_choice``, multiple choice): a sentence, its true next sentence
  and ``num_choices - 1`` next sentences of other documents; inputs ``(choices, L)``, label = index.

All three share the docstrings corpus and its byte-level BPE (the one a ``data=docstrings``
pretraining run trains and caches, so a pretrained encoder's vocabulary fits), and split train /
validation by document exactly as that module does: validation text is unseen by the tokenizer.
Example construction is seeded, so a given seed gives the same examples.
"""

from __future__ import annotations

import builtins
import keyword
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from d2v_train.data.collate import LABEL_PAD, TokenCollator, pad_1d
from d2v_train.data.common import BaseDataModule, DataError, seeded_split
from d2v_train.data.text import split_documents

log = logging.getLogger("d2v_train.data")

__all__ = ["DocChoiceDataModule", "DocQADataModule", "DocTagsDataModule", "TAGS", "QA_CUES", "word_tags", "token_tags"]

TAGS = ("O", "KEYWORD", "BUILTIN", "NUMBER")
_KEYWORDS = frozenset(keyword.kwlist)
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_")) - _KEYWORDS
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

# (question, pattern with an ``a`` group = the answer span)
QA_CUES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("What is returned?", re.compile(r"\bReturns? (?P<a>[A-Za-z`'\"(][^.,;:\n(]{2,60}?)(?=[.,;:\n(]|$)")),
    ("What is raised?", re.compile(r"\b[Rr]aises? (?:an? )?(?P<a>[A-Z]\w*(?:Error|Exception|Warning|Exit|Interrupt|Iteration))\b")),
    ("What is the default?", re.compile(r"\b[Dd]efaults? (?:is|to) (?!(?:a|an|the)\b)(?P<a>[\w'\"`-]+(?:\.\w+)*)")),
)


# ------------------------------------------------------------------------------------------ labels


def word_tags(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, tag id) of every word / number in ``text``."""
    spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    starts = np.fromiter((s for s, _, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((e for _, e, _ in spans), dtype=np.int64, count=len(spans))
    tags = np.fromiter(
        (1 if w in _KEYWORDS else 2 if w in _BUILTINS else 3 if w[0].isdigit() else 0 for _, _, w in spans),
        dtype=np.int64, count=len(spans),
    )  # fmt: skip
    return starts, ends, tags


def token_tags(offsets: np.ndarray, starts: np.ndarray, ends: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """Per-token labels from word tags, vectorised: a token belongs to the word holding its last
    character (byte-level BPE tokens carry their leading space); the first token of a word gets the
    word's tag, later ones -100; tokens outside words (punctuation, spaces) are ``O``."""
    last = offsets[:, 1] - 1
    w = np.searchsorted(starts, last, side="right") - 1
    wc = w.clip(0)
    inside = (w >= 0) & (last < ends[wc] if len(ends) else False) & (offsets[:, 1] > offsets[:, 0])
    first = inside & np.concatenate([[True], w[1:] != w[:-1]])
    return np.where(inside, np.where(first, tags[wc] if len(tags) else 0, LABEL_PAD), 0).astype(np.int64)


def answer_tokens(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """First and last token overlapping the character span ``[start, end)``."""
    return int(np.searchsorted(offsets[:, 1], start, side="right")), int(np.searchsorted(offsets[:, 0], end, side="left") - 1)


# ------------------------------------------------------------------------------------------ datasets


class TokenExamples(Dataset):
    """Token-id examples (``(L,)`` or ``(choices, L)``) with labels (an int or a 1-D array)."""

    def __init__(self, inputs: list[np.ndarray], labels: list[Any]) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        lab = self.labels[index]
        return {
            "inputs": torch.from_numpy(np.asarray(self.inputs[index], dtype=np.int64)),
            "labels": torch.from_numpy(np.asarray(lab, dtype=np.int64)) if isinstance(lab, np.ndarray) else int(lab),
        }


class ChoiceCollator:
    """``(B, choices, L)`` ids padded to the longest row of the batch, ``padding_mask`` alike."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        choices = items[0]["inputs"].shape[0]
        rows = [row for it in items for row in it["inputs"]]
        ids, mask = pad_1d([r[r != -1] for r in rows], self.pad_id)
        if mask is None:
            mask = torch.zeros_like(ids, dtype=torch.bool)
        shape = (len(items), choices, ids.shape[-1])
        return {"inputs": ids.view(shape), "padding_mask": mask.view(shape),
                "labels": torch.tensor([int(it["labels"]) for it in items], dtype=torch.long)}  # fmt: skip


# ------------------------------------------------------------------------------------------ base


class DocTaskDataModule(BaseDataModule):
    """Shared set-up: the docstrings corpus, its tokenizer, a by-document split, then ``examples``.

    Args:
        max_files / cache_dir / tokenizer / vocab_size / min_frequency: as ``data=docstrings``
            (the same values find the same cached corpus and tokenizer).
        max_length: tokens per sequence incl. specials (<= encoder.max_position_embeddings - pad - 1).
        max_train / max_val: cap the examples per split (null: all).
    """

    modality = "text"

    def __init__(
        self,
        *,
        max_files: int | None = None,
        cache_dir: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        min_frequency: int = 2,
        max_length: int = 128,
        max_train: int | None = 4000,
        max_val: int | None = 500,
        val_fraction: float = 0.05,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, strict=strict, seed=seed)  # fmt: skip
        if max_length < 8:
            raise ValueError(f"data.max_length must be at least 8, got {max_length}")
        self.docs_settings = dict(max_files=max_files, cache_dir=cache_dir, tokenizer=tokenizer, vocab_size=vocab_size,
                                  min_frequency=min_frequency, val_fraction=val_fraction, seed=seed)  # fmt: skip
        self.max_length = max_length
        self.max_train, self.max_val = max_train, max_val
        self.val_fraction = val_fraction
        self.vocab_size: int | None = None
        self.special_token_ids: dict[str, int] = {}
        self.tokenizer_path: Path | None = None
        self.classes: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from d2v_train.data.embedded import DOC_SEPARATOR, DocstringsDataModule
        from d2v_train.data.tokenizer import load_tokenizer

        # the docstrings module writes (or finds) the corpus and its tokenizer in the shared cache
        docs_dm = DocstringsDataModule(max_length=self.max_length, **self.docs_settings)  # type: ignore[arg-type]
        docs_dm.setup(stage)
        self.tokenizer_path = docs_dm.tokenizer_path
        self.special_token_ids = dict(docs_dm.special_token_ids)
        self.vocab_size = docs_dm.vocab_size
        tok = load_tokenizer(str(self.tokenizer_path))
        text = Path(docs_dm.path).read_text(encoding="utf-8")
        docs = split_documents(text, "paragraph", DOC_SEPARATOR)
        tr, va = seeded_split(len(docs), self.val_fraction, self.seed)  # as DocstringsDataModule splits
        rng = random.Random(self.seed)
        train = self.examples([docs[i] for i in tr], tok, rng, self.max_train)
        val = self.examples([docs[i] for i in va], tok, rng, self.max_val)
        if not train[0] or not val[0]:
            raise DataError(f"{type(self).__name__}: no examples in the {'train' if not train[0] else 'validation'} "
                            "documents (use more of the corpus: data.max_files=null)")  # fmt: skip
        self.train_set, self.val_set = TokenExamples(*train), TokenExamples(*val)
        log.info("%s: %d train / %d val examples", type(self).__name__, len(self.train_set), len(self.val_set))

    def examples(self, docs: list[str], tok: Any, rng: random.Random, limit: int | None) -> tuple[list[np.ndarray], list[Any]]:
        raise NotImplementedError

    @staticmethod
    def paragraphs(docs: list[str]) -> list[tuple[int, str]]:
        """(document index, paragraph) pairs: contexts short enough to fit a sequence."""
        return [(d, p) for d, doc in enumerate(docs) for p in split_documents(doc, "paragraph")]

    @staticmethod
    def _cap(items: list[Any], rng: random.Random, limit: int | None) -> list[Any]:
        return items if limit is None or len(items) <= limit else rng.sample(items, limit)

    @property
    def collate_fn(self) -> Any:  # type: ignore[override]
        return TokenCollator(self.special_token_ids["pad"])


# ------------------------------------------------------------------------------------------ tasks


class DocTagsDataModule(DocTaskDataModule):
    """Token classification: Python keyword / builtin name / number / other, per word (see module doc)."""

    def examples(self, docs: list[str], tok: Any, rng: random.Random, limit: int | None) -> tuple[list[np.ndarray], list[Any]]:
        self.classes = list(TAGS)
        paras = [p for _, p in self._cap(self.paragraphs(docs), rng, limit)]
        bos, eos = self.special_token_ids["bos"], self.special_token_ids["eos"]
        body = self.max_length - 2
        inputs, labels = [], []
        for text, enc in zip(paras, tok.encode_batch(paras, add_special_tokens=False)):
            if len(enc.ids) < 4:
                continue
            offsets = np.asarray(enc.offsets, dtype=np.int64)[:body]
            tags = token_tags(offsets, *word_tags(text))
            inputs.append(np.concatenate([[bos], enc.ids[:body], [eos]]))
            labels.append(np.concatenate([[LABEL_PAD], tags, [LABEL_PAD]]))
        return inputs, labels


class DocQADataModule(DocTaskDataModule):
    """Extractive QA from cues in the documentation (see module doc); labels ``(start, end)``."""

    def examples(self, docs: list[str], tok: Any, rng: random.Random, limit: int | None) -> tuple[list[np.ndarray], list[Any]]:
        found: list[tuple[int, str, int, int]] = []  # (question index, context, answer start, end)
        for _, para in self.paragraphs(docs):
            for q, (_, pattern) in enumerate(QA_CUES):
                m = pattern.search(para)
                if m:
                    found.append((q, para, m.start("a"), m.end("a")))
        found = self._cap(found, rng, limit)
        bos, eos = self.special_token_ids["bos"], self.special_token_ids["eos"]
        questions = [tok.encode(q, add_special_tokens=False).ids for q, _ in QA_CUES]
        inputs, labels = [], []
        for (q, _, a0, a1), enc in zip(found, tok.encode_batch([f[1] for f in found], add_special_tokens=False)):
            prefix = [bos, *questions[q], eos, eos]
            body = self.max_length - len(prefix) - 1
            offsets = np.asarray(enc.offsets, dtype=np.int64)
            s, e = answer_tokens(offsets, a0, a1)
            if e >= body or e < s:  # the answer was cut off by truncation
                continue
            inputs.append(np.asarray([*prefix, *enc.ids[:body], eos]))
            labels.append(np.asarray([s + len(prefix), e + len(prefix)]))
        return inputs, labels


class DocChoiceDataModule(DocTaskDataModule):
    """Multiple choice: which sentence really comes next (see module doc)."""

    def __init__(self, *, num_choices: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_choices < 2:
            raise ValueError(f"data.num_choices must be at least 2, got {num_choices}")
        self.num_choices = num_choices

    def examples(self, docs: list[str], tok: Any, rng: random.Random, limit: int | None) -> tuple[list[np.ndarray], list[Any]]:
        pairs: list[tuple[int, str, str]] = []  # (document, sentence, next sentence)
        for d, para in self.paragraphs(docs):
            sents = [" ".join(s.split()) for s in _SENTENCE_END.split(para)]
            pairs += [(d, a, b) for a, b in zip(sents, sents[1:]) if 3 <= len(a.split()) <= 40 and 3 <= len(b.split()) <= 40]
        if len({d for d, _, _ in pairs}) < 2:
            return [], []
        pairs = self._cap(pairs, rng, limit)
        bos, eos = self.special_token_ids["bos"], self.special_token_ids["eos"]
        sent_ids = {}
        texts = sorted({s for _, a, b in pairs for s in (a, b)})
        for s, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
            sent_ids[s] = enc.ids
        half = (self.max_length - 4) // 2
        inputs, labels = [], []
        for d, first, true_next in pairs:
            others: list[str] = []
            while len(others) < self.num_choices - 1:  # next sentences of other documents
                od, _, cand = pairs[rng.randrange(len(pairs))]
                if od != d and cand != true_next and cand not in others:
                    others.append(cand)
            answer = rng.randrange(self.num_choices)
            cands = others[:answer] + [true_next] + others[answer:]
            ctx = sent_ids[first][-half:]
            rows = [[bos, *ctx, eos, eos, *sent_ids[c][: self.max_length - 4 - len(ctx)], eos] for c in cands]
            width = max(len(r) for r in rows)
            inputs.append(np.asarray([r + [-1] * (width - len(r)) for r in rows]))  # -1: dropped by the collator
            labels.append(answer)
        return inputs, labels

    @property
    def collate_fn(self) -> Any:  # type: ignore[override]
        return ChoiceCollator(self.special_token_ids["pad"])
