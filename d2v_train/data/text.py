"""Text pretraining data: plain text files or a local `datasets` text column -> token blocks.

Documents are blank-line-separated blocks (`split_mode=paragraph`), single lines (`line`), whole files
(`file`), or items between separator lines (`separator: "%"` for fortune files). With `packing=true`
(pretraining, the RoBERTa recipe) every document ends in `</s>`, the token stream is cut into blocks
of `max_length - 1` and each block gets `<s>` in front; with `packing=false` (or a `label_column`,
for fine-tuning) each document is one sequence `<s> ... </s>`, truncated to `max_length`.

The tokenized splits are cached with `datasets` (`save_to_disk`, memory-mapped Arrow) under a key of
the source files' size/mtime, the tokenizer and the settings, so a second run starts instantly.
"""

from __future__ import annotations

import json
import os
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from d2v_train.data import hf
from d2v_train.data.collate import TokenCollator
from d2v_train.data.common import (
    BaseDataModule,
    DataError,
    default_cache_dir,
    file_signature,
    fingerprint,
    no_usable_files,
    progress,
    seeded_split,
)
from d2v_train.data.tokenizer import load_tokenizer, special_token_ids, train_bpe

log = logging.getLogger("d2v_train.data")

TEXT_EXTENSIONS = (".txt",)
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
ENCODE_CHUNK = 2000


def split_documents(text: str, mode: str, separator: str | None = None) -> list[str]:
    """Cut one file's text into documents; empty documents never survive."""
    if separator is not None:
        parts = re.split(rf"(?m)^{re.escape(separator)}[ \t]*$", text)
    elif mode == "paragraph":
        parts = _BLANK_LINES.split(text)
    elif mode == "line":
        parts = text.splitlines()
    elif mode == "file":
        parts = [text]
    else:
        raise ValueError(f"data.split_mode must be paragraph, line or file, got {mode!r}")
    return [p.strip() for p in parts if p.strip()]


def decode_utf8(raw: bytes) -> str:
    """Strict UTF-8 (a leading BOM is dropped); raises UnicodeDecodeError with the byte offset."""
    return raw.decode("utf-8-sig")


class TokenBlocks(Dataset):
    """Token sequences (and optional labels) stored in a memory-mapped `datasets` table."""

    def __init__(self, table: Any) -> None:
        self.table = None if table is None else table.with_format("numpy")  # None: an empty split
        self.has_labels = table is not None and "labels" in table.column_names

    def __len__(self) -> int:
        return 0 if self.table is None else len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[int(index)]
        item: dict[str, Any] = {"inputs": torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64))}
        if self.has_labels:
            item["labels"] = int(row["labels"])
        return item


class TextDataModule(BaseDataModule):
    """Token-id batches `(B, L)` with `padding_mask` (True = `<pad>`); exposes `vocab_size`,
    `special_token_ids` and `tokenizer_path` after `setup()`."""

    modality = "text"

    def __init__(
        self,
        path: str,
        *,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        extensions: tuple[str, ...] | list[str] = TEXT_EXTENSIONS,
        train_split: str = "train",
        text_column: str = "text",
        label_column: str | None = None,
        split_mode: str = "paragraph",
        separator: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        min_frequency: int = 2,
        max_length: int = 512,
        packing: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            strict=strict,
            seed=seed,
        )
        if max_length < 3:
            raise ValueError(f"data.max_length must be at least 3 (<s> x </s>), got {max_length}")
        self.path = path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.extensions = tuple(e.lower() for e in extensions)
        self.train_split = train_split
        self.text_column = text_column
        self.label_column = label_column
        self.split_mode = split_mode
        self.separator = separator
        self.tokenizer_spec = tokenizer
        self.vocab_size_target = vocab_size
        self.min_frequency = min_frequency
        self.max_length = max_length
        self.packing = packing and label_column is None
        self.cache_dir = cache_dir
        self.vocab_size: int | None = None
        self.special_token_ids: dict[str, int] = {}
        self.tokenizer_path: Path | None = None
        self.classes: list[str] | None = None
        self._scan_skips: dict[str, int] = {}

    # -- reading ---------------------------------------------------------------------------------

    def _files(self, location: str) -> list[Path]:
        path = Path(location).expanduser()
        if not path.exists():
            raise DataError(f"data.path {path} does not exist")
        if path.is_file():
            return [path]
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in self.extensions and p.is_file())
        if not files:
            raise no_usable_files(path, [f"*{e} (recursive)" for e in self.extensions], {})
        return files

    def _read_files(self, files: list[Path]) -> list[str]:
        docs: list[str] = []
        for f in progress(files, desc="reading text", total=len(files)):
            try:
                text = decode_utf8(f.read_bytes())
            except UnicodeDecodeError as e:
                self.skips.skip(str(f), "invalid_utf8", f"invalid UTF-8 at byte {e.start} ({e.reason})")
                continue
            except OSError as e:
                self.skips.skip(str(f), "unreadable", str(e))
                continue
            found = split_documents(text, self.split_mode, self.separator)
            if not found:
                self.skips.skip(str(f), "empty", "no text (empty or whitespace only)")
            docs.extend(found)
        return docs

    def _read_table(self, table: Any, where: Path) -> tuple[list[str], list[Any] | None]:
        hf.require_column(table, self.text_column, where, "text")
        texts = table[self.text_column]
        labels = None
        if self.label_column:
            hf.require_column(table, self.label_column, where, "label")
            labels = list(table[self.label_column])
            feature = table.features[self.label_column]
            if hasattr(feature, "names") and self.classes is None:
                self.classes = list(feature.names)
        docs, keep = [], []
        for i, t in enumerate(texts):
            if isinstance(t, str) and t.strip():
                docs.append(t.strip())
                keep.append(i)
            else:
                self.skips.skip(f"{where}[{i}]", "empty", "empty or missing text")
        return docs, ([labels[i] for i in keep] if labels is not None else None)

    def _sources(self) -> tuple[Any, Any, Any]:
        """(train reader, val reader or None, cache signature); readers return (docs, labels)."""
        path = Path(self.path).expanduser()
        if hf.is_hf_input(path):
            train, val = hf.load_local(path, self.train_split)
            sig: Any = [train._fingerprint, None if val is None else val._fingerprint]
            train_read = lambda: self._read_table(train, path)  # noqa: E731
            val_read = None if val is None else (lambda: self._read_table(val, path))
        else:
            files = self._files(self.path)
            sig = file_signature(files)
            train_read = lambda: (self._read_files(files), None)  # noqa: E731
            val_read = None
        if self.val_path:
            vfiles = self._files(self.val_path)
            sig = [sig, file_signature(vfiles)]
            val_read = lambda: (self._read_files(vfiles), None)  # noqa: E731
        return train_read, val_read, sig

    # -- setup -----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_read, val_read, source_sig = self._sources()
        settings = [self.split_mode, self.separator, self.text_column, self.label_column]
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir("text")
        cache = cache / fingerprint(source_sig, settings)
        docs: dict[str, Any] = {}

        def read() -> dict[str, Any]:
            if not docs:
                docs.update(self._read_split(train_read, val_read))
            return docs

        tok = self._tokenizer(cache, read)
        key = fingerprint(self.tokenizer_path.read_bytes().hex() if self.tokenizer_path else "",  # type: ignore[union-attr]
                          self.max_length, self.packing, self.val_fraction, self.seed)
        out = cache / f"tokens-{key}"
        if not (out / "meta.json").is_file():
            self._tokenize_and_save(tok, read(), out)
        self._load_cached(out)

    def _read_split(self, train_read: Any, val_read: Any) -> dict[str, Any]:
        train_docs, train_labels = train_read()
        if not train_docs:
            raise no_usable_files(self.path, [f"*{e}" for e in self.extensions] + [f"column {self.text_column!r}"], self.skips.counts())
        if val_read is not None:
            val_docs, val_labels = val_read()
        else:
            tr, va = seeded_split(len(train_docs), self.val_fraction, self.seed)
            val_docs = [train_docs[i] for i in va]
            val_labels = [train_labels[i] for i in va] if train_labels is not None else None
            train_docs = [train_docs[i] for i in tr]
            train_labels = [train_labels[i] for i in tr] if train_labels is not None else None
        return {"train": (train_docs, train_labels), "val": (val_docs, val_labels)}

    def _tokenizer(self, cache: Path, read: Any) -> Any:
        if self.tokenizer_spec:
            tok = load_tokenizer(self.tokenizer_spec)
            spec = Path(self.tokenizer_spec).expanduser()
            self.tokenizer_path = spec / "tokenizer.json" if (spec / "tokenizer.json").is_file() else spec
        else:
            self.tokenizer_path = cache / f"tokenizer-bpe{self.vocab_size_target}-f{self.min_frequency}" / "tokenizer.json"
            if self.tokenizer_path.is_file():
                tok = load_tokenizer(self.tokenizer_path)
            else:
                train_docs = read()["train"][0]
                tok = train_bpe(iter(train_docs), self.vocab_size_target, self.tokenizer_path, self.min_frequency, len(train_docs))
        self.special_token_ids = special_token_ids(tok)
        self.vocab_size = tok.get_vocab_size()
        return tok

    def _encode(self, tok: Any, docs: list[str], desc: str) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        chunks = range(0, len(docs), ENCODE_CHUNK)
        for start in progress(chunks, desc=desc, total=len(chunks)):
            enc = tok.encode_batch(docs[start : start + ENCODE_CHUNK], add_special_tokens=False)
            out.extend(np.asarray(e.ids, dtype=np.int32) for e in enc)
        return out

    def _sequences(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        bos, eos = self.special_token_ids["bos"], self.special_token_ids["eos"]
        if not self.packing:
            body = self.max_length - 2
            return [np.concatenate([[bos], x[:body], [eos]]).astype(np.int32) for x in ids]
        stream = np.concatenate([np.append(x, eos) for x in ids]).astype(np.int32) if ids else np.zeros(0, np.int32)
        step = self.max_length - 1
        return [np.insert(stream[i : i + step], 0, bos) for i in range(0, len(stream), step)]

    def _tokenize_and_save(self, tok: Any, docs: dict[str, Any], out: Path) -> None:
        import datasets

        start = time.perf_counter()
        # a temporary folder of this process's own: two runs tokenizing the same text at once (a
        # sweep) must not write into, or delete, each other's half-built folder
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        quiet = not datasets.utils.are_progress_bars_disabled()
        if quiet:  # our own bars cover the slow part; saving is fast
            datasets.utils.disable_progress_bars()
        try:
            for split, (texts, labels) in docs.items():
                seqs = self._sequences(self._encode(tok, texts, f"tokenizing {split}"))
                columns: dict[str, Any] = {"input_ids": seqs}
                if labels is not None:
                    columns["labels"] = self._label_ids(labels)
                datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / split))
        finally:
            if quiet:
                datasets.utils.enable_progress_bars()
        meta = {"skips": self.skips.counts(), "skipped": self.skips.events[:1000], "classes": self.classes, "vocab_size": self.vocab_size}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if (out / "meta.json").is_file():  # another process finished the same folder first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
        log.info("tokenized text in %.1fs -> %s", time.perf_counter() - start, out)

    def _label_ids(self, labels: list[Any]) -> list[int]:
        if self.classes is None:
            self.classes = sorted({str(v) for v in labels})
        if all(isinstance(v, (int, np.integer)) for v in labels):
            return [int(v) for v in labels]
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[str(v)] for v in labels]

    def _load_cached(self, out: Path) -> None:
        import datasets

        meta = json.loads((out / "meta.json").read_text())
        if self.strict and meta["skipped"]:
            name, reason, detail = meta["skipped"][0]
            raise DataError(f"{name}: {reason}: {detail} (data.strict=true turns skips into errors)")
        self._scan_skips = meta["skips"] if not self.skips.counts() else {}
        self.classes = meta["classes"]
        def split(name: str) -> TokenBlocks:
            state = json.loads((out / name / "state.json").read_text())
            if not state.get("_data_files"):  # a 0-row split: `datasets` cannot reload it
                return TokenBlocks(None)
            return TokenBlocks(datasets.load_from_disk(str(out / name)))

        self.train_set = split("train")
        self.val_set = split("val")
        log.info("text: %d train / %d val sequences of <= %d tokens (%s)", len(self.train_set), len(self.val_set), self.max_length, out)

    # -- loaders ---------------------------------------------------------------------------------

    def skip_counts(self) -> dict[str, int]:
        counts = dict(self._scan_skips)  # restored from the cache when this run read nothing
        for reason, n in super().skip_counts().items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    @property
    def collate_fn(self) -> TokenCollator:  # type: ignore[override]
        return TokenCollator(self.special_token_ids["pad"])
