"""Labelled audio for the frame and speaker heads, synthesised with espeak-ng (no downloads).

Single words are spoken by espeak-ng voices (accent + variant + pitch) into a cache folder, trimmed
to their speech by an amplitude threshold, and then composed in memory, seeded:

- ``SpeechFramesDataModule`` (``data=speech_frames``, audio frame classification): 2-4 words of one
  voice separated by random silences (with a little noise, so silence is not digital zero). We did
  the concatenation, so every sample's label is known exactly: the word's class (``classes[1:]``) on
  its samples, ``silence`` (0) in the gaps; each 20 ms frame takes the label of the sample at the
  centre of its receptive field. Labels ``(frames,)``, padded with -100.
- ``SpeakersDataModule`` (``data=speakers``, x-vector): each voice is a speaker (label = voice);
  utterances are two words of that voice. Validation utterances use held-out *words* of the same
  speakers (text-independent verification), so the EER over validation pairs measures whether the
  embedding encodes the voice rather than the words.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from d2v_train.data.audio_io import decode_audio, normalize_waveform
from d2v_train.data.collate import collate_audio
from d2v_train.data.common import BaseDataModule, default_cache_dir
from d2v_train.data.espeak import Utterance, synthesize_all

log = logging.getLogger("d2v_train.data")

__all__ = ["SpeakersDataModule", "SpeechFramesDataModule", "conv_frames", "frame_labels", "trim_silence"]

SAMPLE_RATE = 16000
DEFAULT_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
DEFAULT_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def conv_frames(num_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames the CNN feature extractor makes of ``num_samples`` (no padding, as in the encoder)."""
    n = num_samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return max(n, 0)


def frame_labels(sample_labels: Tensor, kernels: Sequence[int], strides: Sequence[int]) -> Tensor:
    """Per-frame labels: the label of the sample at the centre of each frame's receptive field."""
    hop, field = 1, 1
    for k, s in zip(kernels, strides):
        field += (k - 1) * hop
        hop *= s
    frames = conv_frames(len(sample_labels), kernels, strides)
    centres = torch.arange(frames) * hop + field // 2
    return sample_labels[centres.clamp(max=len(sample_labels) - 1)]


def trim_silence(wav: Tensor, threshold: float = 0.02) -> Tensor:
    """The span between the first and last sample above ``threshold`` of the peak amplitude."""
    loud = torch.nonzero(wav.abs() > threshold * wav.abs().max()).flatten()
    return wav[int(loud[0]) : int(loud[-1]) + 1] if len(loud) else wav


class Waveforms(Dataset):
    """In-memory waveforms ``(S,)`` with an int label or a ``(frames,)`` label tensor."""

    def __init__(self, waves: list[Tensor], labels: list[Any]) -> None:
        self.waves, self.labels = waves, labels

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"inputs": self.waves[index], "labels": self.labels[index]}


class SpokenWordsBase(BaseDataModule):
    """Synthesis, trimming and composition shared by the two modules.

    Args:
        words / val_words: vocabulary (validation-only words: ``SpeakersDataModule``).
        accents / variants / pitches: espeak-ng voices are their product (``en-us+f1`` at pitch 50).
        num_train / num_val: composed utterances per split.
        gap_ms: silence before, between and after words, drawn uniformly in this range.
        noise: standard deviation of the added Gaussian noise (peak amplitude is about 1).
    """

    modality = "audio"

    def __init__(
        self,
        *,
        words: Sequence[str] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        val_words: Sequence[str] = (),
        accents: Sequence[str] = ("en-us", "en", "en-gb-scotland", "en-029"),
        variants: Sequence[str] = ("m1", "m3", "f1", "f3"),
        pitches: Sequence[int] = (50,),
        rate: int = 150,
        num_train: int = 800,
        num_val: int = 160,
        gap_ms: tuple[int, int] = (80, 400),
        noise: float = 0.003,
        normalize: bool = True,
        conv_kernel: Sequence[int] = DEFAULT_CONV_KERNEL,
        conv_stride: Sequence[int] = DEFAULT_CONV_STRIDE,
        cache_dir: str | None = None,
        synth_threads: int = 4,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, strict=strict, seed=seed)  # fmt: skip
        self.words, self.val_words = list(words), list(val_words)
        self.voices = [(f"{a}+{v}", int(p)) for a in accents for v in variants for p in pitches]
        self.rate = int(rate)
        self.num_train, self.num_val = num_train, num_val
        self.gap = (int(gap_ms[0]) * SAMPLE_RATE // 1000, int(gap_ms[1]) * SAMPLE_RATE // 1000)
        self.noise = noise
        self.normalize = normalize
        self.conv_kernel, self.conv_stride = list(conv_kernel), list(conv_stride)
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir("speech")
        self.synth_threads = synth_threads
        self.classes: list[str] | None = None

    def speaker_names(self) -> list[str]:
        return [f"{v}_p{p}" for v, p in self.voices]

    def _path(self, word: str, voice: tuple[str, int]) -> Path:
        return self.cache_root / "words" / f"{voice[0]}_s{self.rate}_p{voice[1]}" / f"{word}.wav"

    def prepare_data(self) -> None:
        jobs = [Utterance(w, v, self.rate, p, self._path(w, (v, p))) for w in self.words + self.val_words for v, p in self.voices]
        synthesize_all(jobs, self.synth_threads)

    def clips(self) -> dict[tuple[str, int], Tensor]:
        """(word index over ``words + val_words``, voice index) -> trimmed 16 kHz waveform."""
        self.prepare_data()
        out = {}
        for w, word in enumerate(self.words + self.val_words):
            for v, voice in enumerate(self.voices):
                wav = trim_silence(decode_audio(str(self._path(word, voice)), SAMPLE_RATE))
                out[(w, v)] = wav / wav.abs().max().clamp(min=1e-6)
        return out

    def compose(self, pieces: list[Tensor], rng: random.Random, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(waveform, sample labels): gap, word, gap, ..., word, gap; word ``i`` is labelled ``i + 1``
        (callers map to classes), gaps 0, and Gaussian noise over everything."""
        parts, labels = [], []
        for i, piece in enumerate(pieces):
            gap = rng.randint(*self.gap)
            parts += [torch.zeros(gap), piece]
            labels += [torch.zeros(gap, dtype=torch.long), torch.full((len(piece),), i + 1, dtype=torch.long)]
        tail = rng.randint(*self.gap)
        parts.append(torch.zeros(tail))
        labels.append(torch.zeros(tail, dtype=torch.long))
        wav = torch.cat(parts)
        wav = wav + self.noise * torch.randn(wav.shape, generator=g)
        return (normalize_waveform(wav) if self.normalize else wav), torch.cat(labels)

    collate_fn = staticmethod(collate_audio)  # type: ignore[assignment]


class SpeechFramesDataModule(SpokenWordsBase):
    """Audio frame classification: silence vs which word, per 20 ms frame (see module doc)."""

    def __init__(self, *, words_per_utterance: tuple[int, int] = (2, 4), val_voices: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.words_per_utterance = (int(words_per_utterance[0]), int(words_per_utterance[1]))
        self.val_voices = int(val_voices)  # the last voices are held out (speaker-independent validation)
        if not 0 < self.val_voices < len(self.voices):
            raise ValueError(f"data.val_voices must be in 1..{len(self.voices) - 1} for {len(self.voices)} voices")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.classes = ["silence", *self.words]
        clips = self.clips()
        rng, g = random.Random(self.seed), torch.Generator().manual_seed(self.seed)
        split = len(self.voices) - self.val_voices
        self.train_set = self._build(clips, range(split), self.num_train, rng, g)
        self.val_set = self._build(clips, range(split, len(self.voices)), self.num_val, rng, g)

    def _build(self, clips: dict, voices: range, count: int, rng: random.Random, g: torch.Generator) -> Waveforms:
        waves, labels = [], []
        for _ in range(count):
            voice = rng.choice(voices)
            chosen = [rng.randrange(len(self.words)) for _ in range(rng.randint(*self.words_per_utterance))]
            wav, pos = self.compose([clips[(w, voice)] for w in chosen], rng, g)
            word_class = torch.tensor([0] + [w + 1 for w in chosen])  # position in utterance -> class
            waves.append(wav)
            labels.append(frame_labels(word_class[pos], self.conv_kernel, self.conv_stride))
        return Waveforms(waves, labels)


class SpeakersDataModule(SpokenWordsBase):
    """x-vector: which espeak-ng voice is speaking; validation on held-out words (see module doc)."""

    def __init__(self, *, words_per_utterance: int = 2, **kwargs: Any) -> None:
        kwargs.setdefault("words", ("zero", "one", "two", "three", "four", "five", "six", "seven"))
        kwargs.setdefault("val_words", ("eight", "nine", "yes", "no"))
        kwargs.setdefault("gap_ms", (40, 150))
        super().__init__(**kwargs)
        if not self.val_words:
            raise ValueError("data.val_words: the speakers module validates on held-out words, give at least one")
        self.words_per_utterance = int(words_per_utterance)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.classes = self.speaker_names()
        clips = self.clips()
        rng, g = random.Random(self.seed), torch.Generator().manual_seed(self.seed)
        n = len(self.words)
        self.train_set = self._build(clips, range(n), self.num_train, rng, g)
        self.val_set = self._build(clips, range(n, n + len(self.val_words)), self.num_val, rng, g)

    def _build(self, clips: dict, words: range, count: int, rng: random.Random, g: torch.Generator) -> Waveforms:
        waves, labels = [], []
        for i in range(count):
            voice = i % len(self.voices)  # balanced speakers
            wav, _ = self.compose([clips[(rng.choice(words), voice)] for _ in range(self.words_per_utterance)], rng, g)
            waves.append(wav)
            labels.append(voice)
        return Waveforms(waves, labels)

