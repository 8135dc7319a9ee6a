"""``Data2VecPretraining``: one LightningModule for data2vec pretraining in every modality.

What differs per modality is only (a) how the student input is masked (token ids for text, token
embeddings for audio and vision) and (b) what the teacher reads (``objective.teacher_input``); the
rest (EMA teacher, top-K targets, head, loss, logging) is shared.

Step:
1. mask: text -> ``mask_tokens`` on ids (loss on ``<mask>`` positions); audio / vision -> a mask over
   the embedded tokens (``compute_mask``), drawn from a generator seeded by (seed, update, micro-batch,
   rank), so a resumed run draws the same masks.
2. student: masked input -> final hidden states -> head, at masked positions.
3. teacher (eval mode, no grad, on the *unmasked* input: the full clean sentence for text, the
   student's unmasked CNN features before feat_proj_dropout for audio, the clean image for vision) ->
   top-K block tensors -> ``build_targets`` (fp32).
4. loss over the masked positions of all ranks; EMA step once per optimizer update, right after the
   optimizer step (``optimizer_step``, which Lightning calls once per update under gradient
   accumulation). Doing it there rather than in ``on_train_batch_end`` means every checkpoint, also
   one written by a callback (``ModelCheckpoint`` runs before the module's ``on_train_batch_end``),
   holds the teacher of the update it was taken at, so a resume is exact.

Non-finite losses: a NaN / inf loss (all-reduced, so every rank agrees) is not backpropagated (under
DDP a throw-away backward keeps the ranks in step) and the update it belongs to is skipped: no
optimizer change (gradients are dropped), no EMA step. Lightning still counts the update
(``global_step`` and the lr schedule advance). ``skipped_steps`` (total, logged as
``train/skipped_steps``) and ``bad_streak`` (consecutive) are kept in checkpoints;
``callbacks.NonFiniteLossGuard`` stops a run whose streak gets too long.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Mapping, Optional

import lightning as L
import torch
from torch import Tensor, nn

from d2v_train.config_values import as_settings
from d2v_train.objective.config import ObjectiveConfig
from d2v_train.objective.decoder import ConvDecoder, RegressionHead
from d2v_train.objective.ema import EMASchedule, EMATeacher, resolve_schedule
from d2v_train.objective.loss import all_reduce_sum, masked_regression_loss, objective_outputs
from d2v_train.objective.masking import MaskingConfig, compute_mask, mask_tokens
from d2v_train.objective.multimask import d2v2_objective
from d2v_train.objective.pooled import add_pooled_loss, pooled_targets
from d2v_train.objective.targets import build_targets

from .checkpointing import refuse_other_layout
from .optim import OptimConfig, build_optimizer

__all__ = ["Data2VecPretraining", "TEXT_SPECIAL_KEYS"]

_log = logging.getLogger("d2v_train.pretrain")

TEXT_SPECIAL_KEYS = ("pad", "bos", "eos", "mask", "unk")


class Data2VecPretraining(L.LightningModule):
    """data2vec v1 pretraining of ``encoder`` (any ``d2v_train.models`` encoder).

    Args:
        encoder: the student encoder; the teacher is its EMA copy.
        objective: ``ObjectiveConfig`` (or its fields).
        masking: ``MaskingConfig`` (or its fields).
        optim: ``OptimConfig`` (or its fields).
        special_token_ids: text only: ids of ``pad``, ``bos``, ``eos``, ``mask`` (``unk`` optional);
            they are never masked and ``mask`` is the replacement id.
        vocab_size: text only (defaults to the encoder's): random replacements draw from it.
        seed: mixes into every mask generator.
        compile: ``torch.compile`` the transformer stacks (student and teacher) and the head / decoder.
    """

    def __init__(
        self,
        encoder: nn.Module,
        objective: ObjectiveConfig | Mapping[str, Any] | None = None,
        masking: MaskingConfig | Mapping[str, Any] | None = None,
        optim: OptimConfig | Mapping[str, Any] | None = None,
        special_token_ids: Optional[Mapping[str, int]] = None,
        vocab_size: Optional[int] = None,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.objective = as_settings(ObjectiveConfig, objective)
        self.masking = as_settings(MaskingConfig, masking)
        self.optim = as_settings(OptimConfig, optim)
        self.modality: str = getattr(encoder, "modality")
        self.seed = int(seed)
        enc_cfg = getattr(encoder, "config", None)
        self.save_hyperparameters(
            {
                "modality": self.modality,
                "encoder": enc_cfg.to_dict() if hasattr(enc_cfg, "to_dict") else None,
                "objective": self.objective.to_dict(),
                "masking": asdict(self.masking),
                "optim": asdict(self.optim),
                "special_token_ids": dict(special_token_ids) if special_token_ids else None,
                "vocab_size": vocab_size,
                "seed": self.seed,
            }
        )
        v2 = self.objective.version == 2
        if self.modality == "text":
            if self.masking.kind != "token" and not v2:
                raise ValueError(f"text pretraining masks token ids: masking.kind must be 'token', got {self.masking.kind!r}")
            if not special_token_ids or "mask" not in special_token_ids:
                raise ValueError("text pretraining needs special_token_ids with at least 'mask' (and pad/bos/eos)")
            vocab = int(vocab_size if vocab_size is not None else encoder.config.vocab_size)
            specials = torch.tensor(sorted({int(v) for v in special_token_ids.values() if v is not None and v >= 0}))
            ids = torch.arange(vocab)
            self.register_buffer("special_ids", specials, persistent=False)
            self.register_buffer("random_token_ids", ids[~torch.isin(ids, specials)], persistent=False)
            self.mask_id = int(special_token_ids["mask"])
            self.pad_id = special_token_ids.get("pad")
        elif self.masking.kind == "token":
            raise ValueError(f"masking.kind='token' is for text, not {self.modality}")
        if self.objective.teacher_input == "embed" and self.modality == "text" and not v2:
            raise ValueError("objective.teacher_input='embed' is not used for text: the teacher reads the full clean sentence")

        self.student = encoder
        dim = int(encoder.config.hidden_size)
        if v2:  # data2vec 2.0: the conv decoder takes the head's place (and its optimizer group)
            self.head = ConvDecoder(dim, dim, self.objective.decoder, spatial=self.modality == "vision")
        else:
            self.head = RegressionHead(dim, self.objective.head, self.objective.head_hidden_mult)
        # objective.pooled_loss: a linear head from the student's mean-pooled output (objective/pooled.py)
        self.pooled_head = nn.Linear(dim, dim) if self.objective.pooled_loss > 0 else None
        if self.objective.pooled_weights == "idf" and self.modality != "text":
            raise ValueError(f"objective.pooled_weights=idf weighs token ids (text), not {self.modality} inputs")
        self.pooled_token_idf: Optional[Tensor] = None  # objective.pooled_weights=idf: set by setup() from the training text
        ema = self.objective.ema
        self.teacher = EMATeacher(encoder, copy_prefixes=ema.copy, share_prefixes=ema.share)
        self.num_prefix = int(getattr(encoder, "num_prefix_tokens", 0))
        self._ema_last_step = -1
        self._ema_schedule: Optional[EMASchedule] = None  # resolved against the run's length at fit start
        self.teacher_init_weight = 1.0  # share of the teacher still its initialisation: prod of decays so far
        self.skipped_steps = 0  # micro-batches whose loss was NaN / inf
        self.bad_streak = 0  # consecutive ones (reset by a finite loss)
        self._skip_update = False  # this update's window saw a non-finite loss
        self.last_stats: dict[str, Tensor] = {}
        if compile:  # in place, so parameter names (EMA, checkpoints, export) stay as they are
            for part in (self.student.transformer, self.teacher.model.transformer, self.head):
                part.compile()

    # ------------------------------------------------------------------ helpers
    def total_updates(self) -> Optional[int]:
        """The run's optimizer updates (``optim.total_steps``, else the trainer's), None without a trainer."""
        if self.optim.total_steps is not None:
            return int(self.optim.total_steps)
        if self._trainer is None:
            return None
        max_steps = self.trainer.max_steps
        return int(max_steps) if max_steps and max_steps > 0 else int(self.trainer.estimated_stepping_batches)

    def ema_schedule(self) -> EMASchedule:
        """The EMA ramp sized to this run (``objective.ema.anneal_fraction`` / ``max_horizon``)."""
        if self._ema_schedule is None:
            e = self.objective.ema
            return resolve_schedule(
                e.decay, e.end_decay, e.anneal_steps, self.total_updates(), e.anneal_fraction, e.max_horizon
            )
        return self._ema_schedule

    def ema_decay(self, step: Optional[int] = None) -> float:
        """Teacher decay after ``step`` optimizer updates (default: the current one)."""
        return self.ema_schedule().at(self.global_step if step is None else step)

    def mask_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """Generator for this update / micro-batch / rank: same seed -> same masks, also after resume."""
        rank = self.global_rank if self._trainer is not None else 0
        step = self.global_step if self._trainer is not None else 0
        key = hash((self.seed, step, batch_idx, rank)) & ((1 << 62) - 1)
        return torch.Generator(device=device).manual_seed(key)

    def _grid(self, num_tokens: int) -> Optional[tuple[int, int]]:
        infer = getattr(self.student, "infer_grid", None)
        return tuple(infer(num_tokens)) if infer is not None else None  # type: ignore[return-value]

    # ------------------------------------------------------------------ objective
    def compute_objective(
        self, inputs: Tensor, padding_mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """Masks, runs student and teacher, returns ``loss`` (for backward) and detached stats."""
        obj = self.objective
        if generator is None:
            generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
        pad = padding_mask
        if self.modality == "text" and pad is None and self.pad_id is not None:
            pad = inputs == int(self.pad_id)
        if obj.version == 2:
            return d2v2_objective(
                self.student, self.teacher.model, self.head, obj, self.masking, inputs, pad, generator, self.pooled_head,
                self._pooled_weights(inputs),
            )
        if self.modality == "text":
            maskable = ~torch.isin(inputs, self.special_ids)
            if pad is not None:
                maskable &= ~pad
            m = self.masking
            tm = mask_tokens(
                inputs,
                mask_id=self.mask_id,
                maskable=maskable,
                random_token_ids=self.random_token_ids,
                mask_prob=m.mask_prob,
                mask_length=m.mask_length,
                min_masks=m.min_masks,
                leave_unmasked_prob=m.leave_unmasked_prob,
                random_token_prob=m.random_token_prob,
                generator=generator,
            )
            student_out = self.student(tm.input_ids, padding_mask=pad)
            mask, token_pad, valid_tokens = tm.loss_mask, pad, maskable
            with torch.no_grad():
                teacher_out = self.teacher.model(inputs, padding_mask=pad, layer_targets=obj.layer_targets)
        else:
            # audio: the teacher reads the student's projected features before feat_proj_dropout
            tokens, clean_tokens, token_pad = self.student.embed_with_clean(inputs, padding_mask)
            shape = (tokens.shape[0], tokens.shape[1])
            mask = compute_mask(
                self.masking, shape, grid=self._grid(shape[1]), padding_mask=token_pad,
                generator=generator, device=tokens.device,
            )
            student_out = self.student.contextualize(tokens, token_pad, mask=mask)
            valid_tokens = ~token_pad if token_pad is not None else torch.ones_like(mask)
            with torch.no_grad():
                if obj.teacher_input == "embed":  # audio: the teacher reuses the student's CNN features
                    teacher_out = self.teacher.model.contextualize(
                        clean_tokens.detach(), token_pad, layer_targets=obj.layer_targets
                    )
                else:
                    teacher_out = self.teacher.model(inputs, padding_mask=padding_mask, layer_targets=obj.layer_targets)

        with torch.no_grad():
            layers = [y[:, self.num_prefix :] for y in teacher_out.layer_targets]
            targets = build_targets(
                layers, obj.top_k, layer_norm=obj.layer_norm, final_norm=obj.final_norm, padding_mask=token_pad
            )
        x = student_out.last_hidden_state[:, self.num_prefix :]
        pred = self.head(x[mask])
        target = targets[mask]
        res = masked_regression_loss(
            pred,
            target,
            loss_beta=obj.loss_beta,
            loss_scale=obj.loss_scale,
            channel_reduction=obj.channel_reduction,
        )
        out = objective_outputs(res, mask, valid_tokens.sum(), pred, target)
        if self.pooled_head is not None:  # over the tokens the masks may pick (text: no special tokens)
            target_means = pooled_targets(targets, ~valid_tokens, self._pooled_weights(inputs))
            add_pooled_loss(out, obj.pooled_loss, self.pooled_head, x, ~valid_tokens, target_means)
        return out

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        inputs = batch["inputs"]
        out = self.compute_objective(
            inputs, batch.get("padding_mask"), self.mask_generator(inputs.device, batch_idx)
        )
        bsz = int(inputs.shape[0])
        # detached tensors (no host sync here); callbacks convert what they need
        self.last_stats = {
            "loss": out["global_loss"],
            "target_std": out["target_std"],
            "pred_std": out["pred_std"],
            "samples": all_reduce_sum(torch.tensor(float(bsz), device=inputs.device)),
            "tokens": out["tokens"],
            "masked": out["masked"],
            "local_sum": out["local_sum"],
            "local_count": out["local_count"],
        }
        finite = bool(torch.isfinite(out["global_loss"]))  # all-reduced: every rank decides alike
        if finite:
            self.bad_streak = 0
        else:
            self.skipped_steps += 1
            self.bad_streak += 1
            self._skip_update = True
            if self.global_rank == 0:
                _log.warning(
                    "non-finite loss (%s) at update %d: update skipped (%d in a row, %d in all)",
                    float(out["global_loss"]), self.global_step + 1, self.bad_streak, self.skipped_steps,
                )  # fmt: skip
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        log = dict(on_step=True, on_epoch=False, batch_size=bsz, rank_zero_only=True)
        self.log("train/skipped_steps", float(self.skipped_steps), **log)
        self.log("train/loss", out["global_loss"], prog_bar=True, **log)
        self.log("train/target_std", out["target_std"], **log)
        self.log("train/pred_std", out["pred_std"], **log)
        self.log("train/mask_frac", out["mask_frac"], **log)
        if "pooled_loss" in out:
            self.log("train/pooled_loss", out["pooled_loss"], **log)
        self.log("train/ema_decay", self.ema_decay(), **log)
        self.log("train/teacher_init_weight", self.teacher_init_weight, **log)
        if opt is not None:
            self.log("train/lr", opt.param_groups[0]["lr"], **log)
        if finite:
            return out["loss"]
        if self._trainer is not None and self.trainer.world_size > 1:
            # DDP needs every rank to run backward (Lightning refuses None there): a throw-away
            # backward whose gradients ``on_before_optimizer_step`` drops
            return out["loss"] * 0.0
        return None  # Lightning skips backward

    def setup(self, stage: str) -> None:
        """``objective.pooled_weights=idf``: each token id's IDF over the run's training sequences,
        computed here because only the data module knows them (it is set up first; on resume and on
        every DDP rank the same data give the same weights, so nothing needs checkpointing)."""
        if self.objective.pooled_weights != "idf" or self.pooled_head is None or self.pooled_token_idf is not None:
            return
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        corpus = getattr(dm, "train_set", None)
        if corpus is not None:
            self._set_pooled_idf(corpus)

    def _set_pooled_idf(self, corpus: Any) -> None:
        from d2v_train.eval.features import token_idf

        idf = token_idf(corpus, int(self.student.config.vocab_size), self.pad_id)
        idf[self.special_ids] = 0.0  # <s>, </s>, <pad>, <mask>: not words of the sequence
        self.pooled_token_idf = idf
        _log.info("pooled target weighted by IDF over %d training sequences (objective.pooled_weights=idf)", len(corpus))

    def _pooled_weights(self, inputs: Tensor) -> Optional[Tensor]:
        """``(B, T)`` weights of the pooled target's mean (``objective.pooled_weights``), or None.
        Without a data module (``trainer.fit(model, loader)``) the weights come from the training
        loader's dataset, once it exists."""
        if self.pooled_token_idf is None:
            if self.objective.pooled_weights != "idf" or self.pooled_head is None:
                return None
            loader = self._trainer.train_dataloader if self._trainer is not None else None
            corpus = getattr(loader, "dataset", None)
            if corpus is None:
                raise ValueError(
                    "objective.pooled_weights=idf computes its weights from the training text (the data module's "
                    "train_set, or the training loader's dataset), and this run has none yet"
                )
            self._set_pooled_idf(corpus)
        assert self.pooled_token_idf is not None
        if self.pooled_token_idf.device != inputs.device:
            self.pooled_token_idf = self.pooled_token_idf.to(inputs.device)
        return self.pooled_token_idf[inputs]

    def on_fit_start(self) -> None:
        self._ema_schedule = None
        self._ema_schedule = self.ema_schedule()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """The training objective on held-out data, logged as ``val/loss``. Masks come from a
        generator seeded by (seed, batch index) only, so every validation scores the same masks and
        the curve compares like with like; nothing draws from the global RNG (eval mode: no dropout),
        so validating does not change the training run or its exact resume."""
        inputs = batch["inputs"]
        key = hash((self.seed, -1, batch_idx)) & ((1 << 62) - 1)  # ints only: str hashes are salted per process
        out = self.compute_objective(inputs, batch.get("padding_mask"), torch.Generator(device=inputs.device).manual_seed(key))
        self.log("val/loss", out["global_loss"], on_step=False, on_epoch=True, batch_size=int(inputs.shape[0]))

    def on_train_start(self) -> None:
        self._ema_last_step = self.global_step
        self._skip_update = False
        self.teacher.eval()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drop the gradients of an update that saw a non-finite loss (also from other micro-batches
        of its accumulation window): the optimizer then leaves every parameter and its state alone."""
        if self._skip_update:
            optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA step (none for a skipped update)."""
        super().optimizer_step(*args, **kwargs)
        step = self.global_step + 1  # Lightning counts this update right after this hook returns
        if step > self._ema_last_step:
            if not self._skip_update:
                decay = self.ema_decay(step)
                self.teacher.step(self.student, decay)
                self.teacher_init_weight *= min(decay, 1.0)
            self._ema_last_step = step
        self._skip_update = False

    def configure_optimizers(self) -> Any:
        modules = {"student": self.student, "head": self.head}
        if self.pooled_head is not None:
            modules["pooled_head"] = self.pooled_head
        opt, sched = build_optimizer(modules, self.optim, int(self.total_updates()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["d2v_ema_last_step"] = self._ema_last_step
        checkpoint["d2v_skipped_steps"] = self.skipped_steps
        checkpoint["d2v_bad_streak"] = self.bad_streak
        checkpoint["d2v_teacher_init_weight"] = self.teacher_init_weight

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_other_layout(self, checkpoint)
        self._ema_last_step = int(checkpoint.get("d2v_ema_last_step", -1))
        self.skipped_steps = int(checkpoint.get("d2v_skipped_steps", 0))
        self.bad_streak = int(checkpoint.get("d2v_bad_streak", 0))
        self.teacher_init_weight = float(checkpoint.get("d2v_teacher_init_weight", 1.0))

    def on_train_end(self) -> None:
        """Say so when the teacher hardly moved: its targets were then close to random features."""
        if self.global_rank == 0 and self.global_step > 0 and self.teacher_init_weight > 0.9:
            sched = self.ema_schedule()
            _log.warning(
                "the teacher barely moved: after %d updates it is still %.0f%% its initialisation (EMA decay "
                "%.6g -> %.6g), so its targets were close to its random features. Check the probe against "
                "random init; a faster teacher (objective.ema.max_horizon=0.1, or lower objective.ema.decay) "
                "is what made the vision preset learn, but collapsed the text one (docs/presets.md).",
                self.global_step, 100 * self.teacher_init_weight, sched.decay, sched.end_decay,
            )  # fmt: skip
