"""Linear-probe accuracy against pretraining wall time, for comparing objectives (v1 vs 2.0).

Usage:
    python scripts/probe_curve.py --objectives d2v1_vision d2v2_vision --max-steps 200 --probe-every 20
    python scripts/probe_curve.py --modality vision --overrides objective.clones=4 --out curves.csv

Each objective runs ``d2v-pretrain modality=<modality> objective=<objective>`` (its defaults: data,
length, encoder) for ``--max-steps`` updates. Every ``--probe-every`` updates the student is frozen
(eval mode), its mean-pooled final features are computed on the data module's labelled train / val
split, and a logistic regression (scikit-learn) is fitted on train and scored on val. Wall time
counts training only (probing is excluded). Prints and writes one row per probe:
``objective, step, wall_s, probe_acc``. Needs a data module with labels (the default digits).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from d2v_train.cli import config_dir
from d2v_train.pretrain import build, validate_config


@torch.no_grad()
def features(encoder: torch.nn.Module, dataset: Any, collate: Any, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled final hidden states (prefix tokens such as CLS excluded) and labels."""
    was = encoder.training
    encoder.eval()
    feats, labels = [], []
    seen = 0
    for batch in DataLoader(dataset, batch_size=128, collate_fn=collate):
        out = encoder(batch["inputs"], padding_mask=batch.get("padding_mask"))
        x = out.last_hidden_state[:, getattr(encoder, "num_prefix_tokens", 0):]
        pad = out.padding_mask
        if pad is not None:
            keep = (~pad).unsqueeze(-1).float()
            pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        else:
            pooled = x.mean(1)
        feats.append(pooled.float())
        labels.append(torch.as_tensor(batch["labels"]))
        seen += len(pooled)
        if seen >= limit:
            break
    encoder.train(was)
    return torch.cat(feats)[:limit], torch.cat(labels)[:limit]


def probe(encoder: torch.nn.Module, dm: Any, limit: int) -> float:
    collate = getattr(dm, "collate_fn", None)
    xtr, ytr = features(encoder, dm.train_set, collate, limit)
    xva, yva = features(encoder, dm.val_set, collate, limit)
    mean, std = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    clf = LogisticRegression(max_iter=2000).fit(((xtr - mean) / std).numpy(), ytr.numpy())
    return float(clf.score(((xva - mean) / std).numpy(), yva.numpy()))


class ProbeClock(L.Callback):
    """Probes every ``every`` updates; accumulates training wall time between probes."""

    def __init__(self, name: str, every: int, limit: int) -> None:
        self.name, self.every, self.limit = name, every, limit
        self.rows: list[dict[str, Any]] = []
        self.train_s = 0.0
        self._t = 0.0

    def _record(self, trainer: L.Trainer, module: Any) -> None:
        acc = probe(module.student, trainer.datamodule, self.limit)
        row = dict(objective=self.name, step=trainer.global_step, wall_s=round(self.train_s, 2), probe_acc=acc)
        self.rows.append(row)
        print(f"{self.name:<14} step {row['step']:>5}  train wall {row['wall_s']:>8.1f} s  probe acc {acc:.4f}", flush=True)

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self._record(trainer, module)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.train_s += time.perf_counter() - self._t
            self._record(trainer, module)
            self._t = time.perf_counter()


def run(modality: str, objective: str, args: Any, run_dir: Path) -> list[dict[str, Any]]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("pretrain", overrides=[
            f"run_dir={run_dir}", f"modality={modality}", f"objective={objective}", f"trainer.max_steps={args.max_steps}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks=none",
            "logger=csv", *args.overrides])
    GlobalHydra.instance().clear()
    validate_config(cfg)
    L.seed_everything(int(cfg.seed), verbose=False)
    module, dm, trainer = build(cfg)
    clock = ProbeClock(objective, args.probe_every, args.limit)
    trainer.callbacks.append(clock)
    trainer.fit(module, datamodule=dm)
    return clock.rows


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", default="vision")
    parser.add_argument("--objectives", nargs="+", default=None, help="default: d2v1_<modality> d2v2_<modality>")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--probe-every", type=int, default=20)
    parser.add_argument("--limit", type=int, default=2000, help="labelled samples per split for the probe")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--run-dir", default="runs/probe_curve")
    parser.add_argument("--out", default=None, help="CSV file for the rows")
    args = parser.parse_args(argv)
    objectives = args.objectives or [f"d2v1_{args.modality}", f"d2v2_{args.modality}"]
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    rows: list[dict[str, Any]] = []
    for objective in objectives:
        rows += run(args.modality, objective, args, Path(args.run_dir) / objective)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
