"""Text pipeline: reading, bad input, tokenizer training/loading, packing, caching, docstrings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from d2v_train.data import DataError, DocstringsDataModule, TextDataModule
from d2v_train.data.text import split_documents

SAMPLE = """The quick brown fox jumps over the lazy dog.
It was the best of times, it was the worst of times.

Python is a programming language that lets you work quickly.
Readability counts. Simple is better than complex.

Beautiful is better than ugly. Explicit is better than implicit.
"""


def corpus(tmp_path: Path, copies: int = 30) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(SAMPLE * copies)
    (root / "b.txt").write_text("\n\n".join(f"Document number {i} talks about tokens and blocks." for i in range(200)))
    return root


def module(path: Path, tmp_path: Path, **kw) -> TextDataModule:
    kw.setdefault("vocab_size", 400)
    kw.setdefault("max_length", 32)
    kw.setdefault("batch_size", 4)
    dm = TextDataModule(str(path), cache_dir=str(tmp_path / "cache"), **kw)
    dm.setup()
    return dm


def test_split_modes() -> None:
    text = "a b\nc\n\n  \n\nd\n%\ne\n"
    assert split_documents(text, "paragraph") == ["a b\nc", "d\n%\ne"]
    assert split_documents(text, "line") == ["a b", "c", "d", "%", "e"]
    assert split_documents(text, "paragraph", separator="%") == ["a b\nc\n\n  \n\nd", "e"]
    assert split_documents("\n\n \n", "line") == []


def test_trained_tokenizer_roberta_ids_and_packed_blocks(tmp_path: Path) -> None:
    dm = module(corpus(tmp_path), tmp_path)
    assert dm.special_token_ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
    assert dm.vocab_size is not None and dm.vocab_size <= 400
    assert dm.tokenizer_path is not None and dm.tokenizer_path.is_file()
    b = next(iter(dm.train_dataloader()))
    assert b["inputs"].shape == (4, 32) and b["inputs"].dtype == torch.long
    assert (b["inputs"][:, 0] == 0).all()  # <s> first in every block
    assert (b["inputs"] == 2).any()  # documents end in </s>
    assert int(b["inputs"].max()) < dm.vocab_size
    # the last block of the stream is short: padded with <pad>=1 and masked
    last = dm.train_set[len(dm.train_set) - 1]["inputs"]
    batch = dm.collate_fn([dm.train_set[0], {"inputs": last[:5]}])
    assert batch["padding_mask"] is not None and (batch["inputs"][batch["padding_mask"]] == 1).all()


def test_unpacked_documents(tmp_path: Path) -> None:
    dm = module(corpus(tmp_path), tmp_path, packing=False, split_mode="line")
    x = dm.train_set[0]["inputs"]
    assert x[0] == 0 and x[-1] == 2 and len(x) <= 32


def test_bad_files_counted(tmp_path: Path) -> None:
    root = corpus(tmp_path)
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n   \n\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    dm = module(root, tmp_path)
    assert dm.skip_counts() == {"empty": 2, "invalid_utf8": 1}
    # second run comes from the cache, skips included
    dm2 = module(root, tmp_path)
    assert dm2.skip_counts() == {"empty": 2, "invalid_utf8": 1}
    with pytest.raises(DataError, match=r"(empty|blank|latin1)\.txt"):  # also from the cache
        module(root, tmp_path, strict=True)
    only = tmp_path / "only"
    only.mkdir()
    (only / "ok.txt").write_text(SAMPLE)
    (only / "latin1.txt").write_bytes((root / "latin1.txt").read_bytes())
    with pytest.raises(DataError, match=r"latin1\.txt: invalid_utf8: invalid UTF-8 at byte 3"):
        module(only, tmp_path, strict=True)


def test_no_text_at_all(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"no usable files in .*e.*\.txt"):
        module(tmp_path / "e", tmp_path)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"no usable files in .*none.*\.txt"):
        module(tmp_path / "none", tmp_path)


def test_second_run_is_cached(tmp_path: Path) -> None:
    root = corpus(tmp_path)
    module(root, tmp_path)
    start = time.perf_counter()
    dm = module(root, tmp_path)
    assert time.perf_counter() - start < 0.5
    assert len(dm.train_set) > 0
    (root / "a.txt").write_text(SAMPLE)  # a changed file invalidates the cache
    assert len(module(root, tmp_path).train_set) < len(dm.train_set)


def test_local_tokenizer_and_datasets_input(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    first = module(corpus(tmp_path), tmp_path)
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["good text here", "", "more words", None, "x y"] * 4, "label": [0, 1, 0, 1, 1] * 4}),
            "validation": datasets.Dataset.from_dict({"text": ["val text"], "label": [1]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = module(tmp_path / "saved", tmp_path, tokenizer=str(first.tokenizer_path.parent), label_column="label")
    assert dm.vocab_size == first.vocab_size and dm.skip_counts() == {"empty": 8}
    assert len(dm.train_set) == 12 and len(dm.val_set) == 1
    b = next(iter(dm.train_dataloader()))
    assert b["labels"].shape == (4,)


def test_bad_tokenizer_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer"):
        module(corpus(tmp_path), tmp_path, tokenizer=str(tmp_path / "nope.json"))


def test_docstrings_default(tmp_path: Path) -> None:
    dm = DocstringsDataModule(cache_dir=str(tmp_path), max_files=40, vocab_size=1000, max_length=64, batch_size=8)
    dm.setup()
    assert dm.vocab_size == 1000 and dm.special_token_ids["pad"] == 1
    assert len(dm.train_set) > 100 and len(dm.val_set) > 0
    b = next(iter(dm.train_dataloader()))
    assert b["inputs"].shape == (8, 64)
