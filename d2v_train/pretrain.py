"""``d2v-pretrain`` / ``python -m d2v_train.pretrain``: data2vec pretraining as a Hydra app.

    d2v-pretrain                                  # tiny ViT on the bundled digits, CPU, ~1 minute
    d2v-pretrain modality=audio trainer.max_steps=100
    d2v-pretrain experiment=vision_base_imagenet data.path=/data/imagenet/train

The run directory (``hydra.run.dir``) receives ``config.yaml`` (resolved), ``metrics.csv`` and
``checkpoints/last.ckpt``. ``train(cfg)`` is the whole run and is usable from Python and tests.

Resume: re-running a command whose run directory already holds ``checkpoints/last.ckpt`` continues
from it (``ckpt_path=auto``, the default; give the directory with ``hydra.run.dir=``, since the
default one is timestamped). ``ckpt_path=PATH`` resumes from another checkpoint, ``ckpt_path=null``
starts over. A resumed run continues exactly: weights, optimizer, lr schedule, EMA teacher, RNG
streams, data order and position, ``metrics.csv`` (appended) and the W&B run (same id). Checkpoints
are written atomically and loaded with ``weights_only=True``
(``d2v_train.lightning.checkpointing``).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from d2v_train.cli import ConfigError, UserError, check_fields, check_trainer, run_app
from d2v_train.interop.sources import TOKENIZER_FILE

__all__ = ["main", "train", "build", "validate_config"]

log = logging.getLogger("d2v_train.pretrain")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def validate_config(cfg: DictConfig) -> None:
    """Schema checks for the objective, masking, optim, trainer and encoder nodes (raises ConfigError)."""
    from d2v_train.lightning.optim import OptimConfig
    from d2v_train.objective.config import ObjectiveConfig
    from d2v_train.objective.masking import MASK_KINDS, MaskingConfig

    modality = cfg.get("modality")
    if modality not in ("audio", "text", "vision"):
        raise ConfigError(f"bad value for 'modality': {modality!r}; valid choices: audio, text, vision")
    for key, schema in (("objective", ObjectiveConfig), ("masking", MaskingConfig), ("optim", OptimConfig)):
        node = cfg.get(key)
        if node is None:
            raise ConfigError(f"missing config group '{key}'")
        check_fields(OmegaConf.to_container(node, resolve=False), schema, key)  # type: ignore[arg-type]
    try:
        ObjectiveConfig.from_dict(OmegaConf.to_container(cfg.objective, resolve=True))  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    kind = cfg.masking.get("kind")
    valid = ("token",) if modality == "text" else tuple(k for k in MASK_KINDS if k != "token")
    if cfg.objective.get("version", 1) == 2:  # data2vec 2.0 gathers kept tokens: exact counts per row
        from d2v_train.objective.multimask import EXACT_MASK_KINDS

        valid = ("inverse_block", "random") if modality == "vision" else tuple(k for k in EXACT_MASK_KINDS if k != "inverse_block")
    if kind not in valid:
        raise ConfigError(f"bad value for 'masking.kind': {kind!r}; valid choices for {modality}: {', '.join(valid)}")
    check_trainer(OmegaConf.to_container(cfg.trainer, resolve=False))  # type: ignore[arg-type]
    from d2v_train.models import ENCODERS

    _, enc_cls = ENCODERS[modality]
    check_fields(OmegaConf.to_container(cfg.encoder, resolve=False), enc_cls, "encoder")  # type: ignore[arg-type]


def _instantiate_named(node: Any) -> list[Any]:
    """Instantiate every non-null entry of a ``name: {_target_: ...}`` mapping, in order."""
    from hydra.utils import instantiate

    if node is None:
        return []
    return [instantiate(v) for v in node.values() if v is not None]


def build(cfg: DictConfig, datamodule: Any = None) -> tuple[Any, Any, Any]:
    """(LightningModule, LightningDataModule, Trainer) from a composed config."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    from d2v_train.lightning.checkpointing import AtomicCheckpointIO, ExactResume
    from d2v_train.lightning.loggers import RunCSVLogger
    from d2v_train.lightning.pretrain import Data2VecPretraining
    from d2v_train.models import build_encoder

    modality = cfg.modality
    if datamodule is None:
        try:
            datamodule = instantiate(cfg.data)
        except Exception as e:  # bad data options: one clear line
            raise ConfigError(f"data: {e.__cause__ or e}") from None
    enc_cfg = dict(_container(cfg.encoder))
    special: Optional[dict[str, int]] = None
    vocab_size: Optional[int] = None
    if modality == "text":
        # the tokenizer decides the vocabulary and the special ids; the encoder follows it
        datamodule.prepare_data()
        datamodule.setup("fit")
        special = dict(datamodule.special_token_ids)
        vocab_size = int(datamodule.vocab_size)
        enc_cfg["vocab_size"] = vocab_size
        for key in ("pad", "bos", "eos"):
            if special.get(key) is not None:
                enc_cfg[f"{key}_token_id"] = int(special[key])
    try:
        encoder = build_encoder(modality, enc_cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"encoder: {e}") from None
    model = Data2VecPretraining(
        encoder,
        objective=_container(cfg.objective),
        masking=_container(cfg.masking),
        optim=_container(cfg.optim),
        special_token_ids=special,
        vocab_size=vocab_size,
        seed=int(cfg.seed),
        compile=bool(cfg.get("compile", False)),
    )

    loggers = _instantiate_loggers(cfg)
    if not any(isinstance(lg, CSVLogger) for lg in loggers):  # metrics.csv is always written
        loggers.insert(0, RunCSVLogger(save_dir=str(cfg.run_dir)))
    # ExactResume is part of correctness (like the EMA step), not an optional callback
    callbacks = [*_instantiate_named(cfg.get("callbacks")), ExactResume()]
    trainer = L.Trainer(
        **_container(cfg.trainer), logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    return model, datamodule, trainer


def _instantiate_loggers(cfg: DictConfig) -> list[Any]:
    """Like ``_instantiate_named``; a W&B logger without an explicit ``id`` gets the run directory's
    id (``wandb_id`` file) and ``resume="allow"``, so a resumed run continues the same W&B run."""
    from hydra.utils import instantiate

    from d2v_train.lightning.loggers import wandb_run_id

    node = cfg.get("logger")
    out: list[Any] = []
    for value in (node.values() if node is not None else []):
        if value is None:
            continue
        extra: dict[str, Any] = {}
        if str(value.get("_target_", "")).endswith("WandbLogger") and value.get("id") is None:
            ckpt = str(cfg.get("ckpt_path") or "")
            other = ckpt if ckpt.lower() not in ("", "auto", "last", "hpc", "none", "null") else None
            extra = {"id": wandb_run_id(Path(str(cfg.run_dir)), other), "resume": "allow"}
        out.append(instantiate(value, **extra))
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """The whole run: seed, build, write the resolved config, fit (resuming when ``ckpt_path`` says
    so, see ``resolve_ckpt_path``), save ``checkpoints/last.ckpt``."""
    import lightning as L

    from d2v_train.lightning.callbacks import TrainingCollapsedError
    from d2v_train.lightning.checkpointing import ExactResume, final_state_saved, resolve_ckpt_path

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(f"missing value for '{key}': set it on the command line ({key}=...)")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the teacher, on purpose
    warnings.filterwarnings("ignore", message=r".*val_dataloader.*no `validation_step`.*")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")  # a skipped NaN step: logged by us
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir = Path(str(cfg.run_dir))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path", "auto"), run_dir)
    if ckpt_path is not None:
        print(f"d2v-pretrain: resuming from {ckpt_path} (ckpt_path=null starts over)", flush=True)
    model, datamodule, trainer = build(cfg)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tokenizer = getattr(datamodule, "tokenizer_path", None)
        if tokenizer is not None and Path(tokenizer).is_file():
            # the vocabulary belongs to the weights: fine-tuning and export find it beside the run
            shutil.copyfile(tokenizer, run_dir / TOKENIZER_FILE)
    start = time.perf_counter()
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except TrainingCollapsedError as e:
        kept = f"; last good checkpoint: {last}" if last.is_file() else "; no checkpoint was written"
        raise UserError(f"stopped: {e}{kept}") from None
    exact = next(cb for cb in trainer.callbacks if isinstance(cb, ExactResume))  # type: ignore[attr-defined]
    fresh = exact.trained or ckpt_path is None  # a re-run of a finished command trains nothing: keep its file
    if not getattr(trainer, "interrupted", False) and fresh and not final_state_saved(trainer):
        # the final state when no RunCheckpoint wrote it (callbacks=none, or a stop before max_steps)
        trainer.save_checkpoint(str(last), weights_only=False)
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    metrics["wall_s"] = wall
    metrics["global_step"] = float(trainer.global_step)
    if trainer.is_global_zero:
        loss = metrics.get("train/loss")
        print(
            f"d2v-pretrain: done: {trainer.global_step} updates in {wall:.1f} s"
            + (f", final loss {loss:.4f}" if loss is not None else "")
            + f"; run dir {run_dir} (config.yaml, metrics.csv, checkpoints/last.ckpt)"
        )
    return metrics


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``d2v-pretrain``."""
    return run_app(train, "pretrain", "d2v-pretrain", validate=validate_config, argv=argv)


if __name__ == "__main__":
    main()
