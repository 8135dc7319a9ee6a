"""``d2v-export``: a checkpoint or model directory -> transformers directory or plain safetensors.

The pretraining-only parts (regression head, EMA teacher unless asked for, optimizer state) never
reach an export: only the chosen encoder (and a fine-tuned task head) is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .cli import ConfigError, run_app
from .interop import save_encoder, save_transformers
from .interop.sources import TOKENIZER_FILE, LoadedModel, load_source

FORMATS = ("hf", "safetensors")


def validate(cfg: Any) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is not one of {list(FORMATS)}")
    if cfg.weights not in ("student", "teacher"):
        raise ConfigError(f"weights={cfg.weights!r}: expected 'student' or 'teacher'")


def export(source: LoadedModel, output_dir: Path, fmt: str) -> list[Path]:
    """Writes ``source`` to ``output_dir`` in ``fmt``; returns the files written. A text model's
    ``tokenizer.json`` travels with it."""
    if fmt == "safetensors":
        save_encoder(source.encoder, output_dir)
        files = [output_dir / "encoder.safetensors", output_dir / "config.json"]
    else:
        if source.model is not source.encoder:
            from .interop.heads import save_transformers_task

            save_transformers_task(source.model, output_dir)
        else:
            save_transformers(source.model, output_dir)
        files = [output_dir / "model.safetensors", output_dir / "config.json"]
    tokenizer = source.tokenizer
    if tokenizer is not None and tokenizer.resolve() != (output_dir / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, output_dir / TOKENIZER_FILE)
        files.append(output_dir / TOKENIZER_FILE)
    return files


def summary(source: LoadedModel, files: list[Path], fmt: str) -> str:
    params = list(source.model.parameters())
    count = sum(p.numel() for p in params)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    what = f"{source.encoder.modality} encoder"
    if source.model is not source.encoder:
        what = f"{type(source.model).__name__} ({what} + task head)"
    weights = f", {source.weights} weights" if source.kind == "pretraining" else ""
    lines = [f"d2v-export: read {source.kind} source {source.path}{weights}",
             f"d2v-export: wrote {what}, {count:,} parameters, {'/'.join(dtypes)}, format={fmt}"]
    lines += [f"  {f} ({f.stat().st_size:,} bytes)" for f in files]
    return "\n".join(lines)


def run(cfg: Any) -> list[Path]:
    try:
        source = load_source(Path(cfg.checkpoint), weights=cfg.weights)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if cfg.weights == "teacher" and source.kind != "pretraining":
        raise ConfigError(f"weights=teacher needs a d2v-pretrain checkpoint; {cfg.checkpoint} is a {source.kind} source")
    output_dir = Path(cfg.output_dir)
    with torch.no_grad():
        try:
            files = export(source, output_dir, cfg.format)
        except ValueError as err:  # e.g. an architecture transformers has no equivalent for
            raise ConfigError(str(err)) from None
    print(summary(source, files, cfg.format), flush=True)
    return files


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``d2v-export``."""
    return run_app(run, "export", "d2v-export", validate=validate, argv=argv)


if __name__ == "__main__":
    main()
