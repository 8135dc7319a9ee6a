"""Synthesised speech with espeak-ng: real (formant) speech with exact transcripts, no downloads.

espeak-ng writes 22,050 Hz WAV; the audio pipeline resamples to 16 kHz like any other input.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from d2v_train.data.common import DataError, progress
from d2v_train.interop.files import atomic_write

INSTALL_HINT = (
    "espeak-ng is not installed; data=speech needs it. Install it with "
    "`sudo apt-get install -y --no-install-recommends espeak-ng` (Debian/Ubuntu), "
    "`sudo dnf install espeak-ng` (Fedora) or `brew install espeak-ng` (macOS), "
    "or point data=audio at your own recordings"
)


def espeak_binary() -> str | None:
    return shutil.which("espeak-ng")


def require_espeak() -> str:
    binary = espeak_binary()
    if binary is None:
        raise DataError(INSTALL_HINT)
    return binary


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str  # accent + variant, e.g. "en-us+m3" ("en", not "en-gb", is the British voice)
    rate: int  # words per minute
    pitch: int  # 0-99
    out: Path


def synthesize(u: Utterance, binary: str) -> None:
    """One utterance to a WAV file through a temporary file of its own, then renamed (atomic): two
    runs that build the same cache at once (a sweep) each write their own file and the last rename
    wins, instead of one renaming the other's half-written file away."""

    def write(tmp: Path) -> None:
        cmd = [binary, "-v", u.voice, "-s", str(u.rate), "-p", str(u.pitch), "-w", str(tmp), u.text]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or tmp.stat().st_size == 0:
            why = res.stderr.strip() or (f"exit status {res.returncode}" if res.returncode else "it wrote nothing")
            raise DataError(f"espeak-ng failed for voice {u.voice!r} ({u.out.name}): {why}")

    atomic_write(u.out, write)


def synthesize_all(utterances: Sequence[Utterance], threads: int = 4) -> None:
    """Synthesise the missing ones in parallel (each call is a short-lived process)."""
    binary = require_espeak()
    todo = [u for u in utterances if not u.out.is_file()]
    if not todo:
        return
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for _ in progress(pool.map(lambda u: synthesize(u, binary), todo), desc="espeak-ng", total=len(todo)):
            pass
