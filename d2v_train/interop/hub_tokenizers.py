"""Tokenizer files of an export, so ``AutoTokenizer`` / ``AutoProcessor`` and the pipelines encode
and decode as the run did.

Text: the run's ``tokenizer.json`` (byte-level BPE) with a RoBERTa post-processor when it has none
(``<s> A </s>`` and ``<s> A </s></s> B </s>``, the layout our data modules build), plus a
``tokenizer_config.json`` naming the special tokens and ``model_max_length``: the positions the
encoder has (``max_position_embeddings - pad_token_id - 1``: RoBERTa-style positions start after
the padding id, so 512 positions hold 510 tokens), so ``truncation=True`` cuts long inputs instead
of running past the position table.

CTC: ``vocab.json`` (the model's output symbols, id-aligned with its logits) and a
``Wav2Vec2CTCTokenizer`` configuration whose pad token is the CTC blank (decoding drops it), whose
word delimiter is ``|`` (decoded as a space), with no ``<s>`` / ``</s>`` (the model has none: they
would be appended past the vocabulary). The unknown token is ``<unk>`` when the vocabulary has
one, else the blank itself: an unknown character then encodes to the padding id, which CTC
collators drop, as our ``CharVocab.encode`` drops it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .files import atomic_write, save_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
VOCAB_FILE = "vocab.json"
WORD_DELIMITER = "|"
_ROLE_KEYS = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token", "mask": "mask_token"}


def text_max_length(encoder_config: Any) -> int:
    """Tokens the text encoder takes: its positions minus those before the first real position."""
    return int(encoder_config.max_position_embeddings) - int(encoder_config.pad_token_id) - 1


def write_text_tokenizer(source: Path, directory: Path, encoder_config: Any) -> list[Path]:
    """``tokenizer.json`` (with a RoBERTa post-processor), ``tokenizer_config.json`` and
    ``special_tokens_map.json`` for the text model in ``directory``."""
    from tokenizers import Tokenizer, processors

    from ..data.tokenizer import ROLE_NAMES

    tokenizer = Tokenizer.from_file(str(source))
    names: dict[str, str] = {}
    for role, spellings in ROLE_NAMES.items():  # RoBERTa spellings first, then BERT's
        found = next((n for n in spellings if tokenizer.token_to_id(n) is not None), None)
        if found is not None:
            names[role] = found
    if tokenizer.post_processor is None and "bos" in names and "eos" in names:
        tokenizer.post_processor = processors.RobertaProcessing(
            (names["eos"], tokenizer.token_to_id(names["eos"])), (names["bos"], tokenizer.token_to_id(names["bos"])),
            trim_offsets=True, add_prefix_space=False,
        )
    text = tokenizer.to_str(pretty=True)
    atomic_write(directory / TOKENIZER_FILE, lambda tmp: tmp.write_text(text))
    special = {_ROLE_KEYS[role]: name for role, name in names.items()}
    if "bos" in names and "eos" in names:
        special.update(cls_token=names["bos"], sep_token=names["eos"])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": text_max_length(encoder_config),
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    save_json(config, directory / TOKENIZER_CONFIG)
    save_json(special, directory / SPECIAL_TOKENS_MAP)
    return [directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG, directory / SPECIAL_TOKENS_MAP]


def ctc_special_tokens(symbols: Sequence[str], blank: int) -> dict[str, Optional[str]]:
    """Special tokens of a CTC vocabulary: pad = the blank, unk = ``<unk>`` or the blank, no bos/eos."""
    if not 0 <= blank < len(symbols):
        raise ValueError(f"CTC blank id {blank} is outside the {len(symbols)}-symbol vocabulary")
    pad = symbols[blank]
    return {
        "pad_token": pad,
        "unk_token": "<unk>" if "<unk>" in symbols else pad,
        "bos_token": None,
        "eos_token": None,
        "word_delimiter_token": WORD_DELIMITER,
    }


def write_ctc_tokenizer(symbols: Sequence[str], blank: int, directory: Path) -> list[Path]:
    """``vocab.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of a
    ``Wav2Vec2CTCTokenizer`` for a CTC model whose logits follow ``symbols``."""
    symbols = [str(s) for s in symbols]
    if len(set(symbols)) != len(symbols):
        raise ValueError("the CTC vocabulary has repeated symbols; vocab.json needs one id per symbol")
    special = ctc_special_tokens(symbols, blank)
    vocab = {s: i for i, s in enumerate(symbols)}
    text = json.dumps(vocab, indent=1, ensure_ascii=False) + "\n"
    atomic_write(directory / VOCAB_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    config = {
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "processor_class": "Wav2Vec2Processor",
        **special,
        "do_lower_case": False,
        "replace_word_delimiter_char": " ",
        "clean_up_tokenization_spaces": False,
    }
    save_json(config, directory / TOKENIZER_CONFIG)
    save_json({k: v for k, v in special.items() if v is not None and k != "word_delimiter_token"},
              directory / SPECIAL_TOKENS_MAP)
    return [directory / VOCAB_FILE, directory / TOKENIZER_CONFIG, directory / SPECIAL_TOKENS_MAP]
