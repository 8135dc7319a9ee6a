"""``preprocessor_config.json`` for an export: what transformers' ``AutoImageProcessor`` /
``AutoFeatureExtractor`` (and every vision / audio ``pipeline()``) need to feed the model exactly
what the run's data module fed it.

Vision: a ``BeitImageProcessor`` (the class transformers pairs with data2vec-vision).
- ``data=image`` (``ImageDataModule``): the evaluation recipe, i.e. the shorter side resized to
  ``image_size / 0.875`` (bicubic), a centre crop of ``image_size``, then the data config's
  mean / std. transformers' torchvision backend runs the very same resize.
- ``data=digits`` / the segmentation scenes: pixels in [0, 1] resized (bilinear) to
  ``image_size`` and standardised with the statistics the data module fitted on its training split
  (one scalar mean / std, repeated per channel); read from the live data module, or recomputed
  from the run's data config (in memory, seeded, under a second).
- unknown data (an imported model): the ``data=image`` defaults (ImageNet mean / std).

Audio: a ``Wav2Vec2FeatureExtractor``: 16 kHz mono (the data's ``sample_rate``), per-utterance
zero-mean / unit-variance normalisation when the data normalised (``data.normalize``, else the
encoder's ``do_normalize``), and an attention mask (the encoder handles padding).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Optional

from torch import nn

from .run_record import RunRecord

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
# data modules that standardise with statistics fitted at setup (not written in their config)
FITTED = ("DigitsDataModule", "DigitScenesDataModule")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
EVAL_CROP_FRACTION = 0.875  # ImageDataModule's eval recipe: resize to size / 0.875, centre crop
# PIL resampling codes, as transformers' configs store them
BILINEAR, BICUBIC = 2, 3


def _target(data: dict[str, Any]) -> str:
    return str(data.get("_target_", ""))


def fitted_statistics(record: RunRecord) -> Optional[tuple[float, float]]:
    """(mean, std) of a data module that fits them at setup: from the live module when the export
    runs inside the run, else by rebuilding it from the run's data config."""
    live = record.datamodule
    if live is not None and isinstance(getattr(live, "mean", None), float) and getattr(live, "std", 0.0):
        return float(live.mean), float(live.std)
    data = record.data
    target = _target(data)
    if not target.endswith(FITTED) or data.get("path"):
        return None
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
        kwargs.update(num_workers=0, persistent_workers=False, pin_memory=False)
        module = cls(**kwargs)
        module.setup("fit")
    except Exception as err:  # noqa: BLE001 - the export goes on with the defaults, and says so
        log.warning("cannot recompute the %s statistics (%s); the preprocessor uses the defaults", class_name, err)
        return None
    return float(module.mean), float(module.std)


def _image_size(encoder: nn.Module) -> tuple[int, int]:
    size = encoder.config.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def image_processor(encoder: nn.Module, record: RunRecord) -> tuple[dict[str, Any], str]:
    """(``BeitImageProcessor`` settings, one line saying where they came from)."""
    height, width = _image_size(encoder)
    channels = int(getattr(encoder.config, "num_channels", 3))
    base = {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_reduce_labels": False,
        "size": {"height": height, "width": width},
        "do_center_crop": False,
        "crop_size": {"height": height, "width": width},
    }
    data = record.data
    stats = fitted_statistics(record)
    if stats is not None:
        mean, std = stats
        base.update(resample=BILINEAR, image_mean=[mean] * channels, image_std=[std] * channels)
        return base, (f"{_target(data).rsplit('.', 1)[-1] or 'data'}: pixels in [0, 1] resized (bilinear) to "
                      f"{height}x{width}, standardised with the training split's mean {mean:.4f} / std {std:.4f}")
    known = _target(data).endswith(("ImageDataModule", "DigitsDataModule"))
    mean = [float(v) for v in data.get("mean") or IMAGENET_MEAN]
    std = [float(v) for v in data.get("std") or IMAGENET_STD]
    resize = int(round(min(height, width) / EVAL_CROP_FRACTION))
    base.update(resample=BICUBIC, image_mean=mean, image_std=std, size={"shortest_edge": resize}, do_center_crop=True)
    where = "the run's data config" if known else "the data=image defaults (the run's data settings are unknown)"
    return base, (f"shorter side resized (bicubic) to {resize}, centre crop {height}x{width}, mean {mean} / std {std} "
                  f"from {where}")


def feature_extractor(encoder: nn.Module, record: RunRecord) -> tuple[dict[str, Any], str]:
    """(``Wav2Vec2FeatureExtractor`` settings, one line saying where they came from)."""
    data = record.data
    normalize = data.get("normalize")
    if not isinstance(normalize, bool):
        normalize = bool(getattr(encoder.config, "do_normalize", True))
    rate = int(data.get("sample_rate") or 16000)
    settings = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": rate,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": normalize,
        "return_attention_mask": True,
    }
    where = "the run's data config" if data else "the encoder config"
    what = "zero mean / unit variance per utterance" if normalize else "raw waveform (no normalisation)"
    return settings, f"{rate} Hz mono waveform, {what}, from {where}"


def preprocessor_config(encoder: nn.Module, record: RunRecord) -> Optional[tuple[dict[str, Any], str]]:
    """The preprocessor settings for ``encoder``'s modality (None for text: it has a tokenizer)."""
    if encoder.modality == "vision":
        return image_processor(encoder, record)
    if encoder.modality == "audio":
        return feature_extractor(encoder, record)
    return None
