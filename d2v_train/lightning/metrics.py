"""Validation metrics of every fine-tuning task, through torchmetrics, plus greedy CTC decoding.

``TaskMetrics`` is what the ``FineTuning`` module talks to: ``update(output, batch)`` after each
validation step, ``compute()`` once per epoch. Each task names its primary metric (``TASK_METRIC``)
so the best checkpoint and the sweep table use the number that matters for that task:

- classification (image / audio / text sequence, multiple choice): accuracy (micro) and macro F1;
  regression (``num_labels == 1``): MSE and Pearson r.
- CTC: word and character error rate of greedy decodes against the reference transcripts.
- frame / token classification: accuracy and macro F1 over non-padded, non-ignored positions.
- semantic segmentation: mean IoU (ignore index skipped) and pixel accuracy.
- x-vector: equal error rate of cosine scores over all validation pairs.
- question answering: exact match and token-overlap F1 of the predicted span.
- masked / causal LM: perplexity.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)
from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef
from torchmetrics.text import CharErrorRate, Perplexity, WordErrorRate

__all__ = [
    "TASK_METRIC",
    "CharDecoder",
    "EqualErrorRate",
    "SpanQA",
    "TaskMetrics",
    "ctc_greedy_decode",
]

# task -> (primary metric, "max" | "min"); the metric key is logged as "val/<name>"
TASK_METRIC: dict[str, tuple[str, str]] = {
    "image_classification": ("acc", "max"),
    "sequence_classification": ("acc", "max"),
    "multiple_choice": ("acc", "max"),
    "ctc": ("wer", "min"),
    "frame_classification": ("acc", "max"),
    "token_classification": ("f1", "max"),
    "semantic_segmentation": ("miou", "max"),
    "xvector": ("eer", "min"),
    "question_answering": ("f1", "max"),
    "masked_lm": ("ppl", "min"),
    "causal_lm": ("ppl", "min"),
}


# ------------------------------------------------------------------------------------------ CTC


def ctc_greedy_decode(logits: Tensor, padding_mask: Optional[Tensor], blank: int) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks; padded frames are ignored."""
    best = logits.argmax(dim=-1).cpu()
    lengths = (
        (~padding_mask).sum(-1).cpu().tolist() if padding_mask is not None else [best.shape[1]] * best.shape[0]
    )
    out: list[list[int]] = []
    for row, n in zip(best, lengths):
        ids = torch.unique_consecutive(row[: int(n)]).tolist()
        out.append([i for i in ids if i != blank])
    return out


class CharDecoder:
    """Ids of a character vocabulary -> text. ``symbols[blank]`` is the blank; ``|`` is a space.

    The vocabulary is the one ``AudioDataModule`` builds from the training transcripts
    (``CharVocab.symbols``); it is saved with the model so decoding needs no data module.
    """

    def __init__(self, symbols: Sequence[str], blank: int = 0, word_delimiter: str = "|") -> None:
        self.symbols = list(symbols)
        self.blank = blank
        self.word_delimiter = word_delimiter

    def decode(self, ids: Sequence[int]) -> str:
        chars = [self.symbols[i] for i in ids if i != self.blank and 0 <= i < len(self.symbols)]
        text = "".join(" " if c == self.word_delimiter else c for c in chars)
        return " ".join(text.split())

    def labels_to_text(self, labels: Tensor) -> list[str]:
        """Reference transcripts from padded label rows (-100 / blank = padding)."""
        return [self.decode([i for i in row.tolist() if i >= 0]) for row in labels.cpu()]


# ------------------------------------------------------------------------------------------ custom metrics


class EqualErrorRate(torchmetrics.Metric):
    """Speaker-verification EER: every pair of validation embeddings is a trial (same label =
    target), scored by cosine similarity; the EER is where false accepts equal false rejects."""

    full_state_update = False

    def __init__(self, max_items: int = 4000) -> None:
        super().__init__()
        self.max_items = max_items
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        self.embeddings.append(F.normalize(embeddings.detach().float(), dim=-1))
        self.labels.append(labels.detach().reshape(-1))

    def compute(self) -> Tensor:
        emb = torchmetrics.utilities.dim_zero_cat(self.embeddings)[: self.max_items]
        lab = torchmetrics.utilities.dim_zero_cat(self.labels)[: self.max_items]
        n = emb.shape[0]
        if n < 2:
            return torch.tensor(float("nan"), device=emb.device)
        iu = torch.triu_indices(n, n, offset=1, device=emb.device)
        scores = (emb @ emb.T)[iu[0], iu[1]]
        target = (lab[:, None] == lab[None, :])[iu[0], iu[1]]
        if bool(target.all()) or not bool(target.any()):
            return torch.tensor(float("nan"), device=emb.device)
        fpr, tpr, _ = torchmetrics.functional.classification.binary_roc(scores, target.long())
        fnr = 1 - tpr
        i = int(torch.argmin((fnr - fpr).abs()))
        return ((fpr[i] + fnr[i]) / 2).to(torch.float32)


class SpanQA(torchmetrics.Metric):
    """Extractive QA at the token level: exact match of (start, end) and the F1 of the overlap
    between the predicted and gold token spans (SQuAD's F1, on positions instead of words)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("exact", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("f1", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, start_logits: Tensor, end_logits: Tensor, labels: Tensor, padding_mask: Optional[Tensor]) -> None:
        if padding_mask is not None:
            start_logits = start_logits.masked_fill(padding_mask, float("-inf"))
            end_logits = end_logits.masked_fill(padding_mask, float("-inf"))
        # best span with end >= start
        scores = start_logits[:, :, None] + end_logits[:, None, :]
        length = scores.shape[1]
        valid = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu()
        scores = scores.masked_fill(~valid, float("-inf")).flatten(1)
        best = scores.argmax(-1)
        ps, pe = best // length, best % length
        gs, ge = labels[:, 0].long(), labels[:, 1].long()
        self.exact += ((ps == gs) & (pe == ge)).sum().float()
        overlap = (torch.minimum(pe, ge) - torch.maximum(ps, gs) + 1).clamp(min=0).float()
        p = overlap / (pe - ps + 1).float()
        r = overlap / (ge - gs + 1).clamp(min=1).float()
        self.f1 += torch.where(overlap > 0, 2 * p * r / (p + r), torch.zeros_like(p)).sum()
        self.count += float(labels.shape[0])

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1)
        return {"exact_match": self.exact / n, "f1": self.f1 / n}


# ------------------------------------------------------------------------------------------ per task


class TaskMetrics(nn.Module):
    """The validation metrics of one task (an ``nn.Module`` so Lightning moves them to the device).

    Args:
        task: a short task name (``TASK_METRIC`` keys).
        num_labels: classes (classification tasks).
        ignore_index: label to skip (segmentation: ``semantic_loss_ignore_index``).
        decoder: ``CharDecoder`` for CTC.
    """

    def __init__(
        self, task: str, num_labels: int = 0, ignore_index: int = -100, decoder: Optional[CharDecoder] = None
    ) -> None:
        super().__init__()
        if task not in TASK_METRIC:
            raise ValueError(f"no metrics for task {task!r}; known tasks: {sorted(TASK_METRIC)}")
        self.task = task
        self.num_labels = int(num_labels)
        self.decoder = decoder
        self.ignore_index = ignore_index
        m: dict[str, torchmetrics.Metric] = {}
        classes = max(self.num_labels, 2)
        if task in ("image_classification", "sequence_classification", "frame_classification", "token_classification"):
            if self.num_labels == 1:
                m = {"mse": MeanSquaredError(), "pearson": PearsonCorrCoef()}
            else:
                m = {
                    "acc": MulticlassAccuracy(classes, average="micro", ignore_index=-100),
                    "f1": MulticlassF1Score(classes, average="macro", ignore_index=-100),
                }
        elif task == "multiple_choice":
            m = {"acc": torchmetrics.MeanMetric()}
        elif task == "ctc":
            m = {"wer": WordErrorRate(), "cer": CharErrorRate()}
        elif task == "semantic_segmentation":
            m = {
                "miou": MulticlassJaccardIndex(classes, average="macro", ignore_index=ignore_index),
                "pixel_acc": MulticlassAccuracy(classes, average="micro", ignore_index=ignore_index),
            }
        elif task == "xvector":
            m = {"eer": EqualErrorRate()}  # AM-softmax logits are embeddings-sized, not classes
        elif task == "question_answering":
            m = {"qa": SpanQA()}
        else:  # language models
            m = {"ppl": Perplexity(ignore_index=-100)}
        self.metrics = nn.ModuleDict(m)
        self.examples: list[tuple[str, str]] = []  # CTC: a few (reference, hypothesis) pairs per epoch

    @property
    def primary(self) -> tuple[str, str]:
        """(``val/<metric>``, mode) for checkpointing and sweeps."""
        name, mode = TASK_METRIC[self.task]
        if self.num_labels == 1 and name == "acc":
            name, mode = "mse", "min"
        return f"val/{name}", mode

    @torch.no_grad()
    def update(self, out: Any, batch: Mapping[str, Any]) -> None:
        labels = batch.get("labels")
        if labels is None:
            return
        t, m = self.task, self.metrics
        logits = out.logits.detach()
        if t in ("image_classification", "sequence_classification"):
            if self.num_labels == 1:
                m["mse"].update(logits.reshape(-1).float(), labels.reshape(-1).float())
                m["pearson"].update(logits.reshape(-1).float(), labels.reshape(-1).float())
            else:
                labels = labels.argmax(-1) if labels.dim() == 2 else labels  # one-/multi-hot -> class
                m["acc"].update(logits, labels)
                m["f1"].update(logits, labels)
        elif t in ("frame_classification", "token_classification"):
            if labels.dim() == logits.dim():  # transformers' (B, T, C) one-hot frame labels
                labels = labels.argmax(-1)
            labels = labels.long()
            if out.padding_mask is not None:
                labels = labels.masked_fill(out.padding_mask, -100)
            preds = logits.reshape(-1, logits.shape[-1])
            m["acc"].update(preds, labels.reshape(-1))
            m["f1"].update(preds, labels.reshape(-1))
        elif t == "multiple_choice":
            m["acc"].update((logits.argmax(-1) == labels.reshape(-1)).float())
        elif t == "ctc":
            assert self.decoder is not None, "CTC metrics need the character vocabulary"
            hyps = [self.decoder.decode(ids) for ids in ctc_greedy_decode(logits, out.padding_mask, self.decoder.blank)]
            refs = self.decoder.labels_to_text(labels)
            m["wer"].update(hyps, refs)
            m["cer"].update(hyps, refs)
            if len(self.examples) < 3:
                self.examples.extend(list(zip(refs, hyps))[: 3 - len(self.examples)])
        elif t == "semantic_segmentation":
            up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            m["miou"].update(up.argmax(1), labels.long())
            m["pixel_acc"].update(up.argmax(1), labels.long())
        elif t == "xvector":
            m["eer"].update(out.embeddings, labels)
        elif t == "question_answering":
            m["qa"].update(out.start_logits.detach(), out.end_logits.detach(), labels, batch.get("padding_mask"))
        else:
            lm_labels = labels
            if batch.get("padding_mask") is not None:
                lm_labels = lm_labels.masked_fill(batch["padding_mask"], -100)
            if t == "causal_lm":
                lm_labels = F.pad(lm_labels, (0, 1), value=-100)[:, 1:]
            m["ppl"].update(logits.float(), lm_labels)

    def compute(self) -> dict[str, float]:
        """``{"val/<name>": value}`` for every metric (QA expands into exact_match and f1)."""
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, dict):
                out.update({f"val/{k}": float(v) for k, v in value.items()})
            else:
                out[f"val/{name}"] = float(value)
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.examples = []
