"""Audio decoding: soundfile -> mono float32 -> 16 kHz, with every bad-input case turned into `SkipItem`.

All work is vectorised (numpy/torch ops over whole arrays); nothing loops over samples in Python.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from d2v_train.data.common import SkipItem

AudioSource = Union[str, bytes]


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    sample_rate: int
    channels: int

    def length_at(self, sample_rate: int) -> int:
        """Number of samples after resampling to `sample_rate`."""
        return int(math.ceil(self.frames * sample_rate / self.sample_rate))


def receptive_field(kernels: list[int] | tuple[int, ...], strides: list[int] | tuple[int, ...]) -> int:
    """Samples seen by one output frame of a conv stack (400 for wav2vec2/data2vec's default CNN).

    Shorter inputs give zero frames, which would crash the encoder, so they are skipped up front.
    """
    field, jump = 1, 1
    for k, s in zip(kernels, strides):
        field += (k - 1) * jump
        jump *= s
    return field


def _open(source: AudioSource):  # type: ignore[no-untyped-def]
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


def probe_audio(source: AudioSource) -> AudioInfo:
    """Header-only check (cheap): raises SkipItem for unreadable or zero-length files."""
    try:
        info = sf.info(_open(source))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise SkipItem("unreadable", f"cannot read audio header: {e}") from None
    if info.frames <= 0:
        raise SkipItem("empty", "zero-length audio")
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def decode_audio(source: AudioSource, sample_rate: int = 16000) -> torch.Tensor:
    """Decode to a mono float32 waveform `(S,)` at `sample_rate`.

    Multi-channel audio is mixed down by averaging channels; other rates are resampled with
    torchaudio's band-limited sinc resampler. NaN/inf samples are a skip (never silently repaired).
    """
    try:
        data, rate = sf.read(_open(source), dtype="float32", always_2d=True)
    except Exception as e:
        raise SkipItem("unreadable", f"cannot decode audio: {e}") from None
    if data.shape[0] == 0:
        raise SkipItem("empty", "zero-length audio")
    finite = np.isfinite(data)
    if not finite.all():
        raise SkipItem("non_finite", f"{int((~finite).sum())} NaN/inf samples")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate != sample_rate:
        wav = AF.resample(wav, int(rate), sample_rate)
    return wav


def normalize_waveform(wav: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance zero mean, unit variance (fairseq's `normalize: true`, a layer norm over time)."""
    return torch.nn.functional.layer_norm(wav, wav.shape, eps=eps)


def random_crop(wav: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random window of `size` samples (the whole waveform when it is not longer)."""
    excess = wav.shape[-1] - size
    if excess <= 0:
        return wav
    start = int(torch.randint(0, excess + 1, (1,), generator=generator))
    return wav[..., start : start + size]
