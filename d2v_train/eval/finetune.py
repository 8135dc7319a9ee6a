"""A fixed-budget fine-tune on a probe task: the third column of ``d2v-eval``'s table.

It is ``d2v-finetune``'s machinery (``build_head``, ``FineTuning``: layer-wise lr decay, label
smoothing, the same optimizer and schedule) run for a small fixed number of updates on a few-label
subset of ``ProbeSets.train``, scored on ``ProbeSets.val``. A fixed budget (not "until the best
epoch") keeps the pretrained and random-init rows comparable and the table cheap.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from d2v_train.data.common import ProbeSets

__all__ = ["FinetuneBudget", "CLASSIFICATION_HEAD", "finetune_accuracy"]

log = logging.getLogger("d2v_train.eval")

# the classification head of each modality (d2v-finetune's names)
CLASSIFICATION_HEAD = {"vision": "image_classification", "audio": "sequence_classification", "text": "sequence_classification"}


@dataclass
class FinetuneBudget:
    """Fine-tuning settings of ``d2v-eval`` (``finetune.*`` in configs/eval.yaml)."""

    max_steps: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    layer_decay: float = 0.75
    label_smoothing: float = 0.1


def finetune_accuracy(
    encoder: nn.Module,
    probe: ProbeSets,
    train_indices: Sequence[int],
    budget: FinetuneBudget,
    *,
    seed: int = 0,
    accelerator: str = "cpu",
) -> float:
    """Val accuracy after fine-tuning a copy of ``encoder`` + a new classification head for
    ``budget.max_steps`` updates on ``probe.train[train_indices]`` (every example used: partial
    batches are kept)."""
    import lightning as L

    from d2v_train.lightning.finetune import FineTuning
    from d2v_train.lightning.pretrained import rebuild_encoder
    from d2v_train.models.heads import build_head

    modality = str(getattr(encoder, "modality"))
    task = CLASSIFICATION_HEAD[modality]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = copy.deepcopy(encoder).cpu().train()
        if modality == "vision":  # what d2v-finetune's image head does: pool the patches (BEiT)
            enc = rebuild_encoder(enc, {"use_mean_pooling": True})
        model = build_head(task, enc, num_labels=int(probe.num_classes))
        module = FineTuning(
            model, task,
            optim={"lr": budget.lr, "weight_decay": budget.weight_decay, "warmup_ratio": budget.warmup_ratio,
                   "betas": [0.9, 0.999], "eps": 1e-8, "scheduler": "cosine"},
            finetune={"layer_decay": budget.layer_decay, "label_smoothing": budget.label_smoothing},
            classes=probe.class_names, seed=seed,
        )  # fmt: skip
        subset = Subset(probe.train, list(train_indices))
        loader = DataLoader(subset, batch_size=min(budget.batch_size, len(subset)), shuffle=True, drop_last=False,
                            collate_fn=probe.collate_fn, generator=torch.Generator().manual_seed(seed))  # fmt: skip
        quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
        levels = [lg.level for lg in quiet]
        try:
            for lg in quiet:  # one table is the output, not eight "GPU available" banners
                lg.setLevel(logging.WARNING)
            trainer = L.Trainer(
                accelerator=accelerator, devices=1, max_steps=int(budget.max_steps), max_epochs=-1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|LeafSpec|val_dataloader).*")
                trainer.fit(module, train_dataloaders=loader)
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
    return accuracy(module, probe)


def accuracy(module: Any, probe: ProbeSets, batch_size: int = 256) -> float:
    """Accuracy of a ``FineTuning`` classification module on ``probe.val``."""
    model = module.model
    device = next(model.parameters()).device
    model.eval()
    loader = DataLoader(probe.val, batch_size=batch_size, shuffle=False, collate_fn=probe.collate_fn,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    correct = total = 0
    with torch.inference_mode():
        for batch in loader:
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            logits = module._forward(batch, None).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].shape[0])
    return correct / max(total, 1)
