"""Killed runs: ``d2v-pretrain`` re-run in the same run directory never silently starts over and never
lists an update twice in ``metrics.csv``.

Each case kills a tiny run (SIGKILL, which nothing can catch; SIGTERM / SIGUSR1, which save a
checkpoint first) at a chosen update, re-runs the same command, and checks the one line the re-run
prints, the exit codes, and that the final ``metrics.csv`` holds updates 0..max_steps-1 once each.
The kill comes from a callback loaded into the run (``+callbacks.kill=...``), so it lands at an
exact update; one case sends the signal from outside, at whatever moment the run has reached.
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

import pytest
import torch

from run_options import NO_PROBE_COMPARISON

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
TINY = [
    "trainer.enable_progress_bar=false", "data.batch_size=8", "encoder.hidden_size=32",
    "encoder.intermediate_size=64", "encoder.num_hidden_layers=2", "objective.top_k=2",
    f"trainer.max_steps={STEPS}", f"optim.total_steps={STEPS}", "optim.warmup_steps=2", *NO_PROBE_COMPARISON,
]

KILLER = '''
import os, signal, time
import lightning as L

class KillAt(L.Callback):
    """Sends `sig` to this process when update `at` is about to start; `pause` slows every update."""

    def __init__(self, at: int = -1, sig: str = "SIGKILL", pause: float = 0.0) -> None:
        self.at, self.sig, self.pause = at, sig, pause

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        time.sleep(self.pause)
        if trainer.global_step == self.at:
            os.kill(os.getpid(), getattr(signal, self.sig))
'''


def command(run_dir: Path, *extra: str) -> list[str]:
    script = Path(sys.executable).with_name("d2v-pretrain")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "d2v_train.pretrain"]
    return [*head, f"hydra.run.dir={run_dir}", *TINY, *extra]


def env_with(folder: Path) -> dict[str, str]:
    (folder / "killer.py").write_text(textwrap.dedent(KILLER))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run(run_dir: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(run_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def kill_at(update: int, sig: str = "SIGKILL") -> list[str]:
    return ["+callbacks.kill._target_=killer.KillAt", f"+callbacks.kill.at={update}", f"+callbacks.kill.sig={sig}"]


def steps(path: Path) -> list[int]:
    with path.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]  # update rows, not probe rows


def saved_step(run_dir: Path) -> int:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])


def finish_and_check(run_dir: Path, env: dict[str, str], expect: str) -> str:
    """Re-run the plain command; it must print `expect` and end with every update once."""
    again = run(run_dir, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert expect in again.stdout, again.stdout[-3000:]
    assert steps(run_dir / "metrics.csv") == list(range(STEPS))
    assert saved_step(run_dir) == STEPS
    return again.stdout


@pytest.mark.parametrize(
    "case, kill, settings, resumed_from",
    [
        # killed before any checkpoint: the re-run says so, sets the attempt aside and starts over
        ("no checkpoint yet", 4, ["callbacks.checkpoint.every_n_minutes=null"], None),
        # a checkpoint every 3 updates, killed at update 5: rows 3 and 4 of the dead run are dropped
        ("step checkpoint", 5, ["callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.every_n_minutes=null"], 3),
        # the default time-based cadence (here a few ms, so after every update): at most one update lost
        ("time checkpoint", 7, ["callbacks.checkpoint.every_n_minutes=0.0001"], 7),
    ],
)
def test_sigkill_then_rerun(tmp_path: Path, case: str, kill: int, settings: list[str], resumed_from: int | None) -> None:
    env = env_with(tmp_path)
    run_dir = tmp_path / "run"
    killed = run(run_dir, *settings, *kill_at(kill), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert steps(run_dir / "metrics.csv") == list(range(kill))  # every finished update reached the file
    if resumed_from is None:
        assert not (run_dir / "checkpoints" / "last.ckpt").exists()
        out = finish_and_check(run_dir, env, "holds an earlier attempt but no checkpoint to resume from")
        line = next(x for x in out.splitlines() if "earlier attempt" in x)
        assert "starting over" in line and "attempt-1" in line
        assert steps(run_dir / "attempt-1" / "metrics.csv") == list(range(kill))  # kept, not mixed in
    else:
        assert saved_step(run_dir) == resumed_from
        finish_and_check(run_dir, env, f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}")
        assert not (run_dir / "attempt-1").exists()


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path: Path) -> None:
    """SIGTERM during update 4 (checkpoints every 1000 updates and 10 minutes: none due): the run
    finishes that update, saves it, says so in one line and exits 128 + 15; the re-run continues."""
    env = env_with(tmp_path)
    run_dir = tmp_path / "run"
    stopped = run(run_dir, *kill_at(4, "SIGTERM"), env=env)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1, stopped.stderr
    assert lines[0].startswith("d2v-pretrain: stopped by SIGTERM at update 5 of 10; saved ") and "run the same command again" in lines[0]
    assert saved_step(run_dir) == 5 and steps(run_dir / "metrics.csv") == list(range(5))
    assert "stopped by SIGTERM" in (run_dir / "pretrain.log").read_text()
    finish_and_check(run_dir, env, "resuming from")


def test_sigusr1_from_outside(tmp_path: Path) -> None:
    """SIGUSR1 sent by another process (as SLURM does before the time limit) at whatever update the
    run has reached: the checkpoint holds exactly the updates in metrics.csv, and the re-run adds the rest."""
    env = env_with(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        command(run_dir, "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.pause=0.3"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 updates
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    done = saved_step(run_dir)
    assert 2 <= done < STEPS and steps(metrics) == list(range(done))
    assert f"stopped by SIGUSR1 at update {done} of {STEPS}" in err
    finish_and_check(run_dir, env, "resuming from")


def test_set_aside_attempt_keeps_every_earlier_attempt(tmp_path: Path) -> None:
    """Each fresh start moves the previous attempt's files to the next free attempt-<n>/ folder; a
    directory with nothing of an attempt in it is left alone."""
    from d2v_train.lightning.checkpointing import set_aside_attempt

    (tmp_path / "pretrain.log").write_text("log of the current process\n")
    assert set_aside_attempt(tmp_path) is None
    for n in (1, 2):
        (tmp_path / "metrics.csv").write_text(f"step\n{n}\n")
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04")
        (tmp_path / "config.yaml").write_text("seed: 0\n")
        moved = set_aside_attempt(tmp_path)
        assert moved == tmp_path / f"attempt-{n}"
        assert (moved / "metrics.csv").read_text() == f"step\n{n}\n" and (moved / "checkpoints" / "last.ckpt").is_file()
        assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "pretrain.log").is_file()  # the open log of this process stays
