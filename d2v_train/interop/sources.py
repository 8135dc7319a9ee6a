"""Read a model from any source d2v_train accepts, telling the kinds apart by their contents.

Sources: a run directory (read as its ``checkpoints/last.ckpt``), a ``d2v-pretrain`` checkpoint (Lightning ``.ckpt``: the encoder config is in
``hyper_parameters["encoder"]``, the student weights are ``student.*``, the EMA teacher's
``teacher.model.*``), a ``d2v-finetune`` checkpoint (the task model is ``model.*``, its head
settings in ``hyper_parameters["head"]``), our export directory (``encoder.safetensors`` +
``config.json``), a transformers Data2Vec directory (bare or task model), and a data2vec v1 file
from fairseq or the BEiT-based vision release or a data2vec 2.0 file from fairseq. Every file is read with ``weights_only=True`` or
safetensors. ``d2v-export`` and ``d2v-finetune pretrained=`` both read through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from torch import nn

from ..models import Encoder, build_encoder
from .fairseq import load_fairseq
from .files import check_state, load_json, not_a_torch_file, torch_load_safely
from .native import FORMAT as NATIVE_FORMAT
from .native import read_native
from .transformers import BASE_CLASS, load_transformers

TOKENIZER_FILE = "tokenizer.json"  # a text model's tokenizer, kept beside its weights
RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # what a run directory stands for

SourceKind = Literal["pretraining", "native", "transformers", "transformers-task", "fairseq", "finetuning"]


@dataclass
class LoadedModel:
    """A model read from a source, with what it is, for messages and export choices."""

    model: nn.Module
    kind: SourceKind
    path: Path
    weights: str = "student"
    extras: dict[str, Any] = field(default_factory=dict)  # fine-tuning: vocab, classes, head settings

    @property
    def folder(self) -> Path:
        """Where the files that belong to the weights lie: the model directory, or the run directory
        of a ``RUN_DIR/checkpoints/*.ckpt`` file."""
        folder = self.path if self.path.is_dir() else self.path.parent
        return folder.parent if folder.name == "checkpoints" else folder

    @property
    def tokenizer(self) -> Optional[Path]:
        """The ``tokenizer.json`` saved with a text model (in ``folder``)."""
        candidate = self.folder / TOKENIZER_FILE
        return candidate if candidate.is_file() else None

    @property
    def encoder(self) -> Encoder:
        return getattr(self.model, "encoder", self.model)  # task heads hold their encoder


def is_lightning_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint


def encoder_from_pretraining(checkpoint: dict[str, Any], weights: str = "student", where: str = "checkpoint") -> Encoder:
    """The student (default) or EMA-teacher encoder of a ``d2v-pretrain`` checkpoint."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "modality" not in hparams or not hparams.get("encoder"):
        raise ValueError(f"{where}: not a d2v-pretrain checkpoint (hyper_parameters has no modality/encoder)")
    prefixes = {"student": "student.", "teacher": "teacher.model."}
    if weights not in prefixes:
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    prefix = prefixes[weights]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    encoder = build_encoder(hparams["modality"], hparams["encoder"])
    check_state(encoder.state_dict(), state, f"{where} ({weights} weights)")
    encoder.load_state_dict(state)
    return encoder.eval()


def model_from_finetuning(checkpoint: dict[str, Any], where: str = "checkpoint") -> nn.Module:
    """The task model (encoder + head) of a ``d2v-finetune`` checkpoint."""
    from ..models.heads import build_head

    hparams = checkpoint.get("hyper_parameters") or {}
    encoder = build_encoder(hparams["modality"], hparams["encoder"])
    model = build_head(hparams.get("architecture") or hparams["task"], encoder, **(hparams.get("head") or {}))
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    check_state(model.state_dict(), state, f"{where} (fine-tuned model weights)")
    model.load_state_dict(state)
    return model.eval()


def load_source(path: Union[str, Path], weights: str = "student", *, ignore_head: bool = False) -> LoadedModel:
    """Reads ``path`` as whichever supported source it is; the error lists them all otherwise."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / RUN_CHECKPOINT).is_file():
        path = path / RUN_CHECKPOINT  # a d2v-pretrain / d2v-finetune run directory: its last state
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path}: a directory without config.json or checkpoints/last.ckpt (expected a d2v_train "
                "export, a transformers Data2Vec directory or a run directory; or pass a .ckpt file)"
            )
        config = load_json(config_file)
        if config.get("format") == NATIVE_FORMAT:
            return LoadedModel(read_native(path), "native", path)
        architectures = config.get("architectures") or []
        if architectures and architectures[0] not in BASE_CLASS.values() and not ignore_head:
            from .heads import load_transformers_task

            return LoadedModel(load_transformers_task(path), "transformers-task", path)
        return LoadedModel(load_transformers(path, ignore_head=ignore_head), "transformers", path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or model directory")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: pass the directory holding this file and its config.json")
    problem = not_a_torch_file(path)
    if problem:
        raise ValueError(problem)
    checkpoint = torch_load_safely_or_fairseq(path)
    if checkpoint is None:
        return LoadedModel(load_fairseq(path), "fairseq", path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if hparams.get("task"):
        extras = {"vocab": hparams.get("vocab"), "classes": hparams.get("classes"), "head": hparams.get("head") or {},
                  "hparams": dict(hparams), "global_step": checkpoint.get("global_step")}
        return LoadedModel(model_from_finetuning(checkpoint, str(path)), "finetuning", path, extras=extras)
    return LoadedModel(encoder_from_pretraining(checkpoint, weights, str(path)), "pretraining", path, weights,
                       extras={"hparams": dict(hparams), "global_step": checkpoint.get("global_step")})


def torch_load_safely_or_fairseq(path: Path) -> Optional[dict[str, Any]]:
    """The Lightning checkpoint at ``path``, or None when it is not one (then it is read as fairseq,
    whose loader allows the config containers fairseq stores)."""
    try:
        checkpoint = torch_load_safely(path)
    except ValueError:
        return None
    return checkpoint if is_lightning_checkpoint(checkpoint) else None
