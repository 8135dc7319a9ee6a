"""``d2v-export``: a checkpoint or model directory -> transformers directory or plain safetensors.

The pretraining-only parts (regression head, EMA teacher unless asked for, optimizer state) never
reach an export: only the chosen encoder (and a fine-tuned task head) is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .cli import ConfigError, UserError, run_app
from .interop import save_encoder, save_transformers
from .interop.hub import push_to_hub, write_hub_files
from .interop.run_record import RunRecord, read_run
from .interop.sources import TOKENIZER_FILE, LoadedModel, load_source
from .interop.transformers import BASE_CLASS

FORMATS = ("hf", "safetensors")


def validate(cfg: Any) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is not one of {list(FORMATS)}")
    if cfg.weights not in ("student", "teacher"):
        raise ConfigError(f"weights={cfg.weights!r}: expected 'student' or 'teacher'")
    repo = cfg.get("push_to_hub")
    if repo is not None and (cfg.format != "hf" or not isinstance(repo, str) or not repo.strip() or repo.count("/") > 1):
        raise ConfigError(f"push_to_hub={repo!r}: expected a Hub repository id such as 'user/model-name', with format=hf")


def _pooler_note(source: LoadedModel, include: bool) -> list[str]:
    encoder = source.encoder
    if encoder.modality != "text":
        return []
    if include and encoder.pooler is not None:
        return ["The pooler (`pooler_output`) is included as the source had it."]
    why = "data2vec pretraining never trains it" if source.kind == "pretraining" else "the source has none"
    return [f"The pooler (`pooler_output`) is not included: {why}. transformers initialises a new, untrained one "
            "when it loads `Data2VecTextModel` (and says so); use `last_hidden_state` (e.g. the first token or "
            "the mean over tokens) as the sequence representation."]


def export(source: LoadedModel, output_dir: Path, fmt: str, record: Optional[RunRecord] = None) -> list[Path]:
    """Writes ``source`` to ``output_dir`` in ``fmt``; returns the files written.

    ``hf``: the weights as the matching transformers class plus what transformers' Auto classes and
    ``pipeline()`` need (preprocessor / tokenizer files) and a ``README.md`` model card, derived
    from the run's records (``record``; read from beside the checkpoint when not given).
    ``safetensors``: our own encoder format; a text model's ``tokenizer.json`` travels with it.
    """
    output_dir = Path(output_dir)
    if fmt == "safetensors":
        save_encoder(source.encoder, output_dir)
        files = [output_dir / "encoder.safetensors", output_dir / "config.json"]
        tokenizer = source.tokenizer
        if tokenizer is not None and tokenizer.resolve() != (output_dir / TOKENIZER_FILE).resolve():
            shutil.copyfile(tokenizer, output_dir / TOKENIZER_FILE)
            files.append(output_dir / TOKENIZER_FILE)
        return files
    notes: list[str] = []
    if source.model is not source.encoder:
        from .interop.heads import save_transformers_task

        save_transformers_task(source.model, output_dir)
        architecture = source.model.architecture
    else:
        # a pretraining checkpoint's text pooler was never trained: it is left out, not shipped as if trained
        include_pooler = source.kind != "pretraining"
        save_transformers(source.model, output_dir, include_pooler=include_pooler)
        architecture = BASE_CLASS[source.encoder.modality]
        notes = _pooler_note(source, include_pooler)
    files = [output_dir / "model.safetensors", output_dir / "config.json"]
    if record is None:
        record = read_run(source.path, source.kind, source.extras.get("hparams"), source.weights,
                          source.extras.get("global_step"))
    files += write_hub_files(source.model, architecture, output_dir, record, tokenizer=source.tokenizer,
                             ctc_vocab=source.extras.get("vocab"), notes=notes)
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
    repo = cfg.get("push_to_hub")
    if repo:
        try:
            push_to_hub(output_dir, repo, private=cfg.get("private"))
        except Exception as err:  # network, credentials, permissions: the export itself is complete
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"the export in {output_dir} is complete, but the upload to {repo} failed: {first}") from None
        print(f"d2v-export: uploaded {output_dir} to https://huggingface.co/{repo}", flush=True)
    return files


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``d2v-export``."""
    return run_app(run, "export", "d2v-export", validate=validate, argv=argv)


if __name__ == "__main__":
    main()
