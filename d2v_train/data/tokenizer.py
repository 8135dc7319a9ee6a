"""Tokenizers for text pretraining: load a local one, or train a byte-level BPE on the training text.

Special tokens follow RoBERTa: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4 for trained
tokenizers (a fixed `<mask>` id), matching the text encoder's `pad_token_id=1` with positions starting
at pad+1. Loaded tokenizers keep their own ids; `special_token_ids` reports them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from d2v_train.data.common import DataError
from d2v_train.interop.files import atomic_write

log = logging.getLogger("d2v_train.data")

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# role -> accepted spellings (RoBERTa/GPT-2 first, then BERT)
ROLE_NAMES = {
    "bos": ("<s>", "[CLS]"),
    "pad": ("<pad>", "[PAD]"),
    "eos": ("</s>", "[SEP]"),
    "unk": ("<unk>", "[UNK]"),
    "mask": ("<mask>", "[MASK]"),
}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json`, a folder holding one, or a GPT-2/RoBERTa folder (vocab.json + merges.txt)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if p.is_file():
        try:
            return Tokenizer.from_file(str(p))
        except Exception as e:
            raise DataError(f"cannot load tokenizer {p}: {e}") from None
    if p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    raise DataError(f"data.tokenizer={path}: expected tokenizer.json, or a folder with tokenizer.json or vocab.json + merges.txt")


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """{"pad", "bos", "eos", "mask", "unk"} -> id; an error names any role the tokenizer lacks."""
    ids: dict[str, int] = {}
    for role, names in ROLE_NAMES.items():
        found = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
        if found is None:
            raise DataError(f"tokenizer has no {role} token (looked for {', '.join(names)})")
        ids[role] = int(found)
    return ids


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path, min_frequency: int = 2, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE (the RoBERTa/GPT-2 scheme) and save it to `out` (tokenizer.json)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    start = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    # atomic, through a temporary file of its own: a crash never leaves a half-written tokenizer in
    # the cache, and runs of a sweep that train the same one at once do not take each other's file
    atomic_write(Path(out), lambda tmp: tok.save(str(tmp)))
    log.info("trained byte-level BPE (vocab %d) in %.1fs -> %s", tok.get_vocab_size(), time.perf_counter() - start, out)
    return tok
