"""Does the default `d2v-pretrain modality=text|audio` learn? A probe table that says so.

    python scripts/eval_presets.py text                      # 3 seeds of the default text run
    python scripts/eval_presets.py audio --seeds 0 1 2
    python scripts/eval_presets.py text -- trainer.max_steps=400 optim.lr=2e-3   # any pretrain overrides

For each seed it runs the default pretraining command (skipped when the run directory already holds
`checkpoints/last.ckpt`), then compares on the data module's labelled probe task (`probe_sets()`):
a cheap baseline on the raw input (text: TF-IDF over tokens; audio: log-mel), the same encoder
architecture at random initialisation, and the pretrained encoder, with few labels per class and
with all labels. Text adds a classic unsupervised reference of the encoder's width: latent semantic
analysis (TF-IDF of the run's unlabelled training corpus, truncated SVD to `--lsa` dimensions,
default the encoder's hidden size; `--lsa 0` leaves it out). Features are frozen, mean-pooled over
the last layer's non-padded tokens (`--pooling` picks another of d2v-eval's poolings; `token_idf`
takes its IDF weights from the run's training corpus), encoder in eval mode, no masking; the linear
probe is d2v-eval's (standardised features, logistic regression with C chosen per row by
cross-validation on that row's training labels; `--C 1` fixes it). Each seed draws its own
pretraining run and random init; its few-label cell is the mean over `--subsets` class-balanced
draws (subset j of seed s is drawn with seed s + 1000 j), since with 10 labels per class one draw
moves the figure by several points. The table shows mean ± standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v_train.eval.baselines import logmel_features, lsa_features, tfidf_features

FEW_LABELS = {"text": 10, "audio": 4}


def few_label_subset(y: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """Indices of k examples per class (seeded); all indices when k is None."""
    if k is None:
        return np.arange(len(y))
    rng = random.Random(seed)
    keep: list[int] = []
    for c in sorted(set(y.tolist())):
        members = np.flatnonzero(y == c).tolist()
        keep += rng.sample(members, min(k, len(members)))
    return np.asarray(sorted(keep))


def few_label_draws(y: np.ndarray, k: int | None, seed: int, draws: int) -> list[np.ndarray]:
    """``draws`` few-label subsets of a seed (draw j seeded ``seed + 1000 j``: the first is the draw the
    script made before it averaged several); one subset, every index, when k is None."""
    return [few_label_subset(y, k, seed + 1000 * j) for j in range(draws if k is not None else 1)]


def pretrain(modality: str, seed: int, run_dir: Path, overrides: list[str]) -> float:
    """The default pretraining command (skipped when its checkpoint exists); returns wall seconds."""
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return float("nan")
    cmd = [sys.executable, "-m", "d2v_train.pretrain", f"modality={modality}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides]  # fmt: skip
    print("+", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def probe_data(run_dir: Path) -> tuple[Any, Any]:
    """The run's data module (from its resolved config, set up) and its probe sets."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    dm = instantiate(cfg.data)
    probes = dm.probe_sets()
    if probes is None:
        raise SystemExit(f"{type(dm).__name__} has no probe task")
    return dm, probes


def summarise(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1 else f"{a.mean():.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modality", choices=["text", "audio"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--few", type=int, default=None, help="labels per class of the few-label column (text 10, audio 4)")
    parser.add_argument("--runs", type=Path, default=Path("runs/eval_presets"), help="where the pretraining runs go")
    parser.add_argument("--tag", default="default", help="run folder name under --runs (one per set of overrides)")
    parser.add_argument("--subsets", type=int, default=3, help="few-label draws averaged per seed (default 3)")
    parser.add_argument("--C", default="cv", help="the probe's inverse regularisation: cv (chosen per row by 5-fold "
                        "cross-validation on its training labels, as d2v-eval) or a number")  # fmt: skip
    parser.add_argument("--pooling", default="mean", help="d2v-eval's pooling of the encoder rows (mean, cls, topk, token_idf)")
    parser.add_argument("--lsa", type=int, default=None, help="text: dimensions of the LSA reference row "
                        "(default: the encoder's hidden size; 0 leaves the row out)")  # fmt: skip
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides
    if args.subsets < 1:
        parser.error(f"--subsets must be at least 1, got {args.subsets}")
    if args.lsa is not None and (args.lsa < 0 or args.modality != "text"):
        parser.error(f"--lsa takes a dimension count >= 0 and applies to text only, got {args.lsa} for {args.modality}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    few = args.few or FEW_LABELS[args.modality]
    from d2v_train.eval.features import POOLINGS, encoder_token_idf, extract_features
    from d2v_train.eval.probe import linear_probe, parse_C

    if args.pooling not in POOLINGS or args.pooling == "grid":
        parser.error(f"--pooling must be one of {', '.join(p for p in POOLINGS if p != 'grid')}, got {args.pooling!r}")

    try:
        args.C = parse_C(args.C)
    except ValueError as e:
        parser.error(str(e))
    columns = [(f"{few} labels/class", few), ("all labels", None)]

    from d2v_train.lightning.pretrained import load_pretrained
    from d2v_train.models import build_encoder

    rows: dict[str, dict[str, list[float]]] = {}
    walls = []
    baseline_name = "TF-IDF + logistic regression" if args.modality == "text" else "log-mel + logistic regression"

    def record(row: str, col: str, acc: float) -> None:
        rows.setdefault(row, {}).setdefault(col, []).append(acc)

    for seed in args.seeds:
        run_dir = args.runs / f"{args.modality}-{args.tag}-s{seed}"
        walls.append(pretrain(args.modality, seed, run_dir, args.overrides))
        dm, probes = probe_data(run_dir)
        pretrained = load_pretrained(str(run_dir / "checkpoints" / "last.ckpt")).encoder
        torch.manual_seed(seed)
        random_init = build_encoder(pretrained.modality, pretrained.config)
        if args.modality == "text":
            base = tfidf_features(probes.train, probes.val)
        else:
            base = logmel_features(probes.train, probes.val)
        y_train = np.asarray([int(probes.train[i]["labels"]) for i in range(len(probes.train))])
        y_val = np.asarray([int(probes.val[i]["labels"]) for i in range(len(probes.val))])
        feats = {baseline_name: base}
        lsa_dims = pretrained.config.hidden_size if args.lsa is None and args.modality == "text" else args.lsa
        if lsa_dims:
            feats[f"LSA-{lsa_dims} of the training corpus"] = lsa_features(dm.train_set, probes.train, probes.val, lsa_dims, dm.special_token_ids.values())
        weights = None
        if args.pooling == "token_idf":
            weights = encoder_token_idf(pretrained, dm.train_set)
        for name, enc in (("random init", random_init), ("pretrained", pretrained)):
            xt, xv = (extract_features(enc, ds, args.pooling, collate_fn=probes.collate_fn, batch_size=32, token_weights=weights).features.numpy()
                      for ds in (probes.train, probes.val))  # fmt: skip
            feats[name] = (xt, xv)
        for col, k in columns:
            subsets = few_label_draws(y_train, k, seed, args.subsets)
            for name, (xt, xv) in feats.items():
                record(name, col, float(np.mean([linear_probe(xt[i], y_train[i], xv, y_val, C=args.C) for i in subsets])))
        print(f"seed {seed}: " + ", ".join(f"{n} {v[columns[0][0]][-1]:.3f}/{v['all labels'][-1]:.3f}" for n, v in rows.items()), flush=True)

    print(f"\n{probes.name}: {probes.num_classes} classes, {len(probes.train)} train / {len(probes.val)} val examples; "
          f"seeds {args.seeds}; {args.subsets} few-label draws per seed; probe C {args.C}; pooling {args.pooling}; overrides: {' '.join(args.overrides) or '(none)'}")  # fmt: skip
    wall = [w for w in walls if w == w]
    if wall:
        print(f"pretraining wall time per run: {np.mean(wall):.0f} s (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    print(f"\n| features | {' | '.join(c for c, _ in columns)} |")
    print("|---|" + "---|" * len(columns))
    for name, cols in rows.items():
        print(f"| {name} | {' | '.join(summarise(cols[c]) for c, _ in columns)} |")
    gain = np.asarray(rows["pretrained"][columns[0][0]]) - np.asarray(rows["random init"][columns[0][0]])
    print(f"\npretrained - random init at {columns[0][0]}: {gain.mean():+.3f} (per seed: {', '.join(f'{g:+.3f}' for g in gain)})")


if __name__ == "__main__":
    main()
