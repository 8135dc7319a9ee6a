"""Everything beside the weights that makes an export a complete Hub model, and the upload.

``write_hub_files`` adds, to a directory holding ``config.json`` + ``model.safetensors``:
``preprocessor_config.json`` (vision / audio), the tokenizer files (text; CTC), and a
``README.md`` model card, all derived from the run's records (``RunRecord``). Files a transformers
source directory already had (its own preprocessor or tokenizer) are carried over unchanged.
``push_to_hub`` uploads the directory with ``huggingface_hub``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from .files import atomic_write, load_json, save_json
from .hub_tokenizers import TOKENIZER_CONFIG, TOKENIZER_FILE, VOCAB_FILE, write_ctc_tokenizer, write_text_tokenizer
from .model_card import model_card
from .preprocessing import PREPROCESSOR_FILE, preprocessor_config
from .run_record import RunRecord


CARD_FILE = "README.md"
# what a transformers directory may carry besides its weights, kept when it is re-exported
CARRIED = (PREPROCESSOR_FILE, "processor_config.json", TOKENIZER_FILE, TOKENIZER_CONFIG, "special_tokens_map.json",
           "vocab.json", "merges.txt", "added_tokens.json")


def _carry(source: Optional[Path], directory: Path) -> list[Path]:
    """Copies a transformers source directory's own preprocessing / tokenizer files."""
    if source is None or not source.is_dir() or source.resolve() == directory.resolve():
        return []
    copied = []
    for name in CARRIED:
        if (source / name).is_file():
            data = (source / name).read_bytes()
            atomic_write(directory / name, lambda tmp, data=data: tmp.write_bytes(data))
            copied.append(directory / name)
    return copied


def _carried_vocab(path: Optional[Path]) -> Optional[list[str]]:
    """Symbols of a carried ``vocab.json`` (``{symbol: id}``) in id order, when the ids are 0..n-1."""
    if path is None:
        return None
    vocab = load_json(path)
    ids = sorted(vocab.values()) if all(isinstance(v, int) for v in vocab.values()) else []
    if ids != list(range(len(vocab))):
        return None
    return [s for s, _ in sorted(vocab.items(), key=lambda item: item[1])]


def write_hub_files(
    model: nn.Module,
    architecture: str,
    directory: Path,
    record: RunRecord,
    *,
    tokenizer: Optional[Path] = None,
    ctc_vocab: Optional[Sequence[str]] = None,
    notes: Sequence[str] = (),
) -> list[Path]:
    """Writes the preprocessing, tokenizer and model-card files for ``model`` (our encoder or head
    model, already saved as ``architecture`` in ``directory``); returns the files written."""
    directory = Path(directory)
    encoder = getattr(model, "encoder", model)
    modality = encoder.modality
    notes = list(notes)
    files = _carry(record.source if record.kind.startswith("transformers") else None, directory)
    have = {f.name for f in files}
    preprocessing: Optional[str] = None
    if PREPROCESSOR_FILE in have:
        preprocessing = "carried over from the source model"
    else:
        made = preprocessor_config(encoder, record)
        if made is not None:
            settings, preprocessing = made
            if architecture == "Data2VecAudioForCTC":
                settings["processor_class"] = "Wav2Vec2Processor"
            save_json(settings, directory / PREPROCESSOR_FILE)
            files.append(directory / PREPROCESSOR_FILE)
    if modality == "text" and TOKENIZER_CONFIG not in have:
        if tokenizer is not None:
            files += write_text_tokenizer(tokenizer, directory, encoder.config)
        else:
            notes.append("No tokenizer was found with the source, so none is included: encode text with the "
                         "tokenizer the encoder was trained with.")
    if architecture == "Data2VecAudioForCTC" and TOKENIZER_CONFIG not in have:
        ctc_vocab = ctc_vocab or _carried_vocab(directory / VOCAB_FILE if VOCAB_FILE in have else None)
        if ctc_vocab:
            blank = int(getattr(model, "settings", {}).get("pad_token_id", 0))
            files += write_ctc_tokenizer(ctc_vocab, blank, directory)
        else:
            notes.append("No CTC vocabulary was found with the source, so no tokenizer is included.")
    labels = (getattr(model, "settings", {}) or {}).get("id2label")
    card = model_card(model, architecture, record, preprocessing, notes, labels if getattr(model, "with_labels", False) else None)
    atomic_write(directory / CARD_FILE, lambda tmp: tmp.write_text(card, encoding="utf-8"))
    files.append(directory / CARD_FILE)
    return files


def push_to_hub(directory: Path, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                message: str = "Upload data2vec model exported by d2v_train") -> Any:
    """Creates ``repo_id`` on the Hub (if needed) and uploads ``directory``; returns the commit info.

    Credentials are huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``) unless ``token`` is given.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise RuntimeError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    if not repo_id or not repo_id.strip() or repo_id.count("/") > 1:
        raise ValueError(f"push_to_hub={repo_id!r}: expected a repository id such as 'user/model-name'")
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model", commit_message=message)

