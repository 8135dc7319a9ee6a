"""Never lose a run: exact resume, atomic checkpoints, no pickled code, non-finite losses skipped.

- 2N updates straight == N updates, a crash (or the end of a shorter run), a re-run of the same
  command in the same run directory, N more: the per-step metrics (metrics.csv) and the final
  student, teacher, optimizer and scheduler states are bit-identical (CPU), with dropout and
  drop-path on so the restored RNG streams matter.
- A run SIGKILLed in the middle of writing a checkpoint leaves the previous one loadable.
- A checkpoint carrying a pickle payload is refused with one line and the payload never runs.
- NaN losses skip their update (no optimizer or EMA change) and are counted; a streak stops the run
  and the checkpoint on disk stays the last finite one.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import d2v_train.pretrain as pretrain
from d2v_train.cli import ConfigError, config_dir
from d2v_train.lightning.checkpointing import CheckpointRefusedError, load_checkpoint_safely, resolve_ckpt_path
from d2v_train.lightning.pretrain import Data2VecPretraining

ROOT = Path(__file__).resolve().parents[1]
N = 3  # updates before the interruption; the straight run makes 2N

# the default runs, made small, with every random draw of the model switched on
SMALL = [
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "data.batch_size=8", "encoder.hidden_size=32", "encoder.intermediate_size=64",
    "encoder.num_hidden_layers=2", "objective.top_k=2",
    "encoder.hidden_dropout_prob=0.1", "encoder.attention_probs_dropout_prob=0.1",
    "objective.ema.decay=0.9", "objective.ema.end_decay=0.99", "objective.ema.anneal_steps=10",
    f"optim.total_steps={2 * N}", "optim.warmup_steps=2",
]
TINY = [*SMALL, "encoder.drop_path_rate=0.2"]  # vision (the default modality)
THROUGHPUT = {"train/samples_per_s", "train/tokens_per_s", "probe/train_s"}  # wall-clock: the only columns that may differ


def compose_cfg(run_dir: Path, *overrides: str, base: Optional[list[str]] = None) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"run_dir={run_dir}", *(TINY if base is None else base), *overrides])
    GlobalHydra.instance().clear()
    return cfg


def run(run_dir: Path, *overrides: str, base: Optional[list[str]] = None) -> dict[str, float]:
    return pretrain.train(compose_cfg(run_dir, *overrides, base=base))


def with_callback(monkeypatch: pytest.MonkeyPatch, callback: L.Callback) -> None:
    """Add ``callback`` (last, after the checkpoint callback) to every trainer ``build`` makes."""
    build = pretrain.build

    def patched(cfg: Any, datamodule: Any = None) -> Any:
        model, dm, trainer = build(cfg, datamodule)
        trainer.callbacks.append(callback)
        return model, dm, trainer

    monkeypatch.setattr(pretrain, "build", patched)


class Crash(L.Callback):
    """Dies when update ``at`` is about to start, like a killed job."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in THROUGHPUT} for r in csv.DictReader(f)]


def last(run_dir: Path) -> dict[str, Any]:
    return load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")


def assert_identical(a: Any, b: Any, where: str) -> None:
    """Bit-exact equality of nested checkpoint contents (tensors with ``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"] and a["d2v_ema_last_step"] == b["d2v_ema_last_step"]
    assert any(k.startswith("teacher.model.") for k in a["state_dict"])
    assert_identical(a["state_dict"], b["state_dict"], "state_dict")  # student, head, EMA teacher
    assert_identical(a["optimizer_states"], b["optimizer_states"], "optimizer")
    assert_identical(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert_identical(a["loops"]["fit_loop"]["state_dict"], b["loops"]["fit_loop"]["state_dict"], "data position")
    assert_identical(a["callbacks"]["ExactResume"], b["callbacks"]["ExactResume"], "rng")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, f"trainer.max_steps={2 * N}", f"callbacks.checkpoint.every_n_train_steps={N}")
    return run_dir


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("workers", [0, 2])
def test_crash_then_same_command_resumes_exactly(straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """Checkpoint at update N, killed during update N+2 (its row N was already logged), re-run."""
    args = [f"trainer.max_steps={2 * N}", f"callbacks.checkpoint.every_n_train_steps={N}", f"data.num_workers={workers}"]
    with monkeypatch.context() as m:
        with_callback(m, Crash(at=N + 1))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, *args)
    assert last(tmp_path)["global_step"] == N
    assert len(rows(tmp_path)) == N + 1  # one row past the checkpoint: the resume must drop it
    out = run(tmp_path, *args)  # the same command: resumes by itself (ckpt_path=auto)
    assert out["global_step"] == 2 * N
    assert rows(tmp_path) == rows(straight)
    assert_same_state(last(tmp_path), last(straight))


def test_longer_rerun_continues_a_finished_run_exactly(straight: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """N updates, then the command with max_steps=2N in the same run directory: the final checkpoint
    of the short run is a mid-epoch one, so data order, RNG and EMA position carry on."""
    run(tmp_path, f"trainer.max_steps={N}")
    caplog.clear()
    with caplog.at_level("INFO", logger="d2v_train"):
        run(tmp_path, f"trainer.max_steps={2 * N}")
    assert f"resuming from {tmp_path / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert rows(tmp_path) == rows(straight)
    assert_same_state(last(tmp_path), last(straight))


@pytest.mark.parametrize("objective", ["d2v2_text", "d2v1_text"])
def test_text_resume_is_exact(objective: str, tmp_path: Path) -> None:
    """Text with dropout, 2.0 (the preset: random masks, decoder noise) and v1 (BERT token masking):
    straight 2N vs N then the longer command in the same run dir."""
    base = [*SMALL, "modality=text", f"objective={objective}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_files=2",
            "data.vocab_size=512", "data.max_length=32", "encoder.max_position_embeddings=34"]
    run(tmp_path / "straight", f"trainer.max_steps={2 * N}", base=base)
    run(tmp_path / "resumed", f"trainer.max_steps={N}", base=base)
    run(tmp_path / "resumed", f"trainer.max_steps={2 * N}", base=base)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    assert_same_state(last(tmp_path / "resumed"), last(tmp_path / "straight"))


def chirp_folder(folder: Path, count: int = 12) -> Path:
    """``count`` 16 kHz wav files of different lengths (so pad batching pads), chirps with noise."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        t = np.arange(int(16000 * rng.uniform(0.4, 0.8))) / 16000
        f0, rate = rng.uniform(200, 1500), rng.uniform(-800, 800)
        wav = np.sin(2 * np.pi * (f0 * t + 0.5 * rate * t * t)) + 0.05 * rng.standard_normal(t.shape)
        sf.write(str(folder / f"{i}.wav"), wav.astype(np.float32), 16000)
    return folder


def resume_case(case: str, tmp_path: Path) -> list[str]:
    """Overrides for one resume scenario (all with dropout on, so the restored RNG matters)."""
    if case == "audio":  # span masks cut to equal counts per row (require_same_masks), padded batches
        return [
            *SMALL[:2], "modality=audio", "data=audio", f"data.path={chirp_folder(tmp_path / 'wavs')}",
            "data.val_fraction=0", "data.num_workers=0", "data.pin_memory=false", "data.batching=pad",
            "data.max_tokens=60000", "encoder.hidden_size=32", "encoder.intermediate_size=64",
            "encoder.num_hidden_layers=2", "objective.top_k=2", "encoder.hidden_dropout=0.1",
            "encoder.attention_dropout=0.1", "encoder.feat_proj_dropout=0.1", "masking.require_same_masks=true",
            *(o for o in SMALL if o.startswith(("objective.ema.", "optim."))),
        ]
    if case == "accumulate":  # 2 micro-batches per update: data position, EMA once per update
        return [*TINY, "trainer.accumulate_grad_batches=2"]
    if case == "bf16_shadow":  # bf16 weights on CPU: the EMA teacher lives in an fp32 shadow
        return [*TINY, "trainer.precision=bf16-true"]
    raise ValueError(case)


@pytest.mark.parametrize("case", ["audio", "accumulate", "bf16_shadow"])
def test_resume_is_exact_for(case: str, tmp_path: Path) -> None:
    """Straight 2N updates == N, then the longer command in the same run directory."""
    base = resume_case(case, tmp_path)
    run(tmp_path / "straight", f"trainer.max_steps={2 * N}", base=base)
    run(tmp_path / "resumed", f"trainer.max_steps={N}", base=base)
    run(tmp_path / "resumed", f"trainer.max_steps={2 * N}", base=base)
    assert len([r for r in rows(tmp_path / "straight") if r.get("train/loss")]) == 2 * N  # one row per update (+ the probe's final row)
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    a, b = last(tmp_path / "resumed"), last(tmp_path / "straight")
    assert_same_state(a, b)
    if case == "bf16_shadow":
        shadow = a["state_dict"]["teacher._extra_state"]["shadow"]
        teacher = [v for k, v in a["state_dict"].items() if k.startswith("teacher.model.") and v.is_floating_point()]
        assert shadow and all(s.dtype == torch.float32 for s in shadow)
        assert all(v.dtype == torch.bfloat16 for v in teacher)
        # the shadow holds more than bf16 can: the teacher is not just its own rounded copy
        assert any(not torch.equal(s, s.bfloat16().float()) for s in shadow)
    if case == "audio":
        assert a["hyper_parameters"]["modality"] == "audio" and a["hyper_parameters"]["masking"]["require_same_masks"]


def test_ckpt_path_values(tmp_path: Path) -> None:
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing to resume: a fresh run
    with pytest.raises(ConfigError, match="no checkpoint at"):
        resolve_ckpt_path("last", tmp_path)
    with pytest.raises(ConfigError, match="missing.ckpt"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path) == resolve_ckpt_path("last", tmp_path) == str(ckpt)
    assert resolve_ckpt_path(None, tmp_path) is None and resolve_ckpt_path("null", tmp_path) is None


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    cfg = compose_cfg(tmp_path, "logger=wandb")
    ids = []
    for _ in range(2):
        loggers = pretrain._instantiate_loggers(cfg)
        (wb,) = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
        assert wb._wandb_init["resume"] == "allow"
        ids.append(wb._wandb_init["id"])
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text().strip()


# ------------------------------------------------------------------------------------------ files


KILL_SCRIPT = """
import os, sys, time, torch
real_save = torch.save
saves = []

def slow_save(obj, f, *args, **kwargs):  # the 2nd checkpoint: write half of it, then hang
    saves.append(1)
    if len(saves) < 2:
        return real_save(obj, f, *args, **kwargs)
    import io
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("MID-SAVE", flush=True)
    time.sleep(300)

torch.save = slow_save
from d2v_train.pretrain import main
main(sys.argv[1:])
"""


def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", *TINY, "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "MID-SAVE" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "MID-SAVE" in line, proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt_dir = run_dir / "checkpoints"
    partial = list(ckpt_dir.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the killed write went to a temp file
    state = load_checkpoint_safely(ckpt_dir / "last.ckpt")
    assert state["global_step"] == 2  # the previous checkpoint, whole
    # the same command again: resumes from update 2, finishes, and the stale temp file is gone
    out = run(run_dir, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=2")
    assert out["global_step"] == 3 and not list(ckpt_dir.glob("*.tmp"))


def test_pickle_payload_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, evil)
    argv = sys.argv[:]
    try:
        with pytest.raises(SystemExit) as exc:
            pretrain.main([f"hydra.run.dir={tmp_path / 'run'}", *TINY, "trainer.max_steps=2", f"ckpt_path={evil}"])
    finally:
        sys.argv = argv
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("d2v-pretrain: error: refused to load checkpoint") and str(evil) in err, err
    assert "system" in err and not marker.exists()
    with pytest.raises(CheckpointRefusedError, match="could execute code"):
        load_checkpoint_safely(evil)


def test_training_checkpoints_load_weights_only(straight: Path) -> None:
    state = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)  # hparams, loops, RNG: all plain
    assert state["hyper_parameters"]["modality"] == "vision" and state["callbacks"]["ExactResume"]["rng"]


# ------------------------------------------------------------------------------------------ NaN


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, bad: Callable[[Data2VecPretraining], bool], poison: bool = False) -> None:
    """Make ``compute_objective`` produce a NaN loss on the updates where ``bad(module)`` holds:
    by a NaN loss value, or (``poison``) by writing NaN into a student weight first."""
    orig = Data2VecPretraining.compute_objective

    def patched(self: Data2VecPretraining, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if bad(self) and poison:
            with torch.no_grad():
                next(self.student.parameters()).fill_(float("nan"))
        out = orig(self, *args, **kwargs)
        if bad(self) and not poison:
            out = {**out, "loss": out["loss"] * float("nan"), "global_loss": out["global_loss"] * float("nan")}
        return out

    monkeypatch.setattr(Data2VecPretraining, "compute_objective", patched)


def finite(state_dict: dict[str, Any]) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.states: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        flat = lambda m: torch.cat([p.detach().flatten().clone() for p in m.parameters()])  # noqa: E731
        opt = trainer.optimizers[0]
        steps = max((int(s["step"]) for s in opt.state.values()), default=0)
        self.states.append((flat(pl_module.student), flat(pl_module.teacher), steps))


def test_nan_loss_skips_the_update_and_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_loss_at(monkeypatch, lambda m: m.global_step in (1, 2))
    snaps = Snapshots()
    with_callback(monkeypatch, snaps)
    out = run(tmp_path, "trainer.max_steps=5")
    assert out["global_step"] == 5
    (s0, t0, n0), *rest = snaps.states
    history = [(s0, t0, n0)] + rest
    for i in range(1, 5):
        (s_prev, t_prev, n_prev), (s, t, n) = history[i - 1], history[i]
        skipped = i in (1, 2)
        assert torch.equal(s, s_prev) == skipped and torch.equal(t, t_prev) == skipped, i
        assert n == n_prev + (0 if skipped else 1), i  # AdamW's own step count: no update at all
    assert [float(r["train/skipped_steps"]) for r in rows(tmp_path) if r["train/skipped_steps"]] == [0, 1, 2, 2, 2]
    state = last(tmp_path)
    assert state["d2v_skipped_steps"] == 2 and state["d2v_bad_streak"] == 0
    assert finite(state["state_dict"])


def test_nan_streak_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weight turns NaN during update 4: every later loss is NaN, the checkpoint due at update 4 is
    not written (it would hold NaN), and after 3 in a row the run stops with one line."""
    nan_loss_at(monkeypatch, lambda m: m.global_step == 3, poison=True)
    run_dir = tmp_path / "run"
    argv = sys.argv[:]
    try:
        with pytest.raises(SystemExit) as exc:
            pretrain.main([
                f"hydra.run.dir={run_dir}", *TINY, "trainer.max_steps=20",
                "callbacks.checkpoint.every_n_train_steps=2", "callbacks.nonfinite.max_consecutive=3",
            ])
    finally:
        sys.argv = argv
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("d2v-pretrain: error: stopped: 3 non-finite (NaN/inf) losses in a row"), err
    assert f"last good checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in err
    state = last(run_dir)
    assert state["global_step"] == 2
    assert finite(state["state_dict"])
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
