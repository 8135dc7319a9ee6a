"""Image pipeline and the digits default: RGB conversion of every mode, bad files, transforms."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v_train.data import DataError, DigitsDataModule, ImageDataModule, build_transform
from d2v_train.data.image import load_rgb, to_rgb

RNG = np.random.default_rng(0)


def rgb_array(h: int = 40, w: int = 48) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


MODES = {
    "grey.png": lambda: Image.fromarray(rgb_array()[..., 0], "L"),
    "palette.gif": lambda: Image.fromarray(rgb_array()).convert("P"),
    "rgba.png": lambda: Image.fromarray(RNG.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA"),
    "cmyk.jpg": lambda: Image.fromarray(RNG.integers(0, 256, (40, 48, 4), dtype=np.uint8), "CMYK"),
    "deep.png": lambda: Image.fromarray(RNG.integers(0, 65536, (40, 48)).astype(np.uint16)),
    "bilevel.bmp": lambda: Image.fromarray(rgb_array()[..., 0] > 128),
    "rgb.jpg": lambda: Image.fromarray(rgb_array()),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for i, (name, make) in enumerate(MODES.items()):
        (root / ("cats" if i % 2 else "dogs")).mkdir(parents=True, exist_ok=True)
        make().save(root / ("cats" if i % 2 else "dogs") / name)
    return root


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_becomes_rgb(tmp_path: Path, name: str) -> None:
    MODES[name]().save(tmp_path / name)
    img = load_rgb(str(tmp_path / name))
    assert img.mode == "RGB" and img.size == (48, 40)


def test_16bit_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # mid-grey in 16 bits
    assert to_rgb(img).getpixel((0, 0)) == (128, 128, 128)


def test_rgba_composited_on_white() -> None:
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_folder_with_classes_and_bad_files(folder: Path) -> None:
    good = (folder / "dogs" / "rgb.jpg").read_bytes()
    (folder / "dogs" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "cats" / "fake.png").write_text("this is not an image")
    dm = ImageDataModule(str(folder), image_size=32, batch_size=16, val_fraction=0.0)
    dm.setup()
    assert dm.classes == ["cats", "dogs"]
    assert dm.skip_counts() == {"not_an_image": 1}  # verify() catches this one up front
    batches = list(dm._loader(dm.train_set, train=False))
    assert sum(len(b["inputs"]) for b in batches) == len(MODES)  # truncated skipped at decode time
    assert dm.skip_counts() == {"not_an_image": 1, "unreadable": 1}
    b = batches[0]
    assert b["inputs"].shape[1:] == (3, 32, 32) and b["labels"].dtype == torch.long and b["padding_mask"] is None
    with pytest.raises(DataError, match=r"fake\.png: not_an_image"):
        ImageDataModule(str(folder), image_size=32, strict=True).setup()


def test_empty_folder_names_extensions(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"no usable files in .*x .*\.jpg.*\.png"):
        ImageDataModule(str(tmp_path / "x")).setup()


def test_unlabelled_folder(tmp_path: Path) -> None:
    for i in range(3):
        MODES["rgb.jpg"]().save(tmp_path / f"{i}.jpg")
    dm = ImageDataModule(str(tmp_path), image_size=16, batch_size=2, val_fraction=0.0)
    dm.setup()
    assert dm.classes is None and "labels" not in next(iter(dm.train_dataloader()))


def test_datasets_image_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import io

    def png(make) -> bytes:
        buf = io.BytesIO()
        make().save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"bytes": png(MODES["rgb.jpg"]), "path": None}, {"bytes": png(MODES["rgba.png"]), "path": None}, {"bytes": b"junk", "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows, "label": [0, 1, 1]}).cast_column("image", datasets.Image(decode=False))
    ds = ds.cast_column("label", datasets.ClassLabel(names=["a", "b"]))
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = ImageDataModule(str(tmp_path / "saved"), image_size=16, batch_size=2, val_fraction=0.0)
    dm.setup()
    assert dm.skip_counts() == {"not_an_image": 1} and dm.classes == ["a", "b"]
    assert next(iter(dm.train_dataloader()))["inputs"].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("recipe", ["v1", "v2", "eval"])
def test_recipes(recipe: str) -> None:
    t = build_transform(recipe, 24)
    x = t(Image.fromarray(rgb_array(60, 80)))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    with pytest.raises(ValueError):
        build_transform("v3", 24)


def test_digits_fast_seeded_labelled() -> None:
    start = time.perf_counter()
    dm = DigitsDataModule(image_size=32, batch_size=32)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert time.perf_counter() - start < 5
    assert b["inputs"].shape == (32, 3, 32, 32) and b["labels"].shape == (32,) and b["padding_mask"] is None
    assert len(dm.train_set) + len(dm.val_set) == 1797 and dm.skip_counts() == {}
    again = DigitsDataModule(image_size=32)
    again.setup()
    assert torch.equal(again.val_set.labels, dm.val_set.labels)
    few = DigitsDataModule(labels_per_class=5)
    few.setup()
    assert len(few.train_set) == 50 and torch.bincount(few.train_set.labels).tolist() == [5] * 10
    assert abs(float(dm.train_set.images.mean())) < 1e-3
