"""Image data: an image folder (class sub-folders optional) or a local `datasets` image column.

Every image becomes 8-bit RGB whatever its mode (grey, palette, RGBA/LA composited on white, CMYK,
16-bit scaled down), then goes through the torchvision v2 recipe of data2vec v1 or 2.0 (training)
or the evaluation transform (validation). Files are checked up front with PIL's `verify()`; a file
that still fails to decode later is skipped and counted inside the worker.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from d2v_train.data import hf
from d2v_train.data.collate import collate_images
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
from d2v_train.data.resumable import cpu_rng_restored, seed_cpu_rng
from d2v_train.data.samplers import mix_seed

log = logging.getLogger("d2v_train.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on `background` (not dropped: transparent
    pixels often hold arbitrary colours); 16/32-bit integer images are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I;16*, I: 16-bit data, scaled 0..65535 -> 0..255
        arr = np.asarray(img).astype(np.float32)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float32)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _open(source: str | bytes) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def verify_image(source: str | bytes) -> None:
    """Cheap structural check (no full decode): raises SkipItem for non-images and broken files."""
    try:
        with _open(source) as img:
            img.verify()
    except UnidentifiedImageError:
        raise SkipItem("not_an_image", "PIL cannot identify this file as an image") from None
    except Exception as e:
        raise SkipItem("unreadable", f"broken image: {type(e).__name__}: {e}") from None


def load_rgb(source: str | bytes) -> Image.Image:
    """Fully decode (truncated files raise here) and convert to RGB."""
    try:
        with _open(source) as img:
            img.load()
            return to_rgb(img)
    except UnidentifiedImageError:
        raise SkipItem("not_an_image", "PIL cannot identify this file as an image") from None
    except OSError as e:
        raise SkipItem("unreadable", f"cannot decode image: {e}") from None


# ------------------------------------------------------------------------------------ transforms


def build_transform(
    recipe: str,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    rand_augment_ops: int = 0,
    rand_augment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """`v1` (RandomResizedCrop 0.08-1 bicubic, flip, colour jitter 0.4), `v2` (0.2-1, flip), or `eval`
    (resize to size/0.875, centre crop); all end in float tensors normalised by `mean`/`std`.

    Fine-tuning extras (data2vec / BEiT image fine-tuning, timm's `create_transform`), training
    recipes only: `rand_augment_ops > 0` adds RandAugment (`num_ops`, `magnitude`; timm's
    rand-m9-mstd0.5-inc1 is 2 ops at magnitude 9; bilinear, which tensor inputs allow) after the
    flip and, as in timm, replaces the colour jitter; `random_erasing > 0` erases a random box with
    per-pixel normal noise (timm's `reprob` with `remode=pixel`) after normalisation.
    """
    bicubic = T.InterpolationMode.BICUBIC
    train = recipe in ("v1", "v2")
    randaug = (
        [T.RandAugment(num_ops=rand_augment_ops, magnitude=rand_augment_magnitude, interpolation=T.InterpolationMode.BILINEAR)]
        if train and rand_augment_ops > 0 else []
    )  # fmt: skip
    erase = [T.RandomErasing(p=random_erasing, value="random")] if train and random_erasing > 0 else []
    if recipe == "v1":
        aug = [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic, antialias=True),
            T.RandomHorizontalFlip(),
            *(randaug or [T.ColorJitter(0.4, 0.4, 0.4)]),
        ]
    elif recipe == "v2":
        aug = [T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic, antialias=True), T.RandomHorizontalFlip(), *randaug]
    elif recipe == "eval":
        aug = [T.Resize(int(round(image_size / 0.875)), interpolation=bicubic, antialias=True), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"data.recipe must be v1, v2 or eval, got {recipe!r}")
    return T.Compose([T.ToImage(), *aug, T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std)), *erase])


# ------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ImageItem:
    name: str
    path: str | None = None
    row: int | None = None
    label: str | None = None


class ImageDataset(SafeDataset):
    """Decoded, transformed images. torchvision's random augmentations take no generator, so for each
    item the global CPU generator is reseeded from the batch's seed (`IndexBatch.seed`) and the item's
    index, and put back after the batch: augmentations are the same with any number of workers and
    after a resume, and the caller's (or worker's) random stream is left as it was."""

    def __init__(
        self,
        items: list[ImageItem],
        skips: SkipTracker,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        rows: Any = None,
        image_column: str = "image",
        class_index: dict[str, int] | None = None,
    ) -> None:
        super().__init__(skips)
        self.items = items
        self.transform = transform
        self.rows = rows
        self.image_column = image_column
        self.class_index = class_index
        self._batch_seed: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        return self.items[index].name

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        seed = getattr(indices, "seed", None)
        if seed is None:  # plain index lists: the global RNG, as torchvision does
            return super().__getitems__(indices)
        with cpu_rng_restored():
            self._batch_seed = int(seed)
            try:
                return super().__getitems__(indices)
            finally:
                self._batch_seed = None

    def load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        if self._batch_seed is not None:  # torchvision v2 transforms draw from the global CPU RNG
            seed_cpu_rng(mix_seed(self._batch_seed, index))
        out: dict[str, Any] = {"inputs": self.transform(load_rgb(image_source(item, self.rows, self.image_column)))}
        if self.class_index is not None:
            out["labels"] = self.class_index[item.label]  # type: ignore[index]
        return out


def image_source(item: ImageItem, rows: Any, column: str) -> str | bytes:
    if item.path is not None:
        return item.path
    cell = rows[item.row][column]
    if isinstance(cell, str):
        return cell
    if cell.get("bytes"):
        return cell["bytes"]
    if cell.get("path") and os.path.exists(cell["path"]):
        return cell["path"]
    raise SkipItem("missing", "row has neither image bytes nor an existing path")


def scan_images(folder: Path, extensions: Sequence[str]) -> list[ImageItem]:
    """Recursive scan; when every image sits in a first-level sub-folder, that folder is its class."""
    exts = {e.lower() for e in extensions}
    paths = sorted(p for p in progress(folder.rglob("*"), desc=f"scanning {folder}") if p.suffix.lower() in exts and p.is_file())
    rels = [p.relative_to(folder) for p in paths]
    classed = bool(rels) and all(len(r.parts) > 1 for r in rels)
    return [ImageItem(name=str(p), path=str(p), label=r.parts[0] if classed else None) for p, r in zip(paths, rels)]


# --------------------------------------------------------------------------------- data module


class ImageDataModule(BaseDataModule):
    """Pixel batches `(B, 3, image_size, image_size)`; labels when classes are known (`classes`)."""

    modality = "vision"

    def __init__(
        self,
        path: str,
        *,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        train_split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        image_size: int = 224,
        recipe: str = "v1",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        rand_augment_ops: int = 0,
        rand_augment_magnitude: int = 9,
        random_erasing: float = 0.0,
        validate: bool = True,
        validate_threads: int = 8,
        batch_size: int = 64,
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
        self.path = path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.extensions = tuple(extensions)
        self.train_split = train_split
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        self.train_transform = build_transform(
            recipe, image_size, mean, std, rand_augment_ops=rand_augment_ops,
            rand_augment_magnitude=rand_augment_magnitude, random_erasing=random_erasing,
        )  # fmt: skip
        self.eval_transform = build_transform("eval", image_size, mean, std)
        self.validate = validate
        self.validate_threads = validate_threads
        self.classes: list[str] | None = None

    def _discover(self, location: str) -> tuple[list[ImageItem], Any, tuple[list[ImageItem], Any] | None]:
        """(items, datasets table or None, (validation items, table) when the source has a split)."""
        path = Path(location).expanduser()
        if not path.exists():
            raise DataError(f"data.path {path} does not exist")
        if hf.is_hf_input(path):
            train, val = hf.load_local(path, self.train_split)
            val_pair = None if val is None else (self._hf_items(val, path), self._table(val, path))
            return self._hf_items(train, path), self._table(train, path), val_pair
        if path.is_dir():
            return scan_images(path, self.extensions), None, None
        return [ImageItem(name=str(path), path=str(path))], None, None

    def _table(self, table: Any, path: Path) -> Any:
        import datasets

        hf.require_column(table, self.image_column, path, "image")
        if isinstance(table.features[self.image_column], datasets.Image):
            table = table.cast_column(self.image_column, datasets.Image(decode=False))
        return table.select_columns([self.image_column])

    def _hf_items(self, table: Any, path: Path) -> list[ImageItem]:
        labels: list[Any] = [None] * len(table)
        if self.label_column and self.label_column in table.column_names:
            feature = table.features[self.label_column]
            raw = table[self.label_column]
            labels = [None if v is None else (feature.names[int(v)] if hasattr(feature, "names") else str(v)) for v in raw]
        return [ImageItem(name=f"{path}[{i}]", row=i, label=labels[i]) for i in range(len(table))]

    def _check(self, items: list[ImageItem], rows: Any) -> list[ImageItem]:
        if not self.validate:
            return items

        def one(item: ImageItem) -> SkipItem | None:
            try:
                verify_image(image_source(item, rows, self.image_column))
            except SkipItem as e:
                return e
            return None

        with ThreadPoolExecutor(max(1, self.validate_threads)) as pool:
            problems = list(progress(pool.map(one, items), desc="checking images", total=len(items)))
        usable = []
        for item, problem in zip(items, problems):
            if problem is None:
                usable.append(item)
            else:
                self.skips.skip(item.name, problem.reason, problem.detail)
        return usable

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        items, rows, val_pair = self._discover(self.path)
        items = self._check(items, rows)
        if not items:
            raise no_usable_files(self.path, [f"*{e} (recursive)" for e in self.extensions] + ["saved `datasets` dir"], self.skips.counts())
        if self.val_path:
            val_items, val_rows, _ = self._discover(self.val_path)
            val_items = self._check(val_items, val_rows)
        elif val_pair is not None:
            val_items, val_rows = val_pair
            val_items = self._check(val_items, val_rows)
        else:
            tr, va = seeded_split(len(items), self.val_fraction, self.seed)
            items, val_items, val_rows = [items[i] for i in tr], [items[i] for i in va], rows
        class_index = None
        if all(it.label is not None for it in items):
            self.classes = sorted({it.label for it in items})  # type: ignore[misc]
            class_index = {c: i for i, c in enumerate(self.classes)}
            val_items = [it for it in val_items if it.label in class_index]
        self.train_set = self._dataset(items, rows, self.train_transform, class_index)
        self.val_set = self._dataset(val_items, val_rows, self.eval_transform, class_index)
        log.info("images: %d train / %d val; skipped %s", len(items), len(val_items), self.skip_counts())

    def _dataset(self, items: list[ImageItem], rows: Any, transform: Any, class_index: Any) -> ImageDataset:
        tracker = SkipTracker(self.strict)
        tracker.attach(len(items))
        return ImageDataset(items, tracker, transform, rows=rows, image_column=self.image_column, class_index=class_index)

    collate_fn = staticmethod(collate_images)  # type: ignore[assignment]
