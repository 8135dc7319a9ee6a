"""``d2v-pretrain`` / ``python -m d2v_train.pretrain``: data2vec pretraining as a Hydra app.

    d2v-pretrain                                  # tiny ViT on the bundled digits, CPU, ~2 minutes
    d2v-pretrain modality=audio trainer.max_steps=100
    d2v-pretrain experiment=vision_base_imagenet data.path=/data/imagenet/train

The run directory (``hydra.run.dir``) receives ``config.yaml`` (resolved), ``metrics.csv``,
``checkpoints/last.ckpt`` and ``report/`` (plots + ``summary.md``, as ``d2v-report`` writes them).
``train(cfg)`` is the whole run and is usable from Python and tests.

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
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from d2v_train.cli import ConfigError, Stopped, UserError, check_fields, check_trainer, run_app
from d2v_train.config_values import plain
from d2v_train.interop.sources import TOKENIZER_FILE
from d2v_train.logs import quiet_warnings

__all__ = ["main", "train", "build", "validate_config"]

log = logging.getLogger("d2v_train.pretrain")


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
    from d2v_train.objective.multimask import EXACT_MASK_KINDS

    valid_v1 = ("token",) if modality == "text" else tuple(k for k in MASK_KINDS if k != "token")
    # data2vec 2.0 gathers kept tokens: exact counts per row
    valid_v2 = ("inverse_block", "random") if modality == "vision" else tuple(k for k in EXACT_MASK_KINDS if k != "inverse_block")
    version = cfg.objective.get("version", 1)
    other_version = 1 if version == 2 else 2
    valid, other = (valid_v2, valid_v1) if version == 2 else (valid_v1, valid_v2)
    if kind not in valid:
        name = {1: "v1", 2: "2.0"}
        hint = ""
        if kind in other:  # e.g. masking=text (BERT) with modality=text, whose default objective is 2.0
            hint = (f"; masking.kind={kind} goes with data2vec {name[other_version]}: add "
                    f"objective=d2v{other_version}_{modality}, or drop the masking= override")
        raise ConfigError(f"bad value for 'masking.kind': {kind!r}; valid choices for {modality} with data2vec "
                          f"{name[version]} (objective.version={version}): {', '.join(valid)}{hint}")
    check_trainer(OmegaConf.to_container(cfg.trainer, resolve=False))  # type: ignore[arg-type]
    from d2v_train.choices import data_modality, encoder_modality, mismatch
    from d2v_train.models import ENCODERS

    found = data_modality(cfg.data.get("_target_")) if cfg.get("data") is not None else None
    if found and found != modality:
        raise ConfigError(mismatch(f"data={_choice('data', cfg.data.get('_target_'))}", found, modality))
    enc_node = OmegaConf.to_container(cfg.encoder, resolve=False)
    found = encoder_modality(enc_node)  # type: ignore[arg-type]
    if found and found != modality:
        raise ConfigError(mismatch(f"encoder={_choice('encoder')}", found, modality))
    _, enc_cls = ENCODERS[modality]
    check_fields(enc_node, enc_cls, "encoder")  # type: ignore[arg-type]


def _choice(group: str, target: Any = None) -> str:
    """The option chosen for ``group`` (from Hydra's record when running, else by the data target)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices.get(group)
        if chosen:
            return str(chosen)
    if target:
        from d2v_train.cli import config_dir

        for path in sorted((Path(config_dir()) / group).glob("*.yaml")):
            if f"_target_: {target}" in path.read_text():
                return path.stem
    return "..."


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

    from d2v_train.lightning.callbacks import CloseProcessGroup
    from d2v_train.lightning.checkpointing import AtomicCheckpointIO, ExactResume
    from d2v_train.lightning.console import QuietWorkers, drop_disabled
    from d2v_train.lightning.loggers import RunCSVLogger
    from d2v_train.lightning.pretrain import Data2VecPretraining
    from d2v_train.models import build_encoder

    from lightning.pytorch.utilities import rank_zero_only

    from d2v_train.data import DataError

    modality = cfg.modality
    if datamodule is None:
        try:
            datamodule = instantiate(cfg.data)
        except Exception as e:  # bad data options: one clear line
            raise ConfigError(f"data: {e.__cause__ or e}") from None
    enc_cfg = dict(plain(cfg.encoder))
    special: Optional[dict[str, int]] = None
    vocab_size: Optional[int] = None
    if modality == "text" or rank_zero_only.rank == 0:
        # text: the tokenizer decides the vocabulary and the special ids, the encoder follows it;
        # every modality: unusable data is reported before the model and the Trainer are built
        try:
            datamodule.prepare_data()
            datamodule.setup("fit")
        except DataError as e:
            raise UserError(str(e)) from None
    if modality == "text":
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
        objective=plain(cfg.objective),
        masking=plain(cfg.masking),
        optim=plain(cfg.optim),
        special_token_ids=special,
        vocab_size=vocab_size,
        seed=int(cfg.seed),
        compile=bool(cfg.get("compile", False)),
    )

    loggers = _instantiate_loggers(cfg)
    if not any(isinstance(lg, CSVLogger) for lg in loggers):  # metrics.csv is always written
        loggers.insert(0, RunCSVLogger(save_dir=str(cfg.run_dir)))
    # ExactResume is part of correctness (like the EMA step), not an optional callback
    callbacks = [*_instantiate_named(cfg.get("callbacks")), ExactResume(), QuietWorkers(), CloseProcessGroup()]
    trainer_args = plain(cfg.trainer)
    trainer_args["strategy"] = ddp_strategy(trainer_args.get("strategy", "auto"), encoder)
    accumulate = int(trainer_args.get("accumulate_grad_batches") or 1)
    if isinstance(trainer_args.get("val_check_interval"), int) and trainer_args.get("check_val_every_n_epoch") is None:
        trainer_args["val_check_interval"] *= accumulate  # configured in updates; Lightning counts batches
    callbacks = drop_disabled(callbacks, trainer_args)
    trainer = L.Trainer(**trainer_args, logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    return model, datamodule, trainer


def ddp_strategy(strategy: Any, encoder: Any) -> Any:
    """``ddp`` / ``ddp_spawn`` get ``find_unused_parameters`` only when the encoder can leave blocks
    unused in a step (layerdrop > 0): the search costs an extra pass over the graph every update, and
    DDP warns on every rank when it finds nothing."""
    if not isinstance(strategy, str) or strategy not in ("ddp", "ddp_spawn"):
        return strategy
    if float(getattr(encoder.config, "layerdrop", 0.0) or 0.0) > 0:
        return f"{strategy}_find_unused_parameters_true"
    return strategy


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


def _start_over(run_dir: Path, ckpt_setting: Any) -> None:
    """A fresh start in a run directory that holds an earlier attempt: move that attempt's files aside
    (so ``metrics.csv`` lists each update once) and say so in one line."""
    from d2v_train.lightning.checkpointing import set_aside_attempt

    explicit = str(ckpt_setting).strip().lower() in ("", "none", "null")
    moved = set_aside_attempt(run_dir)
    if moved is None:
        return
    why = "ckpt_path=null" if explicit else f"{run_dir} holds an earlier attempt but no checkpoint to resume from"
    log.warning("d2v-pretrain: %s: starting over; the earlier attempt's files were moved to %s", why, moved)


def train(cfg: DictConfig) -> dict[str, float]:
    """The whole run: seed, build, write the resolved config, fit (resuming when ``ckpt_path`` says
    so, see ``resolve_ckpt_path``), save ``checkpoints/last.ckpt``."""
    import lightning as L

    from lightning.pytorch.utilities import rank_zero_only

    from d2v_train.lightning.callbacks import OnlineProbe, TrainingCollapsedError
    from d2v_train.lightning.checkpointing import ExactResume, final_state_saved, resolve_ckpt_path, updates_done
    from d2v_train.lightning.preemption import PreemptionCheckpoint

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(f"missing value for '{key}': set it on the command line ({key}=...)")
    quiet_warnings()
    warnings.filterwarnings("ignore", message=r".*val_dataloader.*no `validation_step`.*")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")  # a skipped NaN step: logged by us
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir = Path(str(cfg.run_dir))
    ckpt_setting = cfg.get("ckpt_path", "auto")
    ckpt_path = resolve_ckpt_path(ckpt_setting, run_dir)
    if ckpt_path is not None:
        log.info("d2v-pretrain: resuming from %s (ckpt_path=null starts over)", ckpt_path)
    elif rank_zero_only.rank == 0:
        _start_over(run_dir, ckpt_setting)
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
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)), None)  # type: ignore[attr-defined]
    if stop is not None and stop.stopped_by is not None:
        raise Stopped(
            f"stopped by {stop.stopped_by} at update {trainer.global_step}"
            + (f" of {trainer.max_steps}" if trainer.max_steps > 0 else "")
            + f"; saved {last}; run the same command again (same hydra.run.dir) to continue",
            signum=int(getattr(signal, stop.stopped_by)),
        )
    exact = next(cb for cb in trainer.callbacks if isinstance(cb, ExactResume))  # type: ignore[attr-defined]
    fresh = exact.trained or ckpt_path is None  # a re-run of a finished command trains nothing: keep its file
    if not getattr(trainer, "interrupted", False) and fresh and not final_state_saved(trainer):
        # the final state when no RunCheckpoint wrote it (callbacks=none, or a stop before max_steps)
        trainer.save_checkpoint(str(last), weights_only=False)
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    metrics["wall_s"] = wall
    steps = updates_done(trainer, last)
    metrics["global_step"] = float(steps)
    probe = next((cb for cb in trainer.callbacks if isinstance(cb, OnlineProbe)), None)  # type: ignore[attr-defined]
    if probe is not None:
        metrics.update(probe.final)
    if trainer.is_global_zero and cfg.get("report", True) and not getattr(trainer, "interrupted", False):
        _write_report(run_dir, wall, steps, probe)
    if trainer.is_global_zero:
        loss = metrics.get("train/loss")
        log.info(
            f"d2v-pretrain: done: {steps} updates in {wall:.1f} s"
            + (f", final loss {loss:.4f}" if loss is not None else "")
            + f"; run dir {run_dir} (config.yaml, metrics.csv, checkpoints/last.ckpt, pretrain.log)"
        )
    return metrics


def _write_report(run_dir: Path, wall: float, updates: int, probe: Any) -> None:
    """``<run dir>/report/``: plots and summary.md (``d2v-report``); never fails the run."""
    from d2v_train.eval.report import read_metrics, run_warnings, write_report

    extra = {"wall_s": wall, "updates": updates}
    if probe is not None and probe.line:
        extra.update(probe_line=probe.line, probe_s=probe.seconds)
    try:
        summary = write_report(run_dir, extra)
        # the probe callback and the module (teacher still near its init) printed their own warnings
        warns = [w for w in run_warnings(read_metrics(run_dir / "metrics.csv")) if "online probe" not in w and "teacher barely moved" not in w]
    except Exception as e:  # noqa: BLE001 - a report is a courtesy, the run itself succeeded
        log.warning("run report not written: %s: %s", type(e).__name__, e)
        return
    for w in warns:  # the probe's own warning was printed by the callback
        log.warning("%s", w)
    log.info("d2v-pretrain: report %s (plots beside it; report=false turns it off)", summary)


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``d2v-pretrain``. ``data=`` / ``encoder=`` imply ``modality=`` (which picks the
    matching masking and objective): ``d2v-pretrain data=text`` is text pretraining."""
    import sys

    from d2v_train.choices import imply_modality
    from d2v_train.cli import fail

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = imply_modality(args)
    except ConfigError as e:
        fail(str(e), "d2v-pretrain")
    return run_app(train, "pretrain", "d2v-pretrain", validate=validate_config, argv=args, help_hidden=("callbacks:finetune",))


if __name__ == "__main__":
    main()
