"""``d2v-report RUN_DIR``: plots and a short summary of a pretraining run (or of a sweep).

Reads ``RUN_DIR/metrics.csv`` (and ``config.yaml``) and writes, under ``RUN_DIR/report/``:
- one PNG per group of columns that the run logged: ``loss`` (train and val), ``lr``, ``ema_decay``,
  ``std`` (target / prediction std), ``mask_frac``, ``throughput``, ``probe`` (online probe and kNN,
  with the random-init reference), and ``other`` for any further numeric column;
- ``summary.md``: the config in brief, updates, wall time, final figures, and warnings: a teacher
  that barely moved from its initialisation, collapsed targets or predictions, non-finite updates,
  an online probe that does not beat the same encoder at random initialisation.

A multirun directory (sub-directories with their own ``metrics.csv``) gets one ``comparison.png``
(loss, validation loss, probe accuracy of every job on shared axes) and a table in ``summary.md``.
``d2v-pretrain`` writes the report of its run at the end (``report=false`` turns it off).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "read_metrics", "run_warnings", "write_report", "write_sweep_report"]

Series = dict[str, list[tuple[int, float]]]

# (file stem, title, columns) in the order they appear in summary.md
GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "data2vec loss", ("train/loss", "val/loss")),
    ("lr", "learning rate", ("train/lr",)),
    ("ema_decay", "teacher EMA decay", ("train/ema_decay",)),
    ("std", "target / prediction std", ("train/target_std", "train/pred_std")),
    ("mask_frac", "masked fraction", ("train/mask_frac",)),
    ("throughput", "throughput", ("train/samples_per_s", "train/tokens_per_s")),
    ("probe", "online probe accuracy", ("probe/linear_acc", "probe/knn_acc", "probe/final_linear_acc",
                                        "probe/random_init_linear_acc", "probe/random_init_knn_acc",
                                        "probe/baseline_linear_acc")),
)  # fmt: skip
SKIP = {"epoch", "step"}
TEACHER_STILL_INIT = 0.9  # warn when the teacher is still more than this fraction of its initialisation
MIN_TARGET_STD, MIN_PRED_STD = 0.1, 0.01  # the reference's collapse thresholds


def read_metrics(path: Path) -> Series:
    """column -> [(step, value)] of the non-empty, finite-or-not numeric cells, in file order."""
    out: Series = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for key, cell in row.items():
                if key in SKIP or key is None or cell in (None, ""):
                    continue
                try:
                    out.setdefault(key, []).append((step, float(cell)))
                except ValueError:
                    pass
    return out


def _last(series: Series, key: str) -> Optional[float]:
    points = series.get(key)
    return points[-1][1] if points else None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _plot_group(series: Series, columns: Sequence[str], title: str, path: Path) -> Optional[Path]:
    present = [c for c in columns if c in series]
    if not present:
        return None
    plt = _pyplot()
    # columns on different scales (samples/s vs tokens/s) get their own panel; single figures (the
    # end-of-run references) are levels drawn over the curves they compare with
    curves = sum(len(series[c]) > 1 for c in present)
    panels = [present] if title not in ("throughput", "other") and curves <= 4 else [[c] for c in present]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels) + 0.6), squeeze=False)
    for ax, cols in zip(axes[:, 0], panels):
        for col in cols:
            steps, values = zip(*series[col])
            if len(steps) == 1:  # a single figure (random init, baseline, end of run): a dashed level
                ax.axhline(values[0], linestyle=":" if "knn" in col else "--", label=f"{col} ({values[0]:.3g})",
                           color="grey" if "random" in col else "tab:red" if "baseline" in col else None)  # fmt: skip
            else:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=col)
        ax.set_xlabel("step (metrics.csv: update - 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    except Exception:  # a report never fails on a config it cannot read
        return {}


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def teacher_init_fraction(series: Series) -> Optional[float]:
    """How much of its initialisation the teacher still is: the product of the logged EMA decays
    (one per update; the teacher starts as a copy of the student's initialisation)."""
    logged = series.get("train/teacher_init_weight")
    if logged:  # the module keeps the product itself (also across a resume)
        return logged[-1][1]
    decays = series.get("train/ema_decay")
    if not decays:
        return None
    frac = 1.0
    for _, d in decays:
        frac *= d
    return frac


def run_warnings(series: Series) -> list[str]:
    """What in a run's metrics says it may not have learned."""
    out = []
    frac = teacher_init_fraction(series)
    if frac is not None and frac > TEACHER_STILL_INIT:
        out.append(
            f"the teacher barely moved: after {len(series['train/ema_decay'])} updates it is still "
            f"{100 * frac:.0f}% its random initialisation (EMA decay {series['train/ema_decay'][-1][1]:.5g}), "
            "so the targets are close to random features; lower objective.ema.decay or train longer"
        )
    for key, what, limit in (("train/target_std", "target", MIN_TARGET_STD), ("train/pred_std", "prediction", MIN_PRED_STD)):
        points = series.get(key) or []
        if not points:
            continue
        last, peak = points[-1][1], max(v for _, v in points)
        # collapse is a fall: predictions start near zero (a fresh head) and are not collapsed then
        if last < limit and last < 0.5 * peak:
            out.append(f"collapse: the {what} std fell to {last:.3g} (< {limit}; it was {peak:.3g})")
    loss = _last(series, "train/loss")
    if loss is not None and not math.isfinite(loss):
        out.append(f"the final training loss is {loss}")
    skipped = _last(series, "train/skipped_steps")
    if skipped:
        out.append(f"{int(skipped)} updates were skipped for a non-finite loss")
    lin, rnd = _final_probe(series), _last(series, "probe/random_init_linear_acc")
    if lin is not None and rnd is not None and lin < rnd + 0.01:
        out.append(f"the online probe does not beat random init ({lin:.3f} vs {rnd:.3f} at random init)")
    return out


def _final_probe(series: Series) -> Optional[float]:
    """The end-of-run linear probe (the protocol of the random-init comparison); runs written before
    it existed: the last periodic probe."""
    final = _last(series, "probe/final_linear_acc")
    return final if final is not None else _last(series, "probe/linear_acc")


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}"


def write_report(run_dir: str | Path, extra: Optional[dict[str, Any]] = None, out_dir: Optional[Path] = None) -> Path:
    """Plots + ``summary.md`` for one run; returns the summary's path. ``extra`` (wall time, the
    probe line) is kept in ``report/run.json`` so a later ``d2v-report`` shows it too."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (d2v-report expects a run directory with metrics.csv)")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    info_file = out / "run.json"
    info: dict[str, Any] = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if extra:
        info.update(extra)
        info_file.write_text(json.dumps(info, indent=1))
    series = read_metrics(metrics)
    plots = []
    covered: set[str] = set()
    for stem, title, columns in GROUPS:
        covered.update(columns)
        path = _plot_group(series, columns, title, out / f"{stem}.png")
        if path:
            plots.append(path)
    others = sorted(c for c in series if c not in covered and len(series[c]) > 1)[:12]
    if others:
        path = _plot_group(series, others, "other", out / "other.png")
        if path:
            plots.append(path)

    cfg = _config(run_dir)
    train_steps = [s for s, _ in series.get("train/loss", [])]
    updates = info.get("updates", (max(train_steps) + 1) if train_steps else None)
    lines = [f"# Run report: {run_dir.name}", ""]
    brief = [
        ("modality", _get(cfg, "modality")),
        ("encoder", ", ".join(f"{k}={_get(cfg, 'encoder.' + k)}" for k in ("hidden_size", "num_hidden_layers", "image_size",
                                                                             "use_absolute_position_embeddings", "use_sincos_position_embeddings")
                              if _get(cfg, "encoder." + k) is not None) or None),
        ("data", _get(cfg, "data._target_")),
        ("batch size", _get(cfg, "data.batch_size")),
        ("max_steps", _get(cfg, "trainer.max_steps")),
        ("lr", _get(cfg, "optim.lr")),
        ("EMA decay", " -> ".join(str(_get(cfg, f"objective.ema.{k}")) for k in ("decay", "end_decay"))
                      + f" over {_get(cfg, 'objective.ema.anneal_steps')} updates"
                      + "".join(f", {k}={_get(cfg, 'objective.ema.' + k)}" for k in ("anneal_fraction", "max_horizon")
                                if _get(cfg, "objective.ema." + k) is not None)
                      + " (as configured; train/ema_decay holds the values used)" if _get(cfg, "objective.ema") else None),
        ("seed", _get(cfg, "seed")),
    ]  # fmt: skip
    lines += ["## Config", ""] + [f"- {k}: {v}" for k, v in brief if v is not None] + [""]
    lines += ["## Run", "", f"- updates: {updates if updates is not None else 'unknown'}"]
    if info.get("wall_s") is not None:
        lines.append(f"- wall time: {float(info['wall_s']):.1f} s")
    if info.get("probe_s") is not None:
        lines.append(f"- of which online probe: {float(info['probe_s']):.1f} s")
    frac = teacher_init_fraction(series)
    if frac is not None:
        lines.append(f"- teacher still {100 * frac:.1f}% its initialisation (product of the EMA decays)")
    if info.get("probe_line"):
        lines += ["", "```", str(info["probe_line"]), "```"]
    lines += ["", "## Final figures", "", "| metric | first | last | at update |", "|---|---|---|---|"]
    for key in sorted(series):
        pts = series[key]
        lines.append(f"| {key} | {_fmt(pts[0][1]) if len(pts) > 1 else '—'} | {_fmt(pts[-1][1])} | {pts[-1][0]} |")
    warns = run_warnings(series)
    lines += ["", "## Warnings", ""] + ([f"- WARNING: {w}" for w in warns] or ["none"])
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def _job_label(job: Path) -> str:
    overrides = job / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        try:
            from omegaconf import OmegaConf

            items = [str(o) for o in OmegaConf.load(overrides)]  # type: ignore[union-attr]
            if items:
                return f"{job.name}: " + " ".join(items)
        except Exception:
            pass
    return job.name


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """Job directories of a multirun directory (those holding a metrics.csv), in name order."""
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / "metrics.csv").is_file()]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """``comparison.png`` + ``summary.md`` across the jobs of a multirun directory."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: neither metrics.csv nor job directories holding one")
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = {job: read_metrics(job / "metrics.csv") for job in jobs}
    panels = [c for c in ("train/loss", "val/loss", "probe/linear_acc", "probe/knn_acc") if any(c in s for s in data.values())]
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels) + 0.6), squeeze=False)
    for ax, col in zip(axes[:, 0], panels):
        for job, series in data.items():
            if col in series:
                steps, values = zip(*series[col])
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=_job_label(job)[:60])
        ax.set_title(col)
        ax.set_xlabel("step (metrics.csv: update - 1)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    lines = [f"# Sweep report: {sweep_dir.name}", "", "| job | final loss | val loss | probe linear | probe kNN | random-init linear | warnings |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for job, s in data.items():
        w = run_warnings(s)
        lines.append(f"| {_job_label(job)} | {_fmt(_last(s, 'train/loss'))} | {_fmt(_last(s, 'val/loss'))} | "
                     f"{_fmt(_final_probe(s))} | {_fmt(_last(s, 'probe/knn_acc'))} | "
                     f"{_fmt(_last(s, 'probe/random_init_linear_acc'))} | {len(w)} |")  # fmt: skip
    lines += ["", "![comparison](comparison.png)", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``d2v-report RUN_DIR`` (a run or a multirun directory)."""
    parser = argparse.ArgumentParser(prog="d2v-report", description="plots and summary.md of a d2v-pretrain run or sweep")
    parser.add_argument("run_dir", help="a run directory (with metrics.csv) or a multirun directory")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if (run_dir / "metrics.csv").is_file():
            summary = write_report(run_dir)
        elif run_dir.is_dir():
            summary = write_sweep_report(run_dir)
        else:
            raise FileNotFoundError(f"{run_dir}: no such directory")
    except (FileNotFoundError, ValueError) as e:
        print(f"d2v-report: error: {e}", file=sys.stderr)
        return 2
    print(summary.read_text())
    print(f"d2v-report: wrote {summary.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
