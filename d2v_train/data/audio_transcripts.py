"""Transcripts for CTC fine-tuning: fairseq side files (`train.wrd` / `train.ltr`) or a `.txt`
beside each audio file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from d2v_train.data.audio_sources import AudioItem
from d2v_train.data.common import DataError

__all__ = ["attach_side_transcripts", "attach_txt_transcripts"]


def attach_side_transcripts(items: list[AudioItem], manifest: Path, ext: str) -> list[AudioItem]:
    """fairseq side file (`train.wrd` / `train.ltr` next to `train.tsv`), one line per manifest line."""
    side = manifest.with_suffix("." + ext.lstrip("."))
    if not side.is_file():
        raise DataError(f"labels=transcript but {side} does not exist (one transcript per manifest line)")
    lines = side.read_text(encoding="utf-8").splitlines()
    if len(lines) != len(items):
        raise DataError(f"{side} has {len(lines)} lines but {manifest} lists {len(items)} files")
    return [replace(it, transcript=t.strip()) for it, t in zip(items, lines)]


def attach_txt_transcripts(items: list[AudioItem]) -> list[AudioItem]:
    """`.txt` beside each audio file (same stem)."""
    out = []
    for it in items:
        txt = Path(it.path).with_suffix(".txt") if it.path else None
        text = txt.read_text(encoding="utf-8", errors="strict").strip() if txt and txt.is_file() else None
        out.append(replace(it, transcript=text))
    return out
