"""``FineTuning``: one LightningModule that fine-tunes any of our task heads.

What the data2vec / wav2vec 2.0 / BEiT fine-tuning recipes add on top of "head loss + AdamW":
- layer-wise learning-rate decay (BEiT): block ``i`` of ``L`` gets ``decay ** (L + 1 - (i + 1))`` of
  the peak lr, the embeddings ``decay ** (L + 1)``, the head and final norms the full lr;
- the audio CNN is always frozen (fairseq ``feature_grad_mult 0``) and the whole encoder for the
  first ``freeze_encoder_steps`` updates (``freeze_finetune_updates``: only the head trains);
- audio masking while fine-tuning: span time masks drawn with data2vec's ``span_mask`` (replaced
  by the encoder's mask embedding) and channel masks that zero feature channels;
- mixup / cutmix and label smoothing for image classification (soft-target cross-entropy);
- masked-LM fine-tuning masks its own batches (BERT's 15 % with 80/10/10, ``mask_for_mlm``), in
  training with fresh masks each step and in validation with masks fixed per batch, so the
  validation perplexity of successive epochs compares the same predictions;
- validation metrics per task (``metrics.TaskMetrics``) logged as ``val/<name>`` once per epoch.

Masks and mixing draw from a generator seeded by (seed, update, micro-batch, rank), so a seeded
run repeats exactly.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from d2v_train.config_values import as_settings
from d2v_train.models.heads import TaskHead

from .augment import MixupConfig, channel_mask, mask_for_mlm, mixup_cutmix, soft_cross_entropy, time_mask
from .checkpointing import refuse_other_layout
from .metrics import CharDecoder, TaskMetrics
from .optim import OptimConfig, adamw, lr_lambda

__all__ = ["FineTuning", "FinetuneConfig", "layer_id", "layer_decay_groups"]

log = logging.getLogger("d2v_train.finetune")

CLASSIFICATION_TASKS = ("image_classification", "sequence_classification")


@dataclass
class FinetuneConfig:
    """Recipe knobs beyond the optimizer (see the module docstring)."""

    layer_decay: float = 1.0
    freeze_feature_extractor: bool = True
    freeze_encoder_steps: int = 0
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    mlm_probability: float = 0.15
    mlm_leave_unmasked_prob: float = 0.1
    mlm_random_token_prob: float = 0.1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FinetuneConfig":
        return cls(**dict(values))


# ------------------------------------------------------------------------------------------ lr groups


_BLOCK = re.compile(r"^encoder\.transformer\.blocks\.(\d+)\.")
# encoder parts that sit after the blocks and so belong with the head
_TOP = {"vision": ("encoder.norm.", "encoder.pool_norm."), "text": ("encoder.pooler.",), "audio": ("encoder.adapter.",)}


def layer_id(name: str, modality: str, num_layers: int) -> int:
    """0 for the embeddings (CNN, patch / token embeddings, positions), ``i + 1`` for block ``i``,
    ``num_layers + 1`` for what comes after the blocks (final norms, pooler, adapter, the head)."""
    if not name.startswith("encoder."):
        return num_layers + 1
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(_TOP.get(modality, ())):
        return num_layers + 1
    return 0


def _no_decay(name: str, param: Tensor, names: Sequence[str]) -> bool:
    """The pretraining rule (``optim.param_groups``): no decay on biases, 1-D tensors, learned tokens."""
    return param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in set(names)


def layer_decay_groups(model: TaskHead, cfg: OptimConfig, decay: float, skip: Sequence[str] = ()) -> list[dict]:
    """AdamW groups by (layer, weight decay or not), each with ``lr = cfg.lr * decay ** (L + 1 - layer)``.

    ``skip``: parameter-name prefixes left out for good (the frozen audio CNN); parameters frozen
    only for a while are included (AdamW skips them while their grad is None).
    """
    num_layers = int(model.encoder.config.num_hidden_layers)
    modality = model.encoder.modality
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if name.startswith(tuple(skip)) or (not p.requires_grad and not name.startswith("encoder.")):
            continue
        lid = layer_id(name, modality, num_layers)
        nd = _no_decay(name, p, cfg.no_decay_names)
        scale = float(decay) ** (num_layers + 1 - lid)
        g = groups.setdefault(
            (lid, nd),
            {"params": [], "weight_decay": 0.0 if nd else cfg.weight_decay, "lr": cfg.lr * scale, "lr_scale": scale, "layer": lid},
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------------ module


class FineTuning(L.LightningModule):
    """Fine-tunes ``model`` (a ``d2v_train.models.heads`` task model) for ``task``.

    Args:
        model: the head model (it owns the encoder).
        task: short task name (``image_classification``, ``ctc``, ...; see ``metrics.TASK_METRIC``).
        optim: ``OptimConfig`` (or its fields): AdamW + schedule.
        finetune: ``FinetuneConfig`` (or its fields).
        vocab: CTC: the character vocabulary (index 0 = blank), saved in the checkpoint.
        classes: class names (saved so predictions can be named).
        seed: mixes into every mask / mixing generator.
        special_token_ids: text: the tokenizer's ``{"pad", "bos", "eos", "mask", "unk"}`` ids (masked
            LM fine-tuning needs ``mask``; the others are never masked).
    """

    def __init__(
        self,
        model: TaskHead,
        task: str,
        optim: OptimConfig | Mapping[str, Any] | None = None,
        finetune: FinetuneConfig | Mapping[str, Any] | None = None,
        vocab: Optional[Sequence[str]] = None,
        classes: Optional[Sequence[str]] = None,
        seed: int = 0,
        special_token_ids: Optional[Mapping[str, int]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.optim = as_settings(OptimConfig, optim)
        self.ft = as_settings(FinetuneConfig, finetune)
        self.modality: str = model.encoder.modality
        self.seed = int(seed)
        self.vocab = list(vocab) if vocab is not None else None
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.special_token_ids = {k: int(v) for k, v in (special_token_ids or {}).items() if v is not None}
        self.save_hyperparameters(
            {
                "modality": self.modality,
                "encoder": model.encoder.config.to_dict(),
                "task": task,
                "architecture": model.architecture,
                "head": dict(model.settings),
                "optim": asdict(self.optim),
                "finetune": asdict(self.ft),
                "vocab": self.vocab,
                "classes": self.classes,
                "seed": self.seed,
                "special_token_ids": self.special_token_ids or None,
            }
        )
        self._check()
        self.frozen_prefixes: tuple[str, ...] = ()
        if self.modality == "audio" and self.ft.freeze_feature_extractor:
            self.frozen_prefixes = ("encoder.feature_extractor.",)
            for p in model.encoder.feature_extractor.parameters():
                p.requires_grad_(False)
        self._encoder_frozen = False
        self._channel_mask: Optional[Tensor] = None
        if self.modality == "audio":
            model.encoder.feature_projection.register_forward_hook(self._apply_channel_mask)
        decoder = None
        if task == "ctc":
            if not self.vocab:
                raise ValueError("CTC fine-tuning needs the character vocabulary (vocab=...)")
            decoder = CharDecoder(self.vocab, blank=int(model.settings["pad_token_id"]))
        ignore = int(model.settings.get("semantic_loss_ignore_index", -100))
        self.val_metrics = TaskMetrics(task, num_labels=int(model.settings.get("num_labels", 0)), ignore_index=ignore, decoder=decoder)
        self.mixup = MixupConfig(
            self.ft.mixup_alpha, self.ft.cutmix_alpha, self.ft.mixup_prob, self.ft.mixup_switch_prob, self.ft.label_smoothing
        )

    def _check(self) -> None:
        ft = self.ft
        if self.modality != "audio" and (ft.mask_time_prob > 0 or ft.mask_feature_prob > 0):
            raise ValueError(f"finetune.mask_time_prob / mask_feature_prob are for audio, not {self.modality}")
        if self.modality == "audio" and ft.mask_time_prob > 0 and self.model.encoder.mask_embedding is None:
            raise ValueError("finetune.mask_time_prob > 0 needs an encoder with a mask embedding (mask_time_prob > 0 in its config)")
        if (ft.mixup_alpha > 0 or ft.cutmix_alpha > 0) and self.task != "image_classification":
            raise ValueError("finetune.mixup_alpha / cutmix_alpha are for image classification")
        if not 0 < ft.layer_decay <= 1:
            raise ValueError(f"finetune.layer_decay must be in (0, 1], got {ft.layer_decay}")
        if self.task == "masked_lm":
            if "mask" not in self.special_token_ids:
                raise ValueError("masked_lm fine-tuning masks tokens itself and needs the tokenizer's <mask> id "
                                 "(special_token_ids=...; d2v-finetune takes it from a text data module)")
            if not (0 < ft.mlm_probability <= 1 and ft.mlm_leave_unmasked_prob + ft.mlm_random_token_prob <= 1):
                raise ValueError("finetune.mlm_probability must be in (0, 1] and mlm_leave_unmasked_prob + "
                                 "mlm_random_token_prob at most 1")

    @property
    def metric(self) -> tuple[str, str]:
        """(``val/<primary metric>``, ``max`` | ``min``) of this task."""
        return self.val_metrics.primary

    # ------------------------------------------------------------------ helpers
    def generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        rank = self.global_rank if self._trainer is not None else 0
        step = self.global_step if self._trainer is not None else 0
        key = hash((self.seed, step, batch_idx, rank, 0x6674)) & ((1 << 62) - 1)  # ints only: str hashes are salted per process
        return torch.Generator(device=device).manual_seed(key)

    def _mlm(self, batch: Mapping[str, Any], g: torch.Generator) -> Mapping[str, Any]:
        """Masked-LM fine-tuning: the batch with masked inputs and labels (-100 where not masked);
        a batch that already carries labels (a masking collator) is left alone."""
        if self.task != "masked_lm" or batch.get("labels") is not None:
            return batch
        ft = self.ft
        inputs, labels = mask_for_mlm(
            batch["inputs"], batch.get("padding_mask"), self.special_token_ids, int(self.model.encoder.config.vocab_size),
            ft.mlm_probability, ft.mlm_leave_unmasked_prob, ft.mlm_random_token_prob, g,
        )  # fmt: skip
        return {**batch, "inputs": inputs, "labels": labels}

    def _apply_channel_mask(self, module: nn.Module, args: Any, output: Tensor) -> Optional[Tensor]:
        if self._channel_mask is None or not self.training:
            return None
        return output.masked_fill(self._channel_mask[:, None, :], 0.0)

    def _audio_masks(self, inputs: Tensor, padding_mask: Optional[Tensor], g: torch.Generator) -> Optional[Tensor]:
        """Time mask over frames (passed to the encoder) and channel mask (set for the hook)."""
        ft, enc = self.ft, self.model.encoder
        frames = int(enc.output_lengths(torch.tensor(inputs.shape[1])))
        frame_pad = enc.frame_padding_mask(padding_mask, frames) if padding_mask is not None else None
        shape = (inputs.shape[0], frames)
        mask = time_mask(shape, ft.mask_time_prob, ft.mask_time_length, ft.mask_time_min_masks, frame_pad, g, inputs.device)
        self._channel_mask = channel_mask(
            inputs.shape[0], int(enc.config.hidden_size), ft.mask_feature_prob, ft.mask_feature_length, g, inputs.device
        )
        return mask

    def _labels(self, batch: Mapping[str, Any]) -> Optional[Tensor]:
        """The batch's labels; a causal LM without labels predicts its own next tokens."""
        labels = batch.get("labels")
        if labels is None and self.task == "causal_lm":
            pad = batch.get("padding_mask")
            labels = batch["inputs"] if pad is None else batch["inputs"].masked_fill(pad, -100)
        return labels

    def _forward(self, batch: Mapping[str, Any], labels: Optional[Tensor], mask: Optional[Tensor] = None) -> Any:
        kwargs: dict[str, Any] = {"padding_mask": batch.get("padding_mask"), "labels": labels}
        if mask is not None:
            kwargs["mask"] = mask
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return self.model(batch["inputs"], **kwargs)

    def _soft_targets_wanted(self, labels: Optional[Tensor]) -> bool:
        return (
            labels is not None
            and self.task in CLASSIFICATION_TASKS
            and labels.dim() == 1
            and labels.dtype in (torch.long, torch.int)
            and int(self.model.settings.get("num_labels", 0)) > 1
            and (self.mixup.active or self.ft.label_smoothing > 0)
        )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        g = self.generator(batch["inputs"].device, batch_idx)
        batch = self._mlm(batch, g)
        inputs, labels = batch["inputs"], self._labels(batch)
        mask = None
        if self.modality == "audio" and (self.ft.mask_time_prob > 0 or self.ft.mask_feature_prob > 0):
            mask = self._audio_masks(inputs, batch.get("padding_mask"), g)
        try:
            if self._soft_targets_wanted(labels):
                num = int(self.model.settings["num_labels"])
                if self.task == "image_classification":
                    inputs, targets = mixup_cutmix(inputs, labels, num, self.mixup, g)
                else:
                    inputs, targets = mixup_cutmix(inputs, labels, num, MixupConfig(label_smoothing=self.ft.label_smoothing), g)
                out = self._forward({**batch, "inputs": inputs}, None, mask)
                loss = soft_cross_entropy(out.logits, targets)
            else:
                out = self._forward(batch, labels, mask)
                loss = out.loss
        finally:
            self._channel_mask = None
        if loss is None:
            raise ValueError(f"the {self.task} head returned no loss: the batch has no 'labels'")
        bsz = int(inputs.shape[0])
        log = dict(on_step=True, on_epoch=False, batch_size=bsz)
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        if self._trainer is not None:
            opt = self.optimizers(use_pl_optimizer=False)
            self.log("train/lr", max(g["lr"] for g in opt.param_groups), **log)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.task == "masked_lm":  # the same masks every epoch: seeded by the batch only
            key = hash((self.seed, batch_idx, self.global_rank if self._trainer is not None else 0, 0x76616C))
            batch = self._mlm(batch, torch.Generator(device=batch["inputs"].device).manual_seed(key & ((1 << 62) - 1)))
        labels = self._labels(batch)
        out = self._forward(batch, labels)
        if out.loss is not None:
            self.log("val/loss", out.loss.detach(), on_step=False, on_epoch=True, batch_size=int(batch["inputs"].shape[0]), sync_dist=True)
        self.val_metrics.update(out, {**batch, "labels": labels})

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        primary, _ = self.metric
        for name, value in values.items():
            self.log(name, value, prog_bar=name == primary, sync_dist=False)
        if self.val_metrics.examples and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            ref, hyp = self.val_metrics.examples[0]
            log.info("epoch %d: ref %r -> hyp %r", self.current_epoch, ref, hyp)
        self.val_metrics.reset()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Freeze / unfreeze the encoder around ``freeze_encoder_steps`` (only the head trains first)."""
        frozen = self.global_step < self.ft.freeze_encoder_steps
        if frozen != self._encoder_frozen:
            for name, p in self.model.encoder.named_parameters():
                if not ("encoder." + name).startswith(self.frozen_prefixes):
                    p.requires_grad_(not frozen)
            self._encoder_frozen = frozen
            if not frozen:
                self.model.encoder.train()
                log.info("update %d: encoder unfrozen", self.global_step)
        if frozen:
            self.model.encoder.eval()  # fairseq runs the frozen encoder without dropout / layerdrop

    def configure_optimizers(self) -> Any:
        total = self.optim.total_steps
        if total is None:
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            total = max_steps if max_steps and max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        groups = layer_decay_groups(self.model, self.optim, self.ft.layer_decay, skip=self.frozen_prefixes)
        opt = adamw(groups, self.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim, int(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_other_layout(self, checkpoint)
