"""LightningDataModules for audio, text and images, plus embedded defaults (digits, docstrings, speech).

Every module yields the batch contract of docs/CONTRACTS.md (`{"inputs", "padding_mask", "labels"?}`),
carries `modality`, and exposes `skip_counts()` (reason -> files skipped) for the run's metrics.
Training loaders are `ResumableDataLoader`s: a run resumed from a mid-epoch checkpoint sees exactly
the batches (items, crops, augmentations) the uninterrupted run would have seen (see `resumable.py`).
"""

from d2v_train.data.audio import AudioDataModule
from d2v_train.data.common import SKIP_REASONS, DataError, ProbeSets, SkipTracker
from d2v_train.data.embedded import DigitsDataModule, DocstringsDataModule, SpeechDataModule
from d2v_train.data.image import ImageDataModule, build_transform
from d2v_train.data.resumable import ResumableDataLoader
from d2v_train.data.samplers import EpochBatchSampler, IndexBatch, LengthBucketBatchSampler
from d2v_train.data.text import TextDataModule

__all__ = [
    "SKIP_REASONS",
    "AudioDataModule",
    "DataError",
    "DigitsDataModule",
    "DocstringsDataModule",
    "EpochBatchSampler",
    "ImageDataModule",
    "IndexBatch",
    "LengthBucketBatchSampler",
    "ProbeSets",
    "ResumableDataLoader",
    "SkipTracker",
    "SpeechDataModule",
    "TextDataModule",
    "build_transform",
]
