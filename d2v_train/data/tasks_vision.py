"""Labelled vision data for the dense heads: digit scenes with exact per-pixel masks.

`DigitScenesDataModule` (``data=digit_scenes``) pastes 2-4 of scikit-learn's real 8x8 handwritten
digits, each scaled and placed at random inside its own cell of a larger canvas, on a smooth noisy
background. The mask is known exactly because we did the pasting: ``digit class + 1`` on the pixels
the digit covers, 0 (background) elsewhere. Everything is built in one vectorised ``grid_sample``
call per split from a seeded generator, so it needs only pip, takes well under a second and is the
same for a given seed. Train and validation scenes use disjoint digit images (unseen handwriting).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from d2v_train.data.common import BaseDataModule, seeded_split

__all__ = ["DigitScenesDataModule", "compose_scenes"]


def _background(n: int, size: int, g: torch.Generator) -> Tensor:
    """Coloured, textured backgrounds in [0, 0.45]: low-resolution noise upsampled (blotches), a random
    linear gradient, and fine pixel noise, so "background" is not just a constant colour."""
    blotch = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    ramp = torch.linspace(-1, 1, size)
    angle = torch.rand(n, generator=g) * 2 * torch.pi
    grad = torch.cos(angle)[:, None, None] * ramp[None, None, :] + torch.sin(angle)[:, None, None] * ramp[None, :, None]
    fine = torch.rand(n, 1, size, size, generator=g)
    bg = 0.2 * blotch.clamp(0, 1) + 0.08 * (grad[:, None] + 1) + 0.1 * fine
    return bg.clamp(0, 0.45)


def compose_scenes(
    digits: Tensor, labels: Tensor, num_scenes: int, size: int, g: torch.Generator, min_digits: int = 2, max_digits: int = 4,
    threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """(images ``(N, 3, size, size)`` in [0, 1], masks ``(N, size, size)`` long) from 8x8 ``digits``.

    The canvas is a 2x2 grid of cells; each scene fills ``min_digits..max_digits`` random cells with a
    random digit scaled to 55-95 % of the cell and shifted at random inside it (cells keep digits from
    overlapping, so every mask pixel has one owner). A pixel belongs to a digit where the resampled
    ink is above ``threshold`` of full intensity; the digit's colour is blended in by that ink, so the
    mask follows the visible stroke.
    """
    slots = 4
    n, cell = num_scenes, 1.0  # normalised coordinates: the canvas spans [-1, 1], a cell is 1 wide
    # which cells hold a digit: the first k of a random permutation of the 4 cells
    k = torch.randint(min_digits, max_digits + 1, (n,), generator=g)
    order = torch.rand(n, slots, generator=g).argsort(dim=1)
    present = torch.zeros(n, slots, dtype=torch.bool).scatter_(1, order, torch.arange(slots)[None, :] < k[:, None])
    pick = torch.randint(0, len(digits), (n, slots), generator=g)
    scale = 0.55 + 0.4 * torch.rand(n, slots, generator=g)  # digit side / cell side
    centre_x = torch.tensor([-0.5, 0.5, -0.5, 0.5]) + (1 - scale) * cell / 2 * (2 * torch.rand(n, slots, generator=g) - 1)
    centre_y = torch.tensor([-0.5, -0.5, 0.5, 0.5]) + (1 - scale) * cell / 2 * (2 * torch.rand(n, slots, generator=g) - 1)
    # grid_sample maps canvas coordinates to the digit's [-1, 1]: x_digit = (x - cx) / half_side
    half = scale * cell / 2
    theta = torch.zeros(n * slots, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = (1 / half).reshape(-1)
    theta[:, 0, 2] = (-centre_x / half).reshape(-1)
    theta[:, 1, 2] = (-centre_y / half).reshape(-1)
    grid = F.affine_grid(theta, [n * slots, 1, size, size], align_corners=False)
    ink = F.grid_sample(digits[pick.reshape(-1), None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ink = ink.reshape(n, slots, size, size) * present[:, :, None, None]
    colour = 0.6 + 0.4 * torch.rand(n, slots, 3, generator=g)  # bright strokes on a darker background
    alpha, owner = ink.max(dim=1)  # cells do not overlap: at most one digit has ink at a pixel
    stroke = torch.einsum("nshw,nsc->nchw", ink, colour).clamp(0, 1)
    images = _background(n, size, g) * (1 - alpha[:, None]) + stroke * alpha[:, None].clamp(max=1)
    cls = labels[pick].gather(1, owner.reshape(n, -1)).reshape(n, size, size)
    masks = torch.where(alpha > threshold, cls + 1, torch.zeros_like(cls))
    return images.clamp(0, 1), masks.long()


class SegmentationScenes(Dataset):
    """In-memory images ``(N, 3, H, W)`` and masks ``(N, H, W)``."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"inputs": self.images[index], "labels": self.masks[index]}


def collate_segmentation(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pixels ``(B, 3, H, W)`` and masks ``(B, H, W)`` (images never need padding)."""
    return {
        "inputs": torch.stack([it["inputs"] for it in items]),
        "padding_mask": None,
        "labels": torch.stack([it["labels"] for it in items]),
    }


class DigitScenesDataModule(BaseDataModule):
    """Semantic segmentation scenes of real handwritten digits; ``classes`` = background + 0-9.

    Args:
        image_size: canvas side (the encoder's image size).
        num_train / num_val: scenes per split.
        min_digits / max_digits: digits per scene (2-4 cells of a 2x2 grid).
        val_fraction: share of the 1,797 digit images kept for validation scenes only.
    """

    modality = "vision"

    def __init__(
        self,
        *,
        image_size: int = 32,
        num_train: int = 2000,
        num_val: int = 300,
        min_digits: int = 2,
        max_digits: int = 4,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, strict=strict, seed=seed)  # fmt: skip
        if not 1 <= min_digits <= max_digits <= 4:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 4, got {min_digits}, {max_digits}")
        self.image_size = image_size
        self.num_train, self.num_val = num_train, num_val
        self.min_digits, self.max_digits = min_digits, max_digits
        self.val_fraction = val_fraction
        self.classes: list[str] = ["background"] + [str(i) for i in range(10)]
        self.mean = self.std = 0.0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        tr, va = seeded_split(len(y), self.val_fraction, self.seed)
        g = torch.Generator().manual_seed(self.seed)
        size, lo, hi = self.image_size, self.min_digits, self.max_digits
        train_x, train_m = compose_scenes(x[tr], y[tr], self.num_train, size, g, lo, hi)
        val_x, val_m = compose_scenes(x[va], y[va], self.num_val, size, g, lo, hi)
        self.mean, self.std = float(train_x.mean()), float(train_x.std())
        self.train_set = SegmentationScenes((train_x - self.mean) / self.std, train_m)
        self.val_set = SegmentationScenes((val_x - self.mean) / self.std, val_m)

    collate_fn = staticmethod(collate_segmentation)  # type: ignore[assignment]
