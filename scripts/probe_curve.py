"""Linear-probe accuracy against training time: does data2vec 2.0 learn faster than v1?

    python scripts/probe_curve.py vision                     # the v1 run, then the 2.0 run, each with its defaults
    python scripts/probe_curve.py text --every 25 -- trainer.max_steps=400     # overrides for both runs
    python scripts/probe_curve.py audio --v2 objective.clones=4                # overrides for the 2.0 run only

Runs, one after the other (so they do not slow each other down), ``d2v-pretrain modality=M
objective=d2v1_M`` and ``d2v-pretrain modality=M objective=d2v2_M`` with their defaults (``modality=text``
alone is 2.0), the online probe every ``--every``
updates. The probe is the run's own (``callbacks.probe``: the data module's labelled probe task,
mean-pooled features, linear classifier; ``--C``: its regularisation, by default chosen at every probe
by cross-validation on the labelled training set, since a fixed C ranks encoders partly by how well
that C suits their features); each probe row carries ``probe/train_s``, the
seconds spent training so far with probing and validation left out. Prints both curves, each run's
end-of-run comparison (C by cross-validation, against random init), the time 2.0 needs to reach the
v1 run's final accuracy as a fraction of the v1 run's training time, and writes ``curves.csv`` and
``curves.png`` into ``--out``. A run whose directory already holds
``checkpoints/last.ckpt`` is not run again (delete the directory to re-measure).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

Curve = list[tuple[int, float, float]]  # (update, training seconds, linear-probe accuracy)


def run(modality: str, name: str, out: Path, every: int, C: str, overrides: list[str]) -> Path:
    run_dir = out / name
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        print(f"{name}: {run_dir} already holds a finished run; reading it", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "d2v_train.pretrain", f"modality={modality}", f"hydra.run.dir={run_dir}",
           f"callbacks.probe.every_n_updates={every}", f"callbacks.probe.C={C}", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", "report=false", *overrides]  # fmt: skip
    print("+ d2v-pretrain " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def read_curve(run_dir: Path) -> tuple[Curve, Optional[float], Optional[float]]:
    """The probe rows of a run's metrics.csv (the periodic, fixed-C probe), and from its end-of-run
    row the comparison probe's accuracy (C by cross-validation) of the run and of random init."""
    curve: Curve = []
    random_init = final = None
    with (run_dir / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("probe/random_init_linear_acc"):
                random_init = float(row["probe/random_init_linear_acc"])
            if row.get("probe/final_linear_acc"):
                final = float(row["probe/final_linear_acc"])
            if row.get("probe/linear_acc") and row.get("probe/train_s"):
                point = (int(row["step"]) + (0 if row.get("probe/random_init_linear_acc") else 1),
                         float(row["probe/train_s"]), float(row["probe/linear_acc"]))
                if not curve or point[0] > curve[-1][0]:
                    curve.append(point)
    if not curve:
        raise SystemExit(f"{run_dir}/metrics.csv has no probe rows with probe/train_s: is the data module's "
                         "probe task available, and callbacks.probe on?")  # fmt: skip
    return curve, random_init, final


def time_to_reach(curve: Curve, accuracy: float) -> Optional[float]:
    return next((t for _, t, acc in curve if acc >= accuracy), None)


def plot(curves: dict[str, Curve], ends: dict[str, tuple[Optional[float], Optional[float]]], path: Path, title: str, C: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        line, = ax.plot([t for _, t, _ in curve], [a for _, _, a in curve], marker="o", label=f"{name} ({_c_words(C)})")
        random_init, final = ends[name]
        if final is not None:
            ax.plot([curve[-1][1]], [final], marker="*", markersize=12, linestyle="", color=line.get_color(),
                    label=f"{name} at the end, C by cross-validation")  # fmt: skip
        if random_init is not None:
            ax.axhline(random_init, color=line.get_color(), linestyle=":", label=f"{name} at random init, C by cross-validation")
    ax.set(xlabel="training time (s)", ylabel="linear-probe accuracy", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _c_words(C: str) -> str:
    from d2v_train.eval.probe import parse_C

    return "C by cross-validation at every probe" if parse_C(C) == "cv" else f"fixed C {C}"


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    both = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modality", choices=["vision", "text", "audio"])
    parser.add_argument("--every", type=int, default=50, help="probe every N updates")
    parser.add_argument("--out", type=Path, default=None, help="default runs/probe_curve/<modality>")
    parser.add_argument("--C", default="cv", help="the periodic probe's C: cv (chosen at every probe) or a number")
    parser.add_argument("--v1", nargs="*", default=[], help="overrides for the v1 run only")
    parser.add_argument("--v2", nargs="*", default=[], help="overrides for the 2.0 run only")
    args = parser.parse_args(argv)
    out = (args.out or Path("runs/probe_curve") / args.modality).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    names = {"v1": [f"objective=d2v1_{args.modality}", *both, *args.v1],
             "2.0": [f"objective=d2v2_{args.modality}", *both, *args.v2]}
    curves: dict[str, Curve] = {}
    ends: dict[str, tuple[Optional[float], Optional[float]]] = {}  # (random init, the run) by the end-of-run probe
    for name, overrides in names.items():
        curve, random_init, final = read_curve(run(args.modality, name, out, args.every, args.C, overrides))
        curves[name], ends[name] = curve, (random_init, final)

    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["objective", "update", "train_s", "linear_acc"])
        for name, curve in curves.items():
            writer.writerows((name, *point) for point in curve)
    plot(curves, ends, out / "curves.png", f"{args.modality}: v1 vs 2.0 (default runs)", args.C)

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"\n{args.modality}: linear probe ({_c_words(args.C)}) at update@training seconds")
    for name, curve in curves.items():
        print(f"  {name:>4}: " + "  ".join(f"{u}@{t:.0f}s {a:.3f}" for u, t, a in curve))
    for name, (rnd, final) in ends.items():
        print(f"  {name:>4} at the end, C by cross-validation: {fmt(final)} (random init {fmt(rnd)})")
    v1_acc, v1_time = curves["v1"][-1][2], curves["v1"][-1][1]
    reach = time_to_reach(curves["2.0"], v1_acc)
    if reach is None:
        print(f"2.0 never reached the v1 run's final accuracy {v1_acc:.3f} "
              f"(best {max(a for _, _, a in curves['2.0']):.3f} in {curves['2.0'][-1][1]:.0f} s)")  # fmt: skip
    else:
        print(f"2.0 reached the v1 run's final accuracy {v1_acc:.3f} after {reach:.0f} s of training: "
              f"{reach / v1_time:.2f} x the v1 run's {v1_time:.0f} s (goal <= 0.5)")  # fmt: skip
    print(f"curves: {out / 'curves.csv'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
