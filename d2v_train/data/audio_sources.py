"""Where audio utterances come from: folders of files, fairseq manifests, rows of a `datasets` table.

Each source becomes a list of ``AudioItem`` (name, path or row, length, optional label); missing files
listed in a manifest are counted skips, not errors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2v_train.data.audio_io import AudioSource
from d2v_train.data.common import DataError, SkipItem, SkipTracker, progress

__all__ = ["AUDIO_EXTENSIONS", "AudioItem", "hf_source", "read_manifest", "scan_folder"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


@dataclass(frozen=True)
class AudioItem:
    """One utterance: where it is, its length at the target rate, and its optional targets."""

    name: str  # shown in skip messages
    path: str | None = None  # file on disk, or
    row: int | None = None  # row of the `datasets` table
    num_samples: int = 0  # at the target sample rate
    label: str | None = None  # class name (folder / column)
    transcript: str | None = None


def scan_folder(folder: Path, extensions: Sequence[str]) -> list[AudioItem]:
    exts = {e.lower() for e in extensions}
    paths = sorted(
        p
        for p in progress(folder.rglob("*"), desc=f"scanning {folder}")
        if p.suffix.lower() in exts and p.is_file()
    )
    items = []
    for p in paths:
        rel = p.relative_to(folder)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        items.append(AudioItem(name=str(p), path=str(p), label=label))
    return items


def read_manifest(manifest: Path, skips: SkipTracker) -> list[AudioItem]:
    """fairseq manifest: root line, then `path<TAB>num_samples`; missing files are counted skips."""
    lines = manifest.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError(f"{manifest}: empty manifest (expected a root folder line, then path<TAB>samples)")
    root = Path(lines[0].strip())
    items = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        path = root / parts[0]
        name = f"{path} ({manifest.name}:{lineno})"
        if not path.is_file():
            skips.skip(name, "missing", "file listed in the manifest does not exist")
            items.append(AudioItem(name=name, path=None))  # placeholder keeps side files aligned
            continue
        n = int(parts[1]) if len(parts) > 1 and parts[1].strip().isdigit() else 0
        items.append(AudioItem(name=name, path=str(path), num_samples=n))
    return items


def hf_source(row: dict[str, Any], base: Path) -> AudioSource:
    """An audio cell (`{"bytes", "path"}` with decode off, or a path string) -> bytes or a path."""
    if isinstance(row, str):
        return row if os.path.isabs(row) else str(base / row)
    if row.get("bytes"):
        return row["bytes"]
    path = row.get("path")
    if not path:
        raise SkipItem("missing", "row has neither audio bytes nor a path")
    return path if os.path.isabs(path) else str(base / path)
