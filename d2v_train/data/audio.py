"""Audio pretraining / fine-tuning data: folders, fairseq manifests or local `datasets`, all at 16 kHz.

Sources (`audio_sources`), transcripts (`audio_transcripts`) and the CTC vocabulary (`ctc_vocab`)
live in their own modules; this one holds the dataset and the LightningDataModule.

`data.path` may be
- a folder of audio files (recursive; `.wav`, `.flac`, `.ogg` by default),
- a fairseq manifest (`.tsv`: first line the root folder, then `relative/path<TAB>num_samples`),
- a saved `datasets` directory or a local parquet/json/csv file with an audio column.

Files are checked up front from their headers (soundfile.info), so unreadable, empty and too-short
files become counted skips before training; a file that still fails at decode time is skipped and
counted inside the worker (see `common.SafeDataset`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from d2v_train.data import hf
from d2v_train.data.audio_io import (
    AudioSource,
    decode_audio,
    normalize_waveform,
    probe_audio,
    random_crop,
    receptive_field,
)
from d2v_train.data.collate import collate_audio
from d2v_train.data.common import (
    BaseDataModule,
    DataError,
    SafeDataset,
    SkipItem,
    SkipTracker,
    no_usable_files,
    progress,
    seeded_split,
)
from d2v_train.data.audio_sources import (  # noqa: F401  (re-exported: the old import path keeps working)
    AUDIO_EXTENSIONS,
    AudioItem,
    hf_source,
    read_manifest,
    scan_folder,
)
from d2v_train.data.audio_transcripts import attach_side_transcripts, attach_txt_transcripts
from d2v_train.data.ctc_vocab import CharVocab
from d2v_train.data.samplers import LengthBucketBatchSampler, mix_seed

log = logging.getLogger("d2v_train.data")

DEFAULT_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
DEFAULT_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


# ---------------------------------------------------------------------------------------- dataset


class AudioDataset(SafeDataset):
    """Decodes, normalises and crops utterances; `__getitems__` crops a batch to its shortest item
    (`batching="crop"`, the reference) or leaves lengths for padding (`batching="pad"`)."""

    def __init__(
        self,
        items: list[AudioItem],
        skips: SkipTracker,
        *,
        rows: Any = None,
        rows_base: Path = Path("."),
        audio_column: str = "audio",
        sample_rate: int = 16000,
        normalize: bool = True,
        min_sample_size: int = 400,
        max_sample_size: int | None = None,
        batching: str = "crop",
        class_index: dict[str, int] | None = None,
        vocab: CharVocab | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(skips)
        self.items = items
        self.rows = rows
        self.rows_base = rows_base
        self.audio_column = audio_column
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.min_sample_size = min_sample_size
        self.max_sample_size = max_sample_size
        self.batching = batching
        self.class_index = class_index
        self.vocab = vocab
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        return self.items[index].name

    def lengths(self) -> list[int]:
        cap = self.max_sample_size or 1 << 62
        return [min(it.num_samples, cap) for it in self.items]

    def source(self, item: AudioItem) -> AudioSource:
        if item.path is not None:
            return item.path
        return hf_source(self.rows[item.row][self.audio_column], self.rows_base)

    def load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        wav = decode_audio(self.source(item), self.sample_rate)
        if wav.shape[0] < self.min_sample_size:
            raise SkipItem("too_short", f"{wav.shape[0]} samples < minimum {self.min_sample_size}")
        if self.normalize:
            wav = normalize_waveform(wav)
        out: dict[str, Any] = {"inputs": wav}
        if self.class_index is not None:
            out["labels"] = self.class_index[item.label]  # type: ignore[index]
        elif self.vocab is not None:
            out["labels"] = self.vocab.encode(item.transcript or "")
        return out

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.try_load(index)
        if item is not None and self.max_sample_size:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, index))
            item["inputs"] = random_crop(item["inputs"], self.max_sample_size, gen)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items = super().__getitems__(indices)
        seed = getattr(indices, "seed", None)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None  # else worker RNG
        size = min(len(it["inputs"]) for it in items) if self.batching == "crop" else None
        if self.max_sample_size:
            size = min(size or self.max_sample_size, self.max_sample_size)
        if size is not None:
            for it in items:
                it["inputs"] = random_crop(it["inputs"], size, gen)
        return items


# ------------------------------------------------------------------------------------ data module


class AudioDataModule(BaseDataModule):
    """Raw-waveform batches `(B, S)` at 16 kHz with a length-bucketed `max_tokens` sampler.

    `labels`: None (pretraining), "class" (folder names or `label_column`) or "transcript"
    (`.wrd`/`.ltr` side file of a manifest, `transcript_column`, or a `.txt` beside each file);
    after `setup()`, `classes` / `vocab` describe the targets.
    """

    modality = "audio"

    def __init__(
        self,
        path: str,
        *,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        extensions: Sequence[str] = AUDIO_EXTENSIONS,
        train_split: str = "train",
        audio_column: str = "audio",
        label_column: str | None = None,
        transcript_column: str | None = None,
        transcript_ext: str = "wrd",
        labels: str | None = None,
        sample_rate: int = 16000,
        normalize: bool = True,
        min_sample_size: int | None = None,
        max_sample_size: int | None = 320_000,
        max_length: int | None = None,
        batching: str = "crop",
        max_tokens: int = 1_400_000,
        max_batch_size: int | None = None,
        conv_kernel: Sequence[int] = DEFAULT_CONV_KERNEL,
        conv_stride: Sequence[int] = DEFAULT_CONV_STRIDE,
        probe_threads: int = 8,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            strict=strict,
            seed=seed,
        )
        if batching not in ("crop", "pad"):
            raise ValueError(f"data.batching must be 'crop' or 'pad', got {batching!r}")
        if labels not in (None, "class", "transcript"):
            raise ValueError(f"data.labels must be null, 'class' or 'transcript', got {labels!r}")
        self.path = path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.extensions = tuple(extensions)
        self.train_split = train_split
        self.audio_column = audio_column
        self.label_column = label_column
        self.transcript_column = transcript_column
        self.transcript_ext = transcript_ext
        self.labels = labels
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.receptive_field = receptive_field(list(conv_kernel), list(conv_stride))
        self.min_sample_size = max(min_sample_size or 0, self.receptive_field)
        self.max_sample_size = max_sample_size
        self.max_length = max_length
        self.batching = batching
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.probe_threads = probe_threads
        self.classes: list[str] | None = None
        self.vocab: CharVocab | None = None
        self._is_setup = False

    # -- discovery -------------------------------------------------------------------------------

    def _discover(self, location: str) -> tuple[list[AudioItem], Any, Any]:
        """Items of one location (+ the `datasets` table and a validation table when present)."""
        path = Path(location).expanduser()
        if not path.exists():
            raise DataError(f"data.path {path} does not exist")
        if hf.is_hf_input(path):
            return self._discover_hf(path)
        if path.is_dir():
            items = scan_folder(path, self.extensions)
            if self.labels == "transcript":
                items = attach_txt_transcripts(items)
            return items, None, None
        if path.suffix.lower() in self.extensions:
            items = [AudioItem(name=str(path), path=str(path))]
            return (attach_txt_transcripts(items) if self.labels == "transcript" else items), None, None
        items = read_manifest(path, self.skips)
        if self.labels == "transcript":
            items = attach_side_transcripts(items, path, self.transcript_ext)
        return [it for it in items if it.path is not None], None, None

    def _discover_hf(self, path: Path) -> tuple[list[AudioItem], Any, Any]:
        train, val = hf.load_local(path, self.train_split)
        train = self._audio_table(train, path)
        return self._hf_items(train, path), train, (None if val is None else self._audio_table(val, path))

    def _audio_table(self, table: Any, path: Path) -> Any:
        """Checks the columns and turns off `datasets`' own audio decoding (we decode with soundfile)."""
        import datasets

        hf.require_column(table, self.audio_column, path, "audio")
        if self.labels == "class":
            if not self.label_column:
                raise DataError("labels=class with a `datasets` input needs data.label_column")
            hf.require_column(table, self.label_column, path, "label")
        if self.labels == "transcript":
            if not self.transcript_column:
                raise DataError("labels=transcript with a `datasets` input needs data.transcript_column")
            hf.require_column(table, self.transcript_column, path, "transcript")
        if isinstance(table.features[self.audio_column], datasets.Audio):
            table = table.cast_column(self.audio_column, datasets.Audio(decode=False))
        return table

    def _hf_items(self, table: Any, path: Path) -> list[AudioItem]:
        n = len(table)
        labels: list[Any] = [None] * n
        texts: list[Any] = [None] * n
        if self.labels == "class":
            feature = table.features[self.label_column]
            labels = [None if v is None else str(v) for v in table[self.label_column]]
            if hasattr(feature, "names"):  # ClassLabel: keep the names, not the ids
                labels = [None if v is None else feature.names[int(v)] for v in table[self.label_column]]
        if self.labels == "transcript":
            texts = list(table[self.transcript_column])
        return [AudioItem(name=f"{path}[{i}]", row=i, label=labels[i], transcript=texts[i]) for i in range(n)]

    # -- validation ------------------------------------------------------------------------------

    def _probe(self, items: list[AudioItem], rows: Any, base: Path) -> list[AudioItem]:
        """Header check + lengths at the target rate + length filters; returns the usable items."""

        def one(item: AudioItem) -> AudioItem | tuple[AudioItem, SkipItem]:
            try:
                src = item.path if item.path is not None else hf_source(rows[item.row][self.audio_column], base)
                info = probe_audio(src)
            except SkipItem as e:
                return item, e
            return replace(item, num_samples=info.length_at(self.sample_rate))

        with ThreadPoolExecutor(max(1, self.probe_threads)) as pool:
            results = list(progress(pool.map(one, items), desc="checking audio", total=len(items)))
        usable = []
        for res in results:
            if isinstance(res, tuple):
                self.skips.skip(res[0].name, res[1].reason, res[1].detail)
                continue
            reason = self._length_problem(res.num_samples)
            if reason:
                self.skips.skip(res.name, *reason)
            elif self.labels and (res.label if self.labels == "class" else res.transcript) in (None, ""):
                self.skips.skip(res.name, "bad_label", f"no {self.labels} for this file")
            else:
                usable.append(res)
        return usable

    def _length_problem(self, n: int) -> tuple[str, str] | None:
        if n < self.min_sample_size:
            why = "the CNN's receptive field" if n < self.receptive_field else "min_sample_size"
            return "too_short", f"{n} samples at {self.sample_rate} Hz < {self.min_sample_size} ({why})"
        if self.max_length is not None and n > self.max_length:
            return "too_long", f"{n} samples > max_length {self.max_length}"
        return None

    # -- setup -----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._is_setup:
            return
        items, rows, val_rows = self._discover(self.path)
        base = Path(self.path).expanduser()
        base = base if base.is_dir() else base.parent
        items = self._probe(items, rows, base)
        if not items:
            raise no_usable_files(self.path, self._looked_for(), self.skips.counts())
        val_items: list[AudioItem]
        if self.val_path:
            val_items, val_rows, _ = self._discover(self.val_path)
            vbase = Path(self.val_path).expanduser()
            val_items = self._probe(val_items, val_rows, vbase if vbase.is_dir() else vbase.parent)
        elif val_rows is not None:
            val_items = self._probe(self._hf_items(val_rows, base), val_rows, base)
        else:
            tr, va = seeded_split(len(items), self.val_fraction, self.seed)
            items, val_items = [items[i] for i in tr], [items[i] for i in va]
            val_rows = rows
        class_index = self._build_targets(items)
        if class_index is not None:
            dropped = [it for it in val_items if it.label not in class_index]
            for it in dropped:
                self.skips.skip(it.name, "bad_label", f"class {it.label!r} is not in the training set")
            val_items = [it for it in val_items if it.label in class_index]
        self.train_set = self._dataset(items, rows, base, class_index)
        self.val_set = self._dataset(val_items, val_rows, base, class_index)
        self._is_setup = True
        log.info("audio: %d train / %d val utterances; skipped %s", len(items), len(val_items), self.skip_counts())

    def _looked_for(self) -> list[str]:
        return [f"*{e} (recursive)" for e in self.extensions] + ["fairseq .tsv manifest", "saved `datasets` dir"]

    def _build_targets(self, items: list[AudioItem]) -> dict[str, int] | None:
        if self.labels == "class":
            self.classes = sorted({it.label for it in items if it.label is not None})
            return {c: i for i, c in enumerate(self.classes)}
        if self.labels == "transcript":
            self.vocab = CharVocab.build([it.transcript or "" for it in items])
        return None

    def _dataset(self, items: list[AudioItem], rows: Any, base: Path, class_index: Any) -> AudioDataset:
        tracker = SkipTracker(self.strict)
        tracker.attach(len(items))
        if rows is not None:
            rows = rows.select_columns([self.audio_column])
        return AudioDataset(
            items,
            tracker,
            rows=rows,
            rows_base=base,
            audio_column=self.audio_column,
            sample_rate=self.sample_rate,
            normalize=self.normalize,
            min_sample_size=self.min_sample_size,
            max_sample_size=self.max_sample_size,
            batching=self.batching,
            class_index=class_index,
            vocab=self.vocab,
            seed=self.seed,
        )

    # -- loaders ---------------------------------------------------------------------------------

    def batch_sampler(self, dataset: AudioDataset, train: bool) -> LengthBucketBatchSampler:  # type: ignore[override]
        world, rank = self.world()
        return LengthBucketBatchSampler(
            None,
            lengths=dataset.lengths(),
            max_tokens=self.max_tokens,
            max_batch_size=self.max_batch_size,
            shuffle=train,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )

    collate_fn = staticmethod(collate_audio)  # type: ignore[assignment]
