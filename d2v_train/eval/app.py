"""``d2v-eval`` / ``python -m d2v_train.eval.app``: the representation report of a checkpoint.

    d2v-eval checkpoint=RUN_DIR                                # its probe task, 1/10/100/all labels, 3 seeds
    d2v-eval checkpoint=model_dir data=digits labels_per_class=[10,all] seeds=5 finetune.enabled=false

For the checkpoint's encoder and the same architecture at random initialisation (built from the
same config under ``seed``): linear probe, weighted kNN and a fixed-budget fine-tune on the data's
labelled probe task (``probe_sets()``), at every ``labels_per_class`` (class-balanced subsets drawn
with seeds ``seed .. seed + seeds - 1``; "all" is one deterministic row), plus the baseline a user
would try first, with the same probes (raw pixels, TF-IDF over the tokens or log-mel: ``baselines``).
Without ``data=`` the probe task is the run's own embedded data, else the modality's. Output dir:
``results.csv`` (one row per measurement), ``results.md`` (mean ± sample std over seeds) and
``results.png``; the table is printed. ``evaluate(cfg)`` is usable from Python.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from d2v_train.cli import ConfigError, UserError, config_dir, run_app

from .baselines import LOGMEL, PIXELS, TFIDF

BASELINES = (PIXELS, TFIDF, LOGMEL)

__all__ = ["evaluate", "main", "results_table"]

log = logging.getLogger("d2v_train.eval")

FIELDS = ("encoder", "method", "labels_per_class", "seed", "accuracy", "C")
METHODS = ("linear", "knn", "finetune")
ROW_ORDER = (*BASELINES, "random init", "pretrained")
# without data=: the embedded labelled task of the checkpoint's modality (configs/data/<name>.yaml)
MODALITY_PROBE_DATA = {"vision": "digits", "text": "docstrings", "audio": "speech"}


def validate_config(cfg: DictConfig) -> None:
    from .features import POOLINGS
    from .probe import parse_C, parse_labels_per_class

    try:
        parse_C(cfg.get("probe", {}).get("C", "cv"))
    except ValueError as e:
        raise ConfigError(f"probe.C: {e}") from None
    if cfg.get("pooling") not in POOLINGS:
        raise ConfigError(f"bad value for 'pooling': {cfg.get('pooling')!r}; valid choices: {', '.join(POOLINGS)}")
    lpc = cfg.get("labels_per_class")
    values = list(lpc) if OmegaConf.is_list(lpc) or isinstance(lpc, (list, tuple)) else [lpc]
    for v in values:
        try:
            parse_labels_per_class(v)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if int(cfg.get("seeds", 1)) < 1:
        raise ConfigError(f"bad value for 'seeds': {cfg.get('seeds')!r}; expected an integer >= 1")
    if cfg.get("weights") not in ("student", "teacher"):
        raise ConfigError(f"bad value for 'weights': {cfg.get('weights')!r}; valid choices: student, teacher")
    if cfg.get("device") not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"bad value for 'device': {cfg.get('device')!r}; valid choices: auto, cpu, cuda")


def _lpc_list(cfg: DictConfig) -> list[Optional[int]]:
    from .probe import parse_labels_per_class

    raw = cfg.labels_per_class
    values = list(raw) if OmegaConf.is_list(raw) else [raw]
    return [parse_labels_per_class(v) for v in values]


def _lpc_name(k: Optional[int]) -> str:
    return "all" if k is None else str(k)


def _load(cfg: DictConfig) -> Any:
    from d2v_train.interop.sources import load_source

    path = Path(str(cfg.checkpoint)).expanduser()
    if not path.exists():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file or directory")
    try:
        loaded = load_source(path, weights=str(cfg.weights))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"checkpoint={cfg.checkpoint}: {e}") from None
    loaded.encoder.eval()
    return loaded


def _run_data(folder: Path) -> Optional[DictConfig]:
    """The ``data`` section of the d2v-pretrain run in ``folder``, when it pretrained on embedded
    data (``path: null``: its labelled probe task exists and the run's split is known)."""
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        return None
    try:
        data = OmegaConf.load(config_file).get("data")
    except Exception:  # not a run's config: fall back to the modality's probe task
        return None
    if not isinstance(data, DictConfig) or "_target_" not in data or data.get("path") is not None:
        return None
    return data


def _data_config(cfg: DictConfig, loaded: Any) -> str:
    """Fills ``cfg.data`` when ``data=`` was not given: the run's own data (same split, vocabulary
    and tokenizer as the pretraining saw), else the modality's embedded labelled task. Says which."""
    if cfg.get("data") is not None:
        return "data= as given"
    name = MODALITY_PROBE_DATA[loaded.encoder.modality]
    data = OmegaConf.load(Path(config_dir()) / "data" / f"{name}.yaml")
    origin = f"data={name}"
    run_data = _run_data(loaded.folder)
    if run_data is not None and run_data.get("_target_") == data.get("_target_"):
        data, origin = run_data, f"data={name} as the run configured it"
    with open_dict(cfg):
        cfg.data = data
    return origin


def _datamodule(cfg: DictConfig, encoder: Any, tokenizer: Optional[Path]) -> Any:
    from hydra.utils import instantiate

    with open_dict(cfg):  # data settings that follow the encoder (image size, strides) read this one
        cfg.encoder = OmegaConf.create({k: v for k, v in encoder.config.to_dict().items() if k != "extra"})
        if tokenizer is not None and "tokenizer" in cfg.data and cfg.data.tokenizer is None:
            cfg.data.tokenizer = str(tokenizer)
    try:
        dm = instantiate(cfg.data)
    except Exception as e:
        raise ConfigError(f"data: {e.__cause__ or e}") from None
    if getattr(dm, "modality", encoder.modality) != encoder.modality:
        raise ConfigError(f"data={type(dm).__name__} is {dm.modality} data but the checkpoint is a {encoder.modality} encoder")
    return dm


def _token_weights(cfg: DictConfig, dm: Any, probe: Any, encoder: Any) -> Optional[torch.Tensor]:
    """pooling=token_idf: IDF of every token id over the data module's unlabelled training text (the
    pretraining corpus for the embedded docstrings), or over the probe's training texts when the
    module has none; None for every other pooling."""
    if cfg.pooling != "token_idf":
        return None
    from .features import encoder_token_idf

    corpus = getattr(dm, "train_set", None)
    corpus = corpus if corpus is not None and len(corpus) > 0 else probe.train
    try:
        weights = encoder_token_idf(encoder, corpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    log.info("pooling=token_idf: IDF weights from %d documents of %s", len(corpus), "the data's training text" if corpus is not probe.train else "the probe's training texts")
    return weights


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every measurement of the table (see the module docstring); writes the output files."""
    from d2v_train.models import build_encoder

    from .baselines import raw_baseline
    from .features import extract_features
    from .finetune import FinetuneBudget, finetune_accuracy
    from .probe import few_label_indices, knn_accuracy, linear_probe, resolve_C

    start = time.perf_counter()
    out_dir = Path(str(cfg.run_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = _load(cfg)
    encoder = loaded.encoder
    log.info("probe data: %s", _data_config(cfg, loaded))
    dm = _datamodule(cfg, encoder, loaded.tokenizer)
    try:
        probe = dm.probe_sets()
    except Exception as e:
        raise UserError(f"data={type(dm).__name__}: its probe task could not be built: {e}") from None
    if probe is None:
        raise UserError(f"data={type(dm).__name__} has no labelled probe task (probe_sets() is None); "
                        "use data=digits or a data module whose probe_sets() returns one")  # fmt: skip
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        random_init = build_encoder(encoder.modality, encoder.config).eval()
    encoders = {"pretrained": encoder, "random init": random_init}

    feats: dict[str, tuple[Any, Any]] = {}
    kw = dict(collate_fn=probe.collate_fn, batch_size=int(cfg.batch_size), top_k=int(cfg.top_k), grid=int(cfg.grid),
              token_weights=_token_weights(cfg, dm, probe, encoder))  # fmt: skip
    for name, enc in encoders.items():
        enc.to(device)
        feats[name] = (extract_features(enc, probe.train, str(cfg.pooling), **kw),
                       extract_features(enc, probe.val, str(cfg.pooling), **kw))  # fmt: skip
        enc.cpu()
    if cfg.get("raw_baseline", True):
        baseline = raw_baseline(probe.train, probe.val, probe.collate_fn, sample_rate=int(getattr(dm, "sample_rate", 16000)))
        if baseline is not None:
            feats[baseline[0]] = baseline[1:]  # type: ignore[assignment]
    train_labels = feats["pretrained"][0].labels
    assert train_labels is not None, "probe sets must carry labels"

    rows: list[dict[str, Any]] = []
    seeds = [int(cfg.seed) + i for i in range(int(cfg.seeds))]
    budget = FinetuneBudget(**{k: v for k, v in OmegaConf.to_container(cfg.finetune).items() if k not in ("enabled", "seeds")})  # type: ignore[union-attr]
    ft_seeds = seeds[: max(0, min(int(cfg.finetune.seeds), len(seeds)))] if cfg.finetune.enabled else []
    accelerator = "gpu" if device == "cuda" else "cpu"
    for k in _lpc_list(cfg):
        for seed in seeds if k is not None else seeds[:1]:  # all labels: one deterministic subset
            idx = few_label_indices(train_labels, k, seed)
            for name, (tr, va) in feats.items():
                x, y = tr.features[idx], tr.labels[idx]
                c = resolve_C(cfg.probe.C, x, y)
                rows.append(dict(encoder=name, method="linear", labels_per_class=_lpc_name(k), seed=seed,
                                 accuracy=linear_probe(x, y, va.features, va.labels, C=c), C=c))  # fmt: skip
                rows.append(dict(encoder=name, method="knn", labels_per_class=_lpc_name(k), seed=seed,
                                 accuracy=knn_accuracy(x, y, va.features, va.labels, probe.num_classes,
                                                       k=int(cfg.knn.k), temperature=float(cfg.knn.temperature))))  # fmt: skip
                if name in encoders and seed in ft_seeds:
                    acc = finetune_accuracy(encoders[name], probe, idx, budget, seed=seed, accelerator=accelerator)
                    rows.append(dict(encoder=name, method="finetune", labels_per_class=_lpc_name(k), seed=seed, accuracy=acc))
            log.info("labels_per_class=%s seed=%d done (%.0f s)", _lpc_name(k), seed, time.perf_counter() - start)

    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lpcs = [_lpc_name(k) for k in _lpc_list(cfg)]
    title = (f"{cfg.checkpoint} on {probe.name} ({cfg.pooling}-pooled features; {len(probe.val)} val examples; "
             f"seeds {seeds[0]}..{seeds[-1]})")  # fmt: skip
    table = results_table(rows, lpcs)
    (out_dir / "results.md").write_text(f"# d2v-eval: {title}\n\nAccuracy, mean ± sample std over seeds.\n\n{table}\n")
    plot_results(rows, lpcs, out_dir / "results.png", title)
    print(f"d2v-eval: {title}\n\n{table}\n")
    print(f"d2v-eval: done in {time.perf_counter() - start:.1f} s; wrote {out_dir}/results.csv, results.md, results.png")
    return rows


def results_table(rows: list[dict[str, Any]], lpcs: list[str]) -> str:
    """Markdown: one row per (encoder, method), one column per labels_per_class, mean ± spread."""
    from .probe import spread

    keys: list[tuple[str, str]] = []
    for r in rows:
        key = (r["encoder"], r["method"])
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda kv: (ROW_ORDER.index(kv[0]) if kv[0] in ROW_ORDER else 9,
                              METHODS.index(kv[1]) if kv[1] in METHODS else 9))  # fmt: skip
    header = "| encoder | method | " + " | ".join(f"{k} labels/class" if k != "all" else "all labels" for k in lpcs) + " |"
    lines = [header, "|---|---|" + "---|" * len(lpcs)]
    for enc, method in keys:
        cells = []
        for k in lpcs:
            vals = [r["accuracy"] for r in rows if r["encoder"] == enc and r["method"] == method and r["labels_per_class"] == k]
            cells.append(str(spread(vals)) if vals else "—")
        lines.append(f"| {enc} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], lpcs: list[str], path: Path, title: str) -> None:
    """Accuracy vs labels per class, one line (with spread) per encoder and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .probe import spread

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"linear": "-", "knn": ":", "finetune": "--"}
    colors = {"pretrained": "tab:blue", "random init": "tab:grey", **{b: "tab:orange" for b in BASELINES}}
    for enc in ROW_ORDER:
        for method in METHODS:
            pts = [(i, spread([r["accuracy"] for r in rows if r["encoder"] == enc and r["method"] == method and r["labels_per_class"] == k]))
                   for i, k in enumerate(lpcs)]  # fmt: skip
            pts = [(i, s) for i, s in pts if s.n]
            if not pts:
                continue
            xs, ss = [p[0] for p in pts], [p[1] for p in pts]
            ax.errorbar(xs, [s.mean for s in ss], yerr=[s.std for s in ss], linestyle=styles[method], marker="o",
                        color=colors.get(enc), capsize=3, label=f"{enc}, {method}")  # fmt: skip
    ax.set_xticks(range(len(lpcs)), [k if k == "all" else f"{k}/class" for k in lpcs])
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("val accuracy")
    ax.set_title(title[:90], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``d2v-eval``."""
    return run_app(evaluate, "eval", "d2v-eval", validate=validate_config, argv=argv)


if __name__ == "__main__":
    main()
