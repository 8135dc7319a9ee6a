"""Embedded defaults that need nothing but pip (digits, docstrings) or one apt package (speech).

- `DigitsDataModule`: scikit-learn's 1,797 8x8 digits, upsampled to the tiny vision encoder's size,
  3 channels, labelled: the default of `d2v-pretrain` (a < 2 minute CPU run).
- `DocstringsDataModule`: Python's own documentation (pydoc topics + stdlib docstrings) as text.
- `SpeechDataModule`: a spoken-word (classes) or sentence (transcripts) corpus synthesised with
  espeak-ng into a cache folder, then read by the ordinary audio pipeline.
"""

from __future__ import annotations

import ast
import logging
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from d2v_train.data.audio import AudioDataModule
from d2v_train.data.collate import collate_images
from d2v_train.data.common import BaseDataModule, ProbeSets, default_cache_dir, fingerprint, progress, seeded_split
from d2v_train.data.espeak import Utterance, synthesize_all
from d2v_train.data.text import TextDataModule
from d2v_train.interop.files import atomic_write

log = logging.getLogger("d2v_train.data")

# ------------------------------------------------------------------------------------------ digits


class TensorImages(Dataset):
    """In-memory images `(N, 3, H, W)` + labels `(N,)`; nothing to decode, nothing to skip.

    With `max_shift` / `max_scale` > 0 a training batch is randomly translated (by up to that share of
    the image side) and rescaled (by up to that factor either way) in one batched resampling. The
    draws come from the batch's seed (`IndexBatch.seed`), so a resumed run sees the same images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: float = 0.0, max_scale: float = 0.0) -> None:
        self.images, self.labels = images, labels
        self.max_shift, self.max_scale = float(max_shift), float(max_scale)
        self.background = float(images.amin()) if len(images) else 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"inputs": self.images[index], "labels": int(self.labels[index])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        images = self.images[idx]
        seed = getattr(indices, "seed", None)
        if seed is not None and (self.max_shift > 0 or self.max_scale > 0):
            images = self._augment(images, torch.Generator().manual_seed(int(seed)))
        labels = self.labels[idx].tolist()
        return [{"inputs": x, "labels": y} for x, y in zip(images, labels)]

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = images.shape[0]
        scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * self.max_scale
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * self.max_shift)  # grid units: [-1, 1]
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
        theta[:, :, 2] = shift
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        # resample the offset from the background, so what moves in from outside is background
        out = torch.nn.functional.grid_sample(images - self.background, grid, mode="bilinear", align_corners=False)
        return out + self.background


class DigitsDataModule(BaseDataModule):
    """scikit-learn digits as `(B, 3, image_size, image_size)` pixels with labels 0-9.

    Values 0-16 are scaled to [0, 1], upsampled bilinearly, repeated to 3 channels and standardised
    with the training split's mean/std. `labels_per_class` keeps only k labelled training images per
    class (seeded), for few-label fine-tuning. `max_shift` / `max_scale` augment training batches
    (random translation and rescaling, seeded per batch).
    """

    modality = "vision"

    def __init__(
        self,
        *,
        image_size: int = 32,
        val_fraction: float = 0.2,
        labels_per_class: int | None = None,
        max_shift: float = 0.0,
        max_scale: float = 0.0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
        path: str | None = None,
        recipe: str = "v2",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            strict=strict,
            seed=seed,
        )
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.labels_per_class = labels_per_class
        self.max_shift, self.max_scale = max_shift, max_scale
        self.classes: list[str] | None = [str(i) for i in range(10)]
        self.mean = self.std = 0.0
        # `modality=vision data.path=/my/images`: the image pipeline at this module's settings
        self.images = None
        if path:
            from d2v_train.data.image import ImageDataModule

            self.images = ImageDataModule(
                path, image_size=image_size, recipe=recipe, val_fraction=val_fraction, batch_size=batch_size,
                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
                strict=strict, seed=seed,
            )  # fmt: skip
            self.skips = self.images.skips

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.images is not None:
            self.images.setup(stage)
            self.train_set, self.val_set, self.classes = self.images.train_set, self.images.val_set, self.images.classes
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        if self.image_size != 8:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1).contiguous()
        y = torch.as_tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = seeded_split(len(y), self.val_fraction, self.seed)
        all_train = train_idx
        if self.labels_per_class:
            train_idx = self._few_labels(train_idx, y)
        self.mean, self.std = float(x[train_idx].mean()), float(x[train_idx].std())
        x = (x - self.mean) / self.std
        self._probe_train = TensorImages(x[all_train], y[all_train])
        self.train_set = TensorImages(x[train_idx], y[train_idx], self.max_shift, self.max_scale)
        self.val_set = TensorImages(x[val_idx], y[val_idx])

    def probe_sets(self) -> ProbeSets | None:
        """Digit classes: every labelled training image (``labels_per_class`` does not apply: the
        probes draw their own few-label subsets) and the validation split. None for ``data.path``."""
        if self.images is not None:
            return None
        self.setup("fit")
        assert self.val_set is not None
        return ProbeSets("digits", self._probe_train, self.val_set, 10, self.collate_fn, list(self.classes or []))

    def _few_labels(self, idx: list[int], y: torch.Tensor) -> list[int]:
        g = random.Random(self.seed)
        keep: list[int] = []
        for c in range(10):
            members = [i for i in idx if int(y[i]) == c]
            keep += g.sample(members, min(self.labels_per_class or 0, len(members)))
        return sorted(keep)

    collate_fn = staticmethod(collate_images)  # type: ignore[assignment]


# -------------------------------------------------------------------------------------- docstrings

DOC_SEPARATOR = "<|doc|>"


STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"})
# folders of installed packages whose code is tests, vendored copies or bundled data, not the package's prose
PACKAGE_SKIP_DIRS = STDLIB_SKIP_DIRS | {"testing", "_vendor", "vendored", "benchmarks", "examples"}


def source_docstrings(root: Path, files: Sequence[Path]) -> Iterator[tuple[str, str]]:
    """(top-level module or package under ``root``, docstring) for the modules, classes and functions
    of ``files``, read with `ast` (nothing is imported, so no module runs)."""
    for f in progress(files, desc="reading docstrings"):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        module = f.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 20:
                    yield module, doc.strip()


def stdlib_docstrings(max_files: int | None = None) -> Iterator[tuple[str, str]]:
    """(top-level module or package, docstring) for the standard library (`source_docstrings`)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    yield from source_docstrings(root, files[:max_files])


def package_location(name: str) -> Path:
    """The folder (or single file) of the installed top-level package ``name``, found without
    importing it; a clear error naming ``data.extra_packages`` when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or (spec.origin in (None, "built-in", "frozen") and not spec.submodule_search_locations):
        raise ValueError(f"data.extra_packages: {name!r} is not an installed top-level Python package with source files")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin)  # type: ignore[arg-type]


def package_version(name: str) -> str:
    """The installed distribution version of import name ``name`` ("unknown" when it has no metadata)."""
    from importlib import metadata

    for dist in metadata.packages_distributions().get(name, [name]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def package_docstrings(name: str, max_files: int | None = None) -> Iterator[tuple[str, str]]:
    """(``name``, docstring) for an installed package's modules, classes and functions, its tests,
    vendored copies and examples left out; read with `ast`, never imported."""
    where = package_location(name)
    if where.is_file():
        files = [where]
    else:
        files = sorted(p for p in where.rglob("*.py") if not PACKAGE_SKIP_DIRS & set(p.relative_to(where).parts[:-1]))
    for _, doc in source_docstrings(where.parent, files[:max_files]):
        yield name, doc


def python_docs(max_files: int | None = None, extra_packages: Sequence[str] = ()) -> list[str]:
    """pydoc's topic pages + docstrings of the standard library (`stdlib_docstrings`) + those of the
    installed ``extra_packages`` (`package_docstrings`; ``max_files`` caps each package too)."""
    import pydoc_data.topics

    docs = [t.strip() for t in pydoc_data.topics.topics.values()]
    docs += [doc for _, doc in stdlib_docstrings(max_files)]
    for name in extra_packages:
        docs += [doc for _, doc in package_docstrings(name, max_files)]
    return docs


def docstrings_corpus_dir(cache: Path, max_files: int | None = None, extra_packages: Sequence[str] = ()) -> Path:
    """The corpus folder: one per Python version, file cap and set of extra packages (name + installed
    version, so upgrading a package builds a new corpus and BPE)."""
    import platform

    name = f"python-{platform.python_version()}-{max_files or 'all'}"
    if extra_packages:
        for pkg in extra_packages:
            package_location(pkg)  # fails here, with the field's name, before any work
        # the set decides the folder (listing the same packages in another order reuses it)
        name += "-extra-" + fingerprint(sorted((p, package_version(p)) for p in set(extra_packages)))
    return cache / name


def write_docstrings_corpus(cache: Path, max_files: int | None = None, extra_packages: Sequence[str] = ()) -> Path:
    """One text file, documents separated by a `<|doc|>` line; written once per `docstrings_corpus_dir`."""
    out = docstrings_corpus_dir(cache, max_files, extra_packages) / "docstrings.txt"
    if not out.is_file():  # through a temporary file of its own: runs of a sweep may build it at once
        text = f"\n{DOC_SEPARATOR}\n".join(python_docs(max_files, extra_packages))
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def docstrings_by_module(folder: Path, max_files: int | None = None) -> list[tuple[str, str]]:
    """`stdlib_docstrings` pairs, cached as JSON in the corpus folder (reading them takes seconds)."""
    import json

    out = folder / "docstrings_by_module.json"
    if not out.is_file():
        text = json.dumps(list(stdlib_docstrings(max_files)))
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [(m, d) for m, d in json.loads(out.read_text(encoding="utf-8"))]


class DocstringsDataModule(TextDataModule):
    """Python's own documentation as a text corpus (~2 MB), tokenized with a trained byte-level BPE.

    ``extra_packages`` adds the docstrings of installed packages (e.g. the ones d2v_train itself
    needs, so they exist wherever it runs) to the pretraining corpus and the BPE; the probe task
    stays the standard library's.
    """

    def __init__(
        self,
        *,
        max_files: int | None = None,
        extra_packages: Sequence[str] | None = None,
        cache_dir: str | None = None,
        path: str | None = None,
        probe_classes: int = 20,
        probe_per_class: int = 60,
        **kwargs: Any,
    ) -> None:
        self.max_files = max_files
        self.extra_packages = list(dict.fromkeys(extra_packages or []))  # each once, in the given order
        self.probe_classes, self.probe_per_class = probe_classes, probe_per_class
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir("docstrings")
        kwargs.setdefault("vocab_size", 4096)
        kwargs.setdefault("max_length", 128)
        # a user path (`modality=text data.path=...`) is read as ordinary text files
        super().__init__(path or "", separator=None if path else DOC_SEPARATOR, cache_dir=str(cache), **kwargs)
        self.user_path = path

    def prepare_data(self) -> None:
        self._corpus()

    def _corpus(self) -> str:
        if not self.path:
            cache = Path(self.cache_dir or ".")  # type: ignore[arg-type]
            self.path = str(write_docstrings_corpus(cache, self.max_files, self.extra_packages))
        return self.path

    def setup(self, stage: str | None = None) -> None:
        self._corpus()
        super().setup(stage)

    def probe_sets(self) -> ProbeSets | None:
        """Which standard-library module a docstring comes from, its name removed from the text
        (`probe_tasks.docstring_module_task`); None for a user's own text (`data.path`)."""
        if self.user_path:
            return None
        from d2v_train.data.probe_tasks import docstring_module_task, encode_examples
        from d2v_train.data.tasks_text import TokenExamples
        from d2v_train.data.tokenizer import load_tokenizer

        self.setup("fit")
        task = docstring_module_task(
            docstrings_by_module(Path(self.path).parent, self.max_files), num_classes=self.probe_classes,
            per_class=self.probe_per_class, seed=self.seed,
        )  # fmt: skip
        tok = load_tokenizer(str(self.tokenizer_path))
        ids = self.special_token_ids

        def split(rows: list[tuple[str, int]]) -> TokenExamples:
            inputs = encode_examples([t for t, _ in rows], tok, ids["bos"], ids["eos"], self.max_length)
            return TokenExamples(inputs, [lab for _, lab in rows])

        return ProbeSets(
            name="docstring_module", train=split(task.train), val=split(task.val), num_classes=len(task.classes),
            collate_fn=self.collate_fn, class_names=task.classes,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ speech

WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
)  # fmt: skip
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m3", "f1", "f3")


class SpeechDataModule(AudioDataModule):
    """A synthesised spoken corpus: `kind=words` (labels = word classes) or `kind=sentences`
    (labels = character transcripts for CTC). Voices in `val_accents` are held out for validation
    (speaker-independent evaluation); otherwise a seeded random split."""

    def __init__(
        self,
        *,
        kind: str = "words",
        words: Sequence[str] = WORDS,
        accents: Sequence[str] = ACCENTS[:4],
        variants: Sequence[str] = VARIANTS,
        rates: Sequence[int] = (150,),
        pitches: Sequence[int] = (50,),
        val_accents: Sequence[str] | None = None,
        probe_accents: Sequence[str] | None = None,
        probe_variants: Sequence[str] | None = None,
        probe_rate: int | None = None,
        probe_pitch: int | None = None,
        num_sentences: int = 200,
        sentence_words: tuple[int, int] = (2, 6),
        synth_threads: int = 4,
        cache_dir: str | None = None,
        path: str | None = None,
        labels: str | None = "auto",
        **audio: Any,
    ) -> None:
        if kind not in ("words", "sentences"):
            raise ValueError(f"data.kind must be words or sentences, got {kind!r}")
        if labels == "auto":  # a user's own recordings (data.path=...) are read unlabelled
            labels = None if path else ("class" if kind == "words" else "transcript")
        audio.setdefault("batching", "pad")
        audio.setdefault("max_sample_size", 16000 * 8)
        audio.setdefault("max_tokens", 16000 * 64)
        super().__init__(path or "", labels=labels, **audio)
        self.kind = kind
        self.words = list(words)
        self.accents = list(accents)
        self.variants = list(variants)
        self.rates = list(rates)
        self.pitches = list(pitches)
        self.val_accents = list(val_accents or [])
        # the probe's validation voices: accents the probe's training labels (and pretraining) lack
        self.probe_accents = list(probe_accents) if probe_accents is not None else [a for a in ACCENTS if a not in self.accents]
        if not self.probe_accents or set(self.probe_accents) & set(self.accents):
            raise ValueError(
                f"data.probe_accents must be non-empty and disjoint from data.accents {self.accents} (the probe "
                f"is judged on voices its training labels lack), got {self.probe_accents}"
            )
        # the probe's voices and speaking style, fixed apart from the pretraining corpus so that growing
        # the corpus (more variants, rates, pitches) leaves the probe's figures comparable
        self.probe_variants = list(probe_variants) if probe_variants is not None else list(self.variants)
        self.probe_rate = int(probe_rate) if probe_rate is not None else self.rates[0]
        self.probe_pitch = int(probe_pitch) if probe_pitch is not None else self.pitches[0]
        if not self.probe_variants:
            raise ValueError("data.probe_variants must be a non-empty list of espeak-ng variants (or null: data.variants)")
        self.num_sentences = num_sentences
        self.sentence_words = sentence_words
        self.synth_threads = synth_threads
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir("speech")
        self.user_path = path

    def _texts(self) -> list[str]:
        if self.kind == "words":
            return self.words
        g = random.Random(self.seed)
        lo, hi = self.sentence_words
        return [" ".join(g.choice(self.words) for _ in range(g.randint(lo, hi))) for _ in range(self.num_sentences)]

    def corpus_dir(self) -> Path:
        key = fingerprint(self.kind, self.words, self.accents, self.variants, self.rates, self.pitches,
                          self.num_sentences, self.sentence_words, self.seed)  # fmt: skip
        return self.cache_root / f"{self.kind}-{key}"

    def prepare_data(self) -> None:
        """Synthesise every utterance not yet in the cache (train/ and val/ folders)."""
        if self.user_path:
            return
        root = self.corpus_dir()
        jobs = []
        voices = [(a, v) for a in self.accents + [x for x in self.val_accents if x not in self.accents] for v in self.variants]
        for t_i, text in enumerate(self._texts()):
            for accent, variant in voices:
                for rate in self.rates:
                    for pitch in self.pitches:
                        split = "val" if accent in self.val_accents else "train"
                        stem = f"{accent}+{variant}_s{rate}_p{pitch}"
                        if self.kind == "words":
                            out = root / split / text / f"{stem}.wav"
                        else:
                            out = root / split / f"{t_i:05d}_{stem}.wav"
                        jobs.append(Utterance(text, f"{accent}+{variant}", rate, pitch, out))
        synthesize_all(jobs, self.synth_threads)
        if self.kind == "sentences":
            for u in jobs:
                txt = u.out.with_suffix(".txt")
                if not txt.is_file():
                    atomic_write(txt, lambda tmp, text=u.text: tmp.write_text(text, encoding="utf-8"))
        if not getattr(self, "_announced", False):  # prepare_data runs more than once per process
            log.info("speech corpus: %d utterances in %s", len(jobs), root)
            self._announced = True

    def probe_clip(self, word: str, voice: str) -> Path:
        """Where the probe's recording of ``word`` by ``voice`` (accent+variant) is cached (the layout
        the espeak task modules share)."""
        return self.cache_root / "words" / f"{voice}_s{self.probe_rate}_p{self.probe_pitch}" / f"{word}.wav"

    def probe_voices(self) -> tuple[list[str], list[str]]:
        """(voices labelled for the probe's training, held-out voices it is validated on)."""
        train = [f"{a}+{v}" for a in self.accents for v in self.probe_variants]
        val = [f"{a}+{v}" for a in self.probe_accents for v in self.probe_variants]
        return train, val

    def probe_sets(self) -> ProbeSets | None:
        """Which word is spoken (``data.words``), by the training accents for the probe's training
        labels and by ``probe_accents`` (never among them) for its validation, each in
        ``probe_variants`` at ``probe_rate`` / ``probe_pitch``; single words, trimmed to their speech.
        None for a user's own recordings (``data.path``)."""
        if self.user_path:
            return None
        from d2v_train.data.probe_tasks import spoken_word_clips
        from d2v_train.data.tasks_audio import Waveforms

        train_voices, val_voices = self.probe_voices()
        rate, pitch = self.probe_rate, self.probe_pitch
        jobs = [Utterance(w, v, rate, pitch, self.probe_clip(w, v)) for w in self.words for v in train_voices + val_voices]
        synthesize_all(jobs, self.synth_threads)

        def split(voices: list[str]) -> Waveforms:
            rows = [(i, v, self.probe_clip(w, v)) for v in voices for i, w in enumerate(self.words)]
            waves, labels = spoken_word_clips(rows, self.sample_rate, self.normalize)
            return Waveforms(waves, labels)

        return ProbeSets(
            name="spoken_word_unseen_voices", train=split(train_voices), val=split(val_voices),
            num_classes=len(self.words), collate_fn=self.collate_fn, class_names=list(self.words),
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self._is_setup:
            return
        if self.user_path:  # `modality=audio data.path=/my/wavs`: the plain audio pipeline
            super().setup(stage)
            return
        self.prepare_data()
        root = self.corpus_dir()
        self.path = str(root / "train")
        self.val_path = str(root / "val") if self.val_accents else None
        super().setup(stage)
