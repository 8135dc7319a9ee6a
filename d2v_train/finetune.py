"""``d2v-finetune`` / ``python -m d2v_train.finetune``: fine-tune an encoder with a task head (Hydra app).

    d2v-finetune pretrained=RUN_DIR/checkpoints/last.ckpt        # digits classification, CPU, ~2 min
    d2v-finetune head=ctc pretrained=runs/pretrain/audio/.../checkpoints/last.ckpt
    d2v-finetune recipe=ctc_10h pretrained=/models/data2vec-audio-base data.path=/data/ls10h/train.tsv
    d2v-finetune -m optim.lr=1e-5,3e-5,1e-4 seed=1,2 pretrained=...   # sweep -> sweep_results.csv

``pretrained=`` is a ``d2v-pretrain`` (or ``d2v-finetune``) ``.ckpt``, a ``d2v_train.save_encoder``
directory or a transformers Data2Vec directory; ``null`` starts from a random encoder (``encoder=``).
The run directory gets ``config.yaml``, ``metrics.csv``, ``checkpoints/{best,last}.ckpt`` (best by the
task's metric), ``result.json`` and, with ``export=true``, the best model as a transformers
directory under ``model/`` (a complete Hub model: preprocessor / tokenizer files, ``vocab.json`` for
CTC, a ``README.md`` model card; see docs/export.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from d2v_train.cli import ConfigError, UserError, check_fields, check_trainer, run_app
from d2v_train.config_values import plain

__all__ = ["main", "train", "build", "validate_config"]

log = logging.getLogger("d2v_train.finetune")


def _non_null(node: Any) -> dict[str, Any]:
    return {k: v for k, v in (plain(node) or {}).items() if v is not None}


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# ------------------------------------------------------------------------------------------ checks


def validate_config(cfg: DictConfig) -> None:
    """Schema checks (raise ``ConfigError``): head/task, optim, finetune, trainer, encoder overrides."""
    from d2v_train.lightning.finetune import FinetuneConfig
    from d2v_train.lightning.optim import OptimConfig
    from d2v_train.models import ENCODERS
    from d2v_train.models.heads import TASKS

    modality = cfg.get("modality")
    if modality not in ENCODERS:
        raise ConfigError(f"bad value for 'modality': {modality!r}; valid choices: {', '.join(sorted(ENCODERS))}")
    task = cfg.head.get("task")
    if task not in TASKS[modality]:
        raise ConfigError(f"bad value for 'head.task': {task!r}; {modality} tasks: {', '.join(sorted(TASKS[modality]))}")
    for key, schema in (("optim", OptimConfig), ("finetune", FinetuneConfig)):
        check_fields(OmegaConf.to_container(cfg[key], resolve=False), schema, key)  # type: ignore[arg-type]
    check_trainer(OmegaConf.to_container(cfg.trainer, resolve=False))  # type: ignore[arg-type]
    enc_cls = ENCODERS[modality][1]
    fields = set(enc_cls.__dataclass_fields__) - {"extra"}
    from d2v_train.choices import data_modality, options_for
    from d2v_train.pretrain import _choice

    found = data_modality(cfg.data.get("_target_")) if cfg.get("data") is not None else None
    if found and found != modality:
        name = _choice("data", cfg.data.get("_target_"))
        heads = ", ".join(sorted(t for t in TASKS[found]))
        raise ConfigError(f"data={name} is {found} data but head={task} is a {modality} task; choose {modality} data "
                          f"({', '.join(options_for('data', modality))}) or a {found} head ({heads})")
    for key in _non_null(cfg.get("encoder_overrides")):
        if key not in fields:
            raise ConfigError(f"'encoder_overrides.{key}' does not apply to a {modality} encoder; valid keys: {', '.join(sorted(fields))}")
    settings = cfg.head.get("settings") or {}
    valid = set(TASKS[modality][task].defaults) | ({"num_labels", "id2label"} if TASKS[modality][task].with_labels else set())
    for key in settings:
        if key not in valid:
            raise ConfigError(f"unknown key 'head.settings.{key}' for {task}; valid keys: {', '.join(sorted(valid))}")
    if not cfg.get("pretrained"):
        check_fields(OmegaConf.to_container(cfg.encoder, resolve=False), enc_cls, "encoder")  # type: ignore[arg-type]


def _precheck(cfg: DictConfig) -> None:
    """``run_app``'s validation: skipped inside a sweep, where the task wrapper validates each job
    itself so one bad job is recorded as failed instead of ending the sweep."""
    if not _in_multirun():
        validate_config(cfg)


# ------------------------------------------------------------------------------------------ build


def _load_source(cfg: DictConfig) -> Any:
    from d2v_train.lightning.pretrained import load_pretrained

    spec = cfg.get("pretrained")
    if not spec:
        return None
    try:
        pre = load_pretrained(str(spec))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(str(e)) from None
    if pre.encoder.modality != cfg.modality:
        raise ConfigError(
            f"pretrained={spec} is a {pre.encoder.modality} encoder but head={cfg.head.task} is a {cfg.modality} "
            f"task; pick a {pre.encoder.modality} head (head=...)"
        )
    # data settings that follow the encoder (image_size, conv strides, do_normalize) read the real one
    with open_dict(cfg):
        enc = {k: v for k, v in pre.encoder.config.to_dict().items() if k != "extra"}
        cfg.encoder = OmegaConf.create(enc)
        tokenizer = pre.extras.get("tokenizer")
        if cfg.modality == "text" and tokenizer and "tokenizer" in cfg.data and cfg.data.tokenizer is None:
            # the vocabulary the encoder was pretrained with, saved beside it
            log.info("text data uses the pretrained encoder's tokenizer %s", tokenizer)
            cfg.data.tokenizer = tokenizer
    return pre


def _datamodule(cfg: DictConfig) -> Any:
    from hydra.utils import instantiate

    try:
        dm = instantiate(cfg.data)
    except Exception as e:
        raise ConfigError(f"data: {e.__cause__ or e}") from None
    if getattr(dm, "modality", cfg.modality) != cfg.modality:
        raise ConfigError(f"data={type(dm).__name__} is {dm.modality} data but head={cfg.head.task} needs {cfg.modality} data")
    return dm


def _setup_data(dm: Any) -> None:
    from d2v_train.data import DataError

    try:
        dm.prepare_data()
        dm.setup("fit")
    except DataError as e:
        raise UserError(str(e)) from None
    if dm.val_set is None or len(dm.val_set) == 0:
        raise UserError("the data has no validation split (set data.val_fraction > 0 or data.val_path): "
                        "fine-tuning validates every epoch and keeps the best checkpoint by the task's metric")


def _encoder(cfg: DictConfig, pre: Any, dm: Any) -> Any:
    from d2v_train.lightning.pretrained import rebuild_encoder
    from d2v_train.models import build_encoder

    if pre is None:
        enc_cfg = dict(plain(cfg.encoder))
        if cfg.modality == "text":  # a fresh encoder follows the data's tokenizer
            enc_cfg["vocab_size"] = int(dm.vocab_size)
            for key in ("pad", "bos", "eos"):
                if dm.special_token_ids.get(key) is not None:
                    enc_cfg[f"{key}_token_id"] = int(dm.special_token_ids[key])
        try:
            encoder = build_encoder(cfg.modality, enc_cfg)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"encoder: {e}") from None
    else:
        encoder = pre.encoder
        if cfg.modality == "text" and int(dm.vocab_size) > int(encoder.config.vocab_size):
            raise ConfigError(
                f"the data's tokenizer has {dm.vocab_size} tokens but the pretrained encoder's vocabulary has "
                f"{encoder.config.vocab_size}: set data.tokenizer= to the tokenizer it was pretrained with"
            )
    overrides = _non_null(cfg.get("encoder_overrides"))
    if cfg.modality == "audio":
        # the encoder config records the fine-tuning masks (as transformers' Data2VecAudioConfig does),
        # which also decides whether it has a mask embedding
        for key in ("mask_time_prob", "mask_time_length", "mask_time_min_masks", "mask_feature_prob", "mask_feature_length"):
            overrides[key] = cfg.finetune[key]
    try:
        return rebuild_encoder(encoder, overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _skip_clips_too_short_for_head(cfg: DictConfig, encoder: Any, dm: Any) -> None:
    """Raise the data's ``min_sample_size`` to the shortest clip the head can pool (x-vector: 16
    frames after the CNN with its default TDNN), so such clips are skipped and counted at set-up
    like any other unusable item, instead of failing the batch they land in."""
    from d2v_train.models.heads import head_class

    task = str(cfg.head.task)
    try:
        head_cls = head_class(task, "audio")
    except ValueError as e:
        raise ConfigError(f"head: {e}") from None
    if not hasattr(head_cls, "min_samples") or not hasattr(dm, "min_sample_size"):
        return
    need = head_cls.min_samples(encoder, _non_null(cfg.head.get("settings")))
    if need > int(dm.min_sample_size):
        rate = int(getattr(dm, "sample_rate", 16000))
        log.info("head=%s needs clips of at least %d samples (%.3f s at %d Hz); shorter ones are skipped (data.min_sample_size was %d)",
                 task, need, need / rate, rate, dm.min_sample_size)  # fmt: skip
        dm.min_sample_size = need


def _head_settings(cfg: DictConfig, dm: Any) -> tuple[dict[str, Any], Optional[list[str]], Optional[list[str]]]:
    """Head settings from ``head.settings`` plus what the data decides (classes, CTC vocabulary)."""
    settings = _non_null(cfg.head.get("settings"))
    task = cfg.head.task
    classes = getattr(dm, "classes", None)
    classes = [str(c) for c in classes] if classes else None
    vocab = None
    if task == "ctc":
        v = getattr(dm, "vocab", None)
        if v is None:
            raise ConfigError("head=ctc needs transcripts: use data=speech data.kind=sentences or data.labels=transcript")
        vocab = list(v.symbols)
        settings.setdefault("vocab_size", len(vocab))
        settings.setdefault("pad_token_id", 0)
        if int(settings["vocab_size"]) != len(vocab):
            raise ConfigError(f"head.settings.vocab_size={settings['vocab_size']} but the transcripts have {len(vocab)} symbols")
    elif classes and "num_labels" not in settings and "id2label" not in settings:
        settings["id2label"] = {str(i): c for i, c in enumerate(classes)}
    return settings, vocab, classes


def _load_head_weights(model: Any, pre: Any) -> None:
    if pre is None or not pre.task_state or pre.architecture != model.architecture:
        return
    state = {k: v for k, v in pre.task_state.items() if not k.startswith("encoder.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        log.warning("pretrained %s head does not fit this one (labels or vocabulary differ): starting a new head", pre.architecture)
        return
    model.load_state_dict(state, strict=False)
    log.info("kept the pretrained %s head weights", pre.architecture)


def _callbacks(cfg: DictConfig, metric: str, mode: str) -> list[Any]:
    from hydra.utils import instantiate

    out = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        extra = {}
        if str(node.get("_target_", "")).endswith("ModelCheckpoint") and node.get("monitor", None) is None and node.get("save_top_k", 1) != 0:
            extra = {"monitor": metric, "mode": mode}
        out.append(instantiate(node, **extra))
    return out


def build(cfg: DictConfig, datamodule: Any = None) -> tuple[Any, Any, Any]:
    """(FineTuning module, datamodule, Trainer) from a composed config."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    from d2v_train.lightning.callbacks import CloseProcessGroup
    from d2v_train.lightning.checkpointing import AtomicCheckpointIO
    from d2v_train.lightning.console import QuietWorkers, drop_disabled
    from d2v_train.lightning.finetune import FineTuning
    from d2v_train.lightning.loggers import RunCSVLogger
    from d2v_train.models.heads import build_head

    pre = _load_source(cfg)
    dm = datamodule if datamodule is not None else _datamodule(cfg)
    if cfg.modality == "audio":  # the encoder needs nothing from the data; the data needs the head's shortest clip
        encoder = _encoder(cfg, pre, dm)
        _skip_clips_too_short_for_head(cfg, encoder, dm)
        _setup_data(dm)
    else:  # text: the encoder follows the data's tokenizer
        _setup_data(dm)
        encoder = _encoder(cfg, pre, dm)
    settings, vocab, classes = _head_settings(cfg, dm)
    try:
        model = build_head(cfg.head.task, encoder, **settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"head: {e}") from None
    _load_head_weights(model, pre)
    try:
        module = FineTuning(
            model, cfg.head.task, optim=plain(cfg.optim), finetune=plain(cfg.finetune),
            vocab=vocab, classes=classes, seed=int(cfg.seed),
            special_token_ids=getattr(dm, "special_token_ids", None) if cfg.modality == "text" else None,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    metric, mode = module.metric
    loggers = [instantiate(v) for v in (cfg.get("logger") or {}).values() if v is not None]
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.insert(0, RunCSVLogger(save_dir=str(cfg.run_dir)))
    trainer_args = plain(cfg.trainer)
    if trainer_args.get("strategy") in ("ddp", "ddp_spawn"):
        # frozen blocks (freeze_encoder_steps), an unused pooler: a head may leave parameters unused
        trainer_args["strategy"] = f"{trainer_args['strategy']}_find_unused_parameters_true"
    callbacks = drop_disabled([*_callbacks(cfg, metric, mode), QuietWorkers(), CloseProcessGroup()], trainer_args)
    trainer = L.Trainer(**trainer_args, logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    return module, dm, trainer


# ------------------------------------------------------------------------------------------ run


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _job_num() -> Optional[int]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    num = HydraConfig.get().job.get("num")
    return int(num) if num is not None else None


def export_best(module: Any, best_path: str, out_dir: Path, record: Any = None, tokenizer: Optional[Path] = None) -> Optional[Path]:
    """The best checkpoint's weights as a complete transformers directory: weights, preprocessor /
    tokenizer files (``vocab.json`` for CTC) and a model card from ``record`` (the run's records)."""
    from d2v_train.interop import save_transformers_task
    from d2v_train.interop.files import torch_load_safely
    from d2v_train.interop.hub import write_hub_files
    from d2v_train.interop.run_record import RunRecord

    if best_path and Path(best_path).is_file():
        state = torch_load_safely(Path(best_path))["state_dict"]
        module.load_state_dict(state)
    save_transformers_task(module.model, out_dir)
    write_hub_files(module.model, module.model.architecture, out_dir, record or RunRecord(kind="finetuning"),
                    tokenizer=tokenizer, ctc_vocab=module.vocab)
    return out_dir


def train(cfg: DictConfig) -> dict[str, float]:
    """The whole run: seed, build, fit with validation each epoch, report, export, ``result.json``."""
    import lightning as L

    from d2v_train.lightning.checkpointing import updates_done
    from d2v_train.lightning.sweep import record_job

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir = Path(str(cfg.run_dir))
    module, dm, trainer = build(cfg)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if module.vocab:
            (run_dir / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(module.vocab)}, indent=1))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    wall = time.perf_counter() - start
    metric, mode = module.metric
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    ckpt = trainer.checkpoint_callback
    best_path = getattr(ckpt, "best_model_path", "") or ""
    best = getattr(ckpt, "best_model_score", None)
    if best is not None:
        metrics[f"best/{metric.split('/', 1)[1]}"] = float(best)
    metrics["wall_s"] = wall
    updates = updates_done(trainer, run_dir / "checkpoints" / "last.ckpt")
    metrics["global_step"] = float(updates)
    if trainer.is_global_zero:
        if cfg.get("export", True) and not getattr(trainer, "interrupted", False):
            try:
                from d2v_train.interop.run_record import METRICS_FILE, RunRecord, read_metrics

                logged, step = read_metrics(run_dir / METRICS_FILE)
                record = RunRecord(kind="finetuning", source=Path(best_path) if best_path else None, run_dir=run_dir,
                                   config=plain(cfg), hparams=dict(module.hparams), metrics={**logged, **metrics},
                                   step=step, updates=updates, datamodule=dm)
                tokenizer = getattr(dm, "tokenizer_path", None)
                export_best(module, best_path, run_dir / "model", record, Path(tokenizer) if tokenizer else None)
            except (TypeError, ValueError) as e:  # e.g. a head without a transformers class
                log.warning("export skipped: %s", e)
        record_job(run_dir, _overrides(), "ok", metrics, job_num=_job_num())
        final = metrics.get(metric)
        shown = f"{metric} {final:.4f}" if final is not None else f"no {metric}"
        best_s = f" (best {float(best):.4f}, {Path(best_path).name})" if best is not None else ""
        log.info(f"d2v-finetune: done: {updates} updates in {wall:.1f} s; final {shown}{best_s}; run dir {run_dir}")
    return metrics


def task(cfg: DictConfig) -> Optional[dict[str, float]]:
    """Hydra task: ``train``; inside a sweep a failing job is recorded in its ``result.json``
    (status ``failed`` + the error) and the sweep goes on."""
    if not _in_multirun():
        return train(cfg)
    from hydra.core.hydra_config import HydraConfig

    from d2v_train.lightning.sweep import record_job

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        validate_config(cfg)
        return train(cfg)
    except Exception as e:  # noqa: BLE001 - a sweep records every failure and moves on
        msg = " ".join(str(e).split()) or type(e).__name__
        record_job(run_dir, _overrides(), "failed", error=f"{type(e).__name__}: {msg[:300]}", job_num=_job_num())
        log.error("job %s failed: %s: %s", _job_num(), type(e).__name__, msg[:300])  # console and finetune.log
        return None


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``d2v-finetune``."""
    return run_app(task, "finetune", "d2v-finetune", validate=_precheck, argv=argv, help_hidden=("head_data", "callbacks:default"))


if __name__ == "__main__":
    main()
