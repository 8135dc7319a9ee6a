"""The probe table of the default run: raw pixels, random init and the default ``d2v-pretrain``.

    python scripts/eval_digits.py                      # ~5 min on 2 CPU cores
    python scripts/eval_digits.py --out /tmp/probe --seeds 3 --labels 10 all -- optim.lr=2e-3

1. ``d2v-pretrain`` with its defaults (plus any overrides after ``--``) into OUT/pretrain;
2. the same command with the online probe, validation and report off into OUT/plain, to measure
   what the monitors cost (``--no-overhead`` skips it);
3. ``d2v-eval checkpoint=OUT/pretrain data=digits`` (linear probe, kNN, fixed-budget fine-tune vs
   random init, plus raw pixels) into OUT/eval; prints its table and the wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/eval_digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--labels", nargs="+", default=["10", "all"])
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("overrides", nargs="*", help="d2v-pretrain overrides (after --)")
    a = parser.parse_args()
    out = Path(a.out).resolve()
    quiet = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    wall, stdout = run(["-m", "d2v_train.pretrain", f"hydra.run.dir={out / 'pretrain'}", "ckpt_path=null", *quiet, *a.overrides])
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("d2v-pretrain: probe", "WARNING", "d2v-pretrain: done"))]
    print(f"d2v-pretrain {' '.join(a.overrides)}: {wall:.1f} s wall (process)\n  " + "\n  ".join(lines))
    info_file = out / "pretrain" / "report" / "run.json"
    if info_file.is_file():  # timed inside the same process: not disturbed by other load on the machine
        info = json.loads(info_file.read_text())
        if info.get("probe_s") is not None:
            print(f"online probe: {info['probe_s']:.1f} s of {info['wall_s']:.1f} s of training "
                  f"({100 * info['probe_s'] / info['wall_s']:.0f}%, timed by the callback)")
    if not a.no_overhead:
        plain, _ = run(["-m", "d2v_train.pretrain", f"hydra.run.dir={out / 'plain'}", "ckpt_path=null", *quiet, *a.overrides,
                        "callbacks.probe=null", "trainer.limit_val_batches=0", "report=false"])  # fmt: skip
        print(f"same run without probe / validation / report: {plain:.1f} s wall (process); difference {wall - plain:+.1f} s "
              f"({100 * (wall - plain) / plain:+.0f}%; on a shared machine this A/B is only as steady as the load)")  # fmt: skip
    labels = ",".join(a.labels)
    wall, stdout = run(["-m", "d2v_train.eval.app", f"checkpoint={out / 'pretrain'}", "data=digits", f"hydra.run.dir={out / 'eval'}",
                        f"labels_per_class=[{labels}]", f"seeds={a.seeds}", f"finetune.max_steps={a.finetune_steps}"])  # fmt: skip
    print(stdout)
    print(f"d2v-eval: {wall:.1f} s wall")


if __name__ == "__main__":
    main()
