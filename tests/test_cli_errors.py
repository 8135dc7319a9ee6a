"""Mistakes a user makes on the command line end in one line naming the mistake and the fix.

Each case runs the installed console script (``d2v-pretrain``, ``d2v-finetune``, ``d2v-export``; the
module when the script is absent) and checks the exit status (2: the command needs changing, 1: the
run failed on what it found), that stderr is exactly one line, and its words. The commands run
concurrently (they are mostly interpreter start-up) so the file stays quick.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTES = "notes.txt"  # a text file given where a checkpoint belongs


def _has_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


# (id, app, arguments, exit status, words that must appear in the one line; None: skip the case)
CASES: list[tuple[str, str, list[str], int, list[str], Optional[str]]] = [
    ("missing data path", "pretrain", ["data.path={tmp}/nowhere"], 2,
     ["d2v-pretrain: error: data.path=", "nowhere does not exist", "set data.path to a folder"], None),
    ("folder without usable files", "pretrain", ["data=image", "data.path={tmp}/empty"], 1,
     ["no usable files in", "empty", "*.png", "Set data.path"], None),
    ("gpu trainer without a gpu", "pretrain", ["trainer=ddp_bf16"], 2,
     ["no GPU is visible", "trainer=cpu", "trainer=ddp_cpu"], "a GPU is visible" if torch.cuda.is_available() else None),
    ("data of another modality", "pretrain", ["data=text", "modality=vision"], 2,
     ["data=text is text data but modality=vision", "drop modality=", "digits"], None),
    ("encoder of another modality", "pretrain", ["encoder=vision_tiny", "modality=text"], 2,
     ["encoder=vision_tiny is a vision encoder but modality=text", "text_tiny"], None),
    ("v1 masking with the 2.0 text default", "pretrain", ["modality=text", "masking=text"], 2,
     ["'masking.kind': 'token'", "with data2vec 2.0", "goes with data2vec v1", "objective=d2v1_text"], None),
    ("not a checkpoint: finetune", "finetune", ["pretrained={tmp}/" + NOTES], 2,
     ["d2v-finetune: error: pretrained=", "is not a checkpoint (a text file)", "expected a .ckpt"], None),
    ("not a checkpoint: export", "export", ["checkpoint={tmp}/" + NOTES, "output_dir={tmp}/out"], 2,
     ["d2v-export: error:", "is not a checkpoint (a text file)", "config.json"], None),
    ("not a checkpoint: resume", "pretrain", ["ckpt_path={tmp}/" + NOTES], 2,
     ["ckpt_path=", "is not a checkpoint (a text file)", "d2v-pretrain"], None),
    ("slurm launcher without the extra", "pretrain", ["-m", "hydra/launcher=submitit_slurm"], 2,
     ["hydra/launcher=submitit_slurm", "pip install 'd2v-train[slurm]'"], "the slurm extra is installed" if _has_submitit() else None),
]


def script(app: str) -> list[str]:
    path = Path(sys.executable).with_name(f"d2v-{app}")
    return [str(path)] if path.is_file() else [sys.executable, "-m", f"d2v_train.{app}"]


def run(app: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*script(app), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / NOTES).write_text("not a model, just notes\n")
    todo = {cid: (app, [a.format(tmp=tmp) for a in args] + [f"hydra.run.dir={tmp}/run_{i}"] * (app != "export"))
            for i, (cid, app, args, _, _, skip) in enumerate(CASES) if skip is None}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {cid: pool.submit(run, app, args, tmp) for cid, (app, args) in todo.items()}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("cid, app, args, code, words, skip", CASES, ids=[c[0] for c in CASES])
def test_one_line_error(results: dict[str, subprocess.CompletedProcess[str]], cid: str, app: str, args: list[str],
                        code: int, words: list[str], skip: Optional[str]) -> None:
    if skip:
        pytest.skip(skip)
    proc = results[cid]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"d2v-{app}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_data_carries_its_modality(tmp_path: Path) -> None:
    """``data=text`` alone is text pretraining: the text encoder, masking and objective come with it."""
    proc = run("pretrain", ["data=text", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\nmodality: text\n" in proc.stdout and "TextDataModule" in proc.stdout
    # the text preset's masking and objective (data2vec 2.0: random masking, its conv decoder), text encoder
    assert "kind: random" in proc.stdout and "version: 2" in proc.stdout and "vocab_size" in proc.stdout


def test_help_names_the_app_and_its_groups(tmp_path: Path) -> None:
    pre = run("pretrain", ["--help"], tmp_path)
    fine = run("finetune", ["--help"], tmp_path)
    assert pre.returncode == 0 and fine.returncode == 0
    assert fine.stdout.startswith("d2v-finetune") and "usage: d2v-finetune" in fine.stdout and "cli" not in fine.stdout
    groups = lambda text: {line.split()[0] for line in text.split("config groups", 1)[1].splitlines()[1:]  # noqa: E731
                           if line.startswith("  ") and line.strip()}
    assert groups(pre.stdout) == {"callbacks", "data", "encoder", "experiment", "logger", "masking", "modality",
                                  "objective", "optim", "trainer", "hydra/launcher"}
    assert {"head", "recipe"} <= groups(fine.stdout) and not {"masking", "objective", "head_data"} & groups(fine.stdout)
