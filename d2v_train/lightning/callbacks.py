"""Callbacks for pretraining runs: collapse monitor, non-finite loss guard, throughput, online probe,
and the clean end of a multi-process run (also used by fine-tuning).

The EMA update itself lives in ``Data2VecPretraining.optimizer_step``: it is part of the method,
so a run without callbacks is still correct. These callbacks read ``pl_module.last_stats`` (detached,
already all-reduced tensors written by ``training_step``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Union

import lightning as L
import torch

__all__ = ["CloseProcessGroup", "CollapseMonitor", "NonFiniteLossGuard", "OnlineProbe", "ThroughputMonitor", "TrainingCollapsedError"]

log = logging.getLogger("d2v_train.pretrain")


class TrainingCollapsedError(RuntimeError):
    """Raised when targets or predictions lose their variance (representation collapse)."""


class CloseProcessGroup(L.Callback):
    """Ends a multi-process run on every rank together: after the last hook, each rank waits for the
    others (rank 0 may still be probing or saving) and closes the process group. Lightning leaves the
    group to interpreter exit; a ``ddp_cpu`` worker that exited that way while rank 0 was still at
    work once aborted in a test run (``terminate called without an active exception``, SIGABRT) and
    failed a run that had finished. torch's documentation asks programs to close the group before
    they exit; doing so once every rank is done takes that exit path away."""

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class CollapseMonitor(L.Callback):
    """Stops training when the all-reduced per-dimension std of the targets or predictions falls
    below its threshold after ``check_after`` updates (reference: 0.1 / 0.01 after 5000).

    Thresholds default to the module's ``objective`` config; 0 disables a check. Every rank sees the
    same all-reduced values, so every rank stops together.
    """

    def __init__(
        self,
        min_target_std: Optional[float] = None,
        min_pred_std: Optional[float] = None,
        check_after: Optional[int] = None,
    ) -> None:
        self.min_target_std = min_target_std
        self.min_pred_std = min_pred_std
        self.check_after = check_after

    def _limits(self, pl_module: Any) -> tuple[float, float, int]:
        obj = getattr(pl_module, "objective", None)
        t = self.min_target_std if self.min_target_std is not None else getattr(obj, "min_target_std", 0.0)
        p = self.min_pred_std if self.min_pred_std is not None else getattr(obj, "min_pred_std", 0.0)
        a = self.check_after if self.check_after is not None else getattr(obj, "collapse_check_after", 0)
        return float(t), float(p), int(a)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        min_t, min_p, after = self._limits(pl_module)
        stats = getattr(pl_module, "last_stats", {})
        if trainer.global_step < after or not stats or (min_t <= 0 and min_p <= 0):
            return
        t_std, p_std = float(stats["target_std"]), float(stats["pred_std"])
        step = trainer.global_step
        if min_t > 0 and t_std < min_t:
            raise TrainingCollapsedError(
                f"target std {t_std:.4g} < objective.min_target_std={min_t} at update {step}: the teacher's "
                "representations collapsed; lower the learning rate or raise the EMA decay "
                "(set objective.min_target_std=0 to disable this check)"
            )
        if min_p > 0 and p_std < min_p:
            raise TrainingCollapsedError(
                f"prediction std {p_std:.4g} < objective.min_pred_std={min_p} at update {step}: the student's "
                "predictions collapsed; lower the learning rate (set objective.min_pred_std=0 to disable)"
            )


class NonFiniteLossGuard(L.Callback):
    """Stops the run after ``max_consecutive`` NaN / inf losses in a row.

    The module already skips each such update (no optimizer or EMA step); a long streak means the
    run will not recover by itself (e.g. the weights became non-finite), so it is stopped with one
    line instead of burning compute. No final checkpoint is written: ``checkpoints/last.ckpt`` stays
    the last good one (``AtomicCheckpointIO`` never writes non-finite weights either). 0 disables.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = int(max_consecutive)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        streak = int(getattr(pl_module, "bad_streak", 0))
        if self.max_consecutive > 0 and streak >= self.max_consecutive:
            raise TrainingCollapsedError(
                f"{streak} non-finite (NaN/inf) losses in a row at update {trainer.global_step} "
                f"({getattr(pl_module, 'skipped_steps', streak)} skipped in all); lower the learning rate "
                f"or check the data (limit: callbacks.nonfinite.max_consecutive={self.max_consecutive})"
            )


class ThroughputMonitor(L.Callback):
    """Logs ``train/samples_per_s`` and ``train/tokens_per_s`` (audio frames, image patches, text
    tokens, over all ranks) measured between consecutive training batches."""

    def __init__(self) -> None:
        self._t: Optional[float] = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._t is None:
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        stats = getattr(pl_module, "last_stats", {})
        if self._t is not None and stats:
            dt = max(now - self._t, 1e-9)
            kw = dict(on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
            pl_module.log("train/samples_per_s", float(stats["samples"]) / dt, **kw)
            pl_module.log("train/tokens_per_s", float(stats["tokens"]) / dt, **kw)
        self._t = now


class OnlineProbe(L.Callback):
    """Is the run learning? Every ``every_n_updates`` updates (and after the last one) the student's
    frozen features of the data module's ``probe_sets()`` are judged by a linear probe and a weighted
    kNN; logged as ``probe/linear_acc`` and ``probe/knn_acc`` to every logger (metrics.csv,
    TensorBoard, W&B).

    The student runs in eval mode under inference mode (no gradient reaches it) and the classifier
    is fitted on the cached features with its own optimizer; nothing draws from the global RNG, so
    probing does not change the run and a resumed run logs what a straight one does. The periodic
    probes fit at a fixed ``C`` (torch L-BFGS from zeros, a few ms: a cheap curve), or with ``C="cv"``
    at a C chosen at every probe by cross-validation on the labelled training set (25 such fits:
    about a second on digits), logged as ``probe/linear_C``: encoders whose features want different
    regularisation (a pre-norm v1 ViT against a post-norm 2.0 one) are then compared at their own
    best C rather than ranked by how well one fixed C suits them. After the last
    update the run's encoder and the same architecture at random initialisation (built from the same
    config under the run's seed) are probed as ``d2v-eval`` does (scikit-learn, ``final_C``: by
    default chosen for each by cross-validation on the labelled set, since one fixed C under-fits
    some feature sets far more than others); logged as ``probe/final_linear_acc`` /
    ``probe/final_linear_C`` and ``probe/random_init_linear_acc`` / ``_linear_C`` / ``_knn_acc`` on
    an extra row (whose ``probe/linear_acc`` is the fixed-C curve's last point), with one comparison
    line and a WARNING when pretraining did not beat it. ``compare_baseline`` adds the baseline a user
    would try first on the same task, probed the same way (raw pixels, TF-IDF or log-mel:
    ``probe/baseline_linear_acc`` / ``_linear_C``), so the line also says whether the features are
    worth their cost.

    Each probe row also carries ``probe/train_s``: seconds of training so far, probing and
    validation left out and carried across resumes, so runs of different objectives can be compared
    by accuracy against the time they trained (``scripts/probe_curve.py``).

    Off (silently) when the data module has no ``probe_sets()``. On rank 0 only.
    """

    def __init__(
        self,
        every_n_updates: int = 50,
        pooling: str = "mean",
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        C: Union[float, str] = 1.0,
        final_C: Union[float, str] = "cv",
        batch_size: int = 256,
        compare_random_init: bool = True,
        compare_baseline: bool = True,
        margin: float = 0.01,
    ) -> None:
        self.every_n_updates = int(every_n_updates)
        self.pooling = pooling
        self.knn_k = int(knn_k)
        self.knn_temperature = float(knn_temperature)
        from d2v_train.eval.probe import parse_C

        self.C = parse_C(C)
        self.final_C = parse_C(final_C)
        self.batch_size = int(batch_size)
        self.compare_random_init = bool(compare_random_init)
        self.compare_baseline = bool(compare_baseline)
        self.baseline_name = ""  # raw inputs | TF-IDF | log-mel, once measured
        self.margin = float(margin)
        self.probe: Any = None
        self.token_weights: Optional[torch.Tensor] = None  # pooling=token_idf: per token id, from the training text
        self.final: dict[str, float] = {}  # last results, for the run's summary
        self.line = ""  # the end-of-run comparison line (and warning)
        self.seconds = 0.0  # time spent probing
        self._last_step = -1
        self._features_at: Optional[tuple[int, tuple[Any, Any]]] = None  # (update, features) of the last periodic probe
        self.train_s = 0.0  # training wall time before this process's start (from a resumed checkpoint)
        self._start = 0.0  # perf_counter at this process's train start
        self._paused = 0.0  # seconds of this process spent probing or validating
        self._val_start: Optional[float] = None

    def state_dict(self) -> dict[str, float]:
        return {"train_s": self._train_seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_s = float(state.get("train_s", 0.0))

    def _train_seconds(self) -> float:
        if not self._start:
            return self.train_s
        return self.train_s + time.perf_counter() - self._start - self._paused

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start, self._paused = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._val_start is not None:
            self._paused += time.perf_counter() - self._val_start
        self._val_start = None

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.probe = None
        dm = getattr(trainer, "datamodule", None)
        if stage != "fit" or dm is None or not hasattr(dm, "probe_sets") or not trainer.is_global_zero:
            return
        try:
            self.probe = dm.probe_sets()
        except Exception as e:  # a monitor must never stop a run
            log.warning("online probe off: the data module's probe_sets() failed: %s: %s", type(e).__name__, e)
        if self.probe is not None and self.pooling == "token_idf":
            from d2v_train.eval.features import encoder_token_idf

            try:  # the IDF of every token id over the run's training text
                self.token_weights = encoder_token_idf(pl_module.student, dm.train_set)
            except Exception as e:
                log.warning("online probe off: %s", e)
                self.probe = None

    def _features(self, encoder: torch.nn.Module) -> tuple[Any, Any]:
        """``encoder``'s pooled features of the probe's training and validation sets."""
        from d2v_train.eval.features import extract_features

        kw = dict(collate_fn=self.probe.collate_fn, batch_size=self.batch_size, token_weights=self.token_weights)
        train = extract_features(encoder, self.probe.train, self.pooling, **kw)
        val = extract_features(encoder, self.probe.val, self.pooling, **kw)
        assert train.labels is not None and val.labels is not None, "probe sets must carry labels"
        return train, val

    def evaluate(
        self, encoder: torch.nn.Module, final: bool = False, features: Optional[tuple[Any, Any]] = None, curve: bool = True
    ) -> dict[str, float]:
        """Linear-probe and kNN accuracy of ``encoder``'s features on the probe sets (``features``:
        already extracted from it); ``final``: the end-of-run comparison, which adds ``d2v-eval``'s
        linear probe (scikit-learn, ``final_C``); ``curve=False`` leaves out the fixed-C linear probe
        that only the run's own curve logs."""
        from d2v_train.eval.probe import knn_accuracy, linear_probe, resolve_C, resolve_torch_C, torch_linear_probe

        p = self.probe
        train, val = features if features is not None else self._features(encoder)
        out = {"knn_acc": knn_accuracy(train.features, train.labels, val.features, val.labels, p.num_classes,
                                       k=self.knn_k, temperature=self.knn_temperature)}  # fmt: skip
        if curve:
            C = resolve_torch_C(self.C, train.features, train.labels, p.num_classes)
            if self.C == "cv":
                out["linear_C"] = C
            out["linear_acc"] = torch_linear_probe(train.features, train.labels, val.features, val.labels, p.num_classes, C=C)
        if final:
            out["final_linear_C"] = resolve_C(self.final_C, train.features, train.labels)
            out["final_linear_acc"] = linear_probe(train.features, train.labels, val.features, val.labels, C=out["final_linear_C"])
        return out

    def _run(self, pl_module: Any, step: int, final: bool = False) -> dict[str, float]:
        start = time.perf_counter()
        trained = self._train_seconds()
        # the end-of-run probe right after a periodic one at the same update reuses its features
        if self._features_at is not None and self._features_at[0] == step:
            features = self._features_at[1]
        else:
            features = self._features(pl_module.student)
        self._features_at = None if final else (step, features)
        out = self.evaluate(pl_module.student, final, features)
        self.seconds += time.perf_counter() - start
        self._paused += time.perf_counter() - start
        return {**out, "train_s": trained}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.probe is None or self.every_n_updates <= 0 or step == 0 or step % self.every_n_updates:
            return
        if step == self._last_step:
            return  # under gradient accumulation: once per update
        self._last_step = step
        out = self._run(pl_module, step)
        # straight to the loggers, on the row of this update (``self.log`` from a callback hook would
        # repeat the value on every later row of the epoch); a resume from this update keeps it
        self._log(trainer, {f"probe/{k}": v for k, v in out.items()}, step - 1)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.probe is None or getattr(trainer, "interrupted", False):
            return
        if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps:
            return  # stopped early (pre-emption, collapse): the resumed run probes its own end
        metrics = {f"probe/{k}": v for k, v in self._run(pl_module, trainer.global_step, final=True).items()}  # the curve's last point too
        if self.compare_random_init:
            from d2v_train.models import build_encoder

            student = pl_module.student
            with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay where they are
                torch.manual_seed(int(getattr(pl_module, "seed", 0)))
                fresh = build_encoder(student.modality, student.config).to(next(student.parameters()).device)
            start = time.perf_counter()
            fresh_out = self.evaluate(fresh, final=True, curve=False)
            metrics.update({"probe/random_init_linear_acc": fresh_out["final_linear_acc"], "probe/random_init_linear_C": fresh_out["final_linear_C"],
                            "probe/random_init_knn_acc": fresh_out["knn_acc"]})  # fmt: skip
            self.seconds += time.perf_counter() - start
        if self.compare_baseline:
            metrics.update(self._baseline(trainer))
        # a row after the last update's: a run resumed from this final checkpoint drops it (it probes
        # its own end again), so the history stays that of one straight run
        self._log(trainer, metrics, trainer.global_step)
        for logger in trainer.loggers:
            logger.save()
        self.final = dict(metrics)
        if self.compare_random_init:
            self.line = self.report(trainer.global_step)

    def _baseline(self, trainer: L.Trainer) -> dict[str, float]:
        """The probe of the simple baseline on the same task (``d2v_train.eval.baselines``: raw
        pixels, TF-IDF or log-mel), fitted as the end-of-run probe is; {} when none fits the data."""
        from d2v_train.eval.baselines import baseline_probe

        start = time.perf_counter()
        p = self.probe
        rate = int(getattr(getattr(trainer, "datamodule", None), "sample_rate", 16000))
        try:
            measured = baseline_probe(p.train, p.val, p.collate_fn, self.final_C, sample_rate=rate)
        except Exception as e:  # a monitor must never stop a run
            log.warning("no baseline in the end-of-run comparison: %s: %s", type(e).__name__, e)
            return {}
        finally:  # probing time, whether or not the baseline could be measured
            self.seconds += time.perf_counter() - start
        if measured is None:
            return {}
        self.baseline_name, acc, C = measured
        return {"probe/baseline_linear_acc": acc, "probe/baseline_linear_C": C}

    def report(self, updates: int) -> str:
        """The end-of-run line (printed and logged), with a WARNING when pretraining did not help."""
        m = self.final
        lin, rnd = m["probe/final_linear_acc"], m["probe/random_init_linear_acc"]
        line = (
            f"d2v-pretrain: probe on {self.probe.name} ({self.pooling}-pooled, linear / kNN accuracy): "
            f"this run {lin:.3f} / {m['probe/knn_acc']:.3f}, same architecture at random init "
            f"{rnd:.3f} / {m['probe/random_init_knn_acc']:.3f} ({100 * (lin - rnd):+.1f} points after {updates} updates; "
            f"linear probe C {m['probe/final_linear_C']:g} / {m['probe/random_init_linear_C']:g}"
            f"{', chosen by 5-fold cross-validation on the labelled set' if self.final_C == 'cv' else ''})"
        )
        if "probe/baseline_linear_acc" in m:
            line += f"; baseline ({self.baseline_name}) with the same probe {m['probe/baseline_linear_acc']:.3f}"
        log.info(line)
        if lin < rnd + self.margin:
            warn = (
                "pretraining did not beat the same encoder at random initialisation on the probe: "
                "the features learned nothing a linear classifier can use. Check the EMA schedule "
                "(a teacher that barely moved gives random targets), the lr and the number of updates."
            )
            log.warning(warn)
            line += "\nWARNING: " + warn
        return line
