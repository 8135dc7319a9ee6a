"""Collators: lists of items -> the batch contract in docs/CONTRACTS.md.

`{"inputs": Tensor, "padding_mask": BoolTensor | None, "labels": Tensor (optional)}`; padding_mask
True = padding. Class labels are `(B,)` long; sequence labels (CTC transcripts) are `(B, L)` long
padded with `LABEL_PAD` (-100, ignored by the losses).
"""

from __future__ import annotations

from typing import Any

import torch

LABEL_PAD = -100


def pad_1d(seqs: list[torch.Tensor], value: float | int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad 1-D tensors to the longest; mask is None when nothing was padded."""
    lengths = torch.tensor([len(s) for s in seqs])
    longest = int(lengths.max())
    out = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
    if bool((lengths == longest).all()):
        return out, None
    mask = torch.arange(longest)[None, :] >= lengths[:, None]
    return out, mask


def collate_labels(items: list[dict[str, Any]]) -> torch.Tensor | None:
    """Stack class labels or pad label sequences; None when items carry no labels."""
    labels = [it.get("labels") for it in items]
    if any(lab is None for lab in labels):
        return None
    first = labels[0]
    if isinstance(first, torch.Tensor) and first.dim() == 1:
        return pad_1d([torch.as_tensor(lab, dtype=torch.long) for lab in labels], LABEL_PAD)[0]
    return torch.as_tensor([int(lab) for lab in labels], dtype=torch.long)


def _with_labels(batch: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    labels = collate_labels(items)
    if labels is not None:
        batch["labels"] = labels
    return batch


def collate_audio(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Waveforms `(B, S)`; equal lengths (crop-to-shortest) stack with `padding_mask=None`."""
    inputs, mask = pad_1d([it["inputs"] for it in items], 0.0)
    return _with_labels({"inputs": inputs, "padding_mask": mask}, items)


class TokenCollator:
    """Token ids `(B, L)` padded with the tokenizer's pad id (picklable for worker processes)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        inputs, mask = pad_1d([it["inputs"] for it in items], self.pad_id)
        return _with_labels({"inputs": inputs, "padding_mask": mask}, items)


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pixels `(B, 3, H, W)`; images never need padding."""
    inputs = torch.stack([it["inputs"] for it in items])
    return _with_labels({"inputs": inputs, "padding_mask": None}, items)
