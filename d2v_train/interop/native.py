"""Our own plain encoder format: ``encoder.safetensors`` (our names) + ``config.json``.

Loadable with one call and no Lightning: ``d2v_train.load_encoder(path)``, which also reads every
other source (a ``.ckpt``, a run directory, a transformers directory) through ``interop.sources``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torch import nn

from ..models import ENCODERS, Encoder, build_encoder
from .files import check_state, load_json, load_weights, save_json, save_safetensors

FORMAT = "d2v_train.encoder"
VERSION = 1


def save_encoder(encoder: nn.Module, path: Union[str, Path]) -> Path:
    """Writes ``encoder.safetensors`` and ``config.json`` (modality + encoder config) atomically."""
    modality = getattr(encoder, "modality", None)
    if modality not in ENCODERS or not isinstance(encoder, ENCODERS[modality][0]):
        raise TypeError(f"expected a d2v_train encoder (audio, text or vision), got {type(encoder).__name__}")
    directory = Path(path)
    save_safetensors(encoder.state_dict(), directory / "encoder.safetensors", metadata={"modality": modality})
    save_json({"format": FORMAT, "version": VERSION, "modality": modality, "config": encoder.config.to_dict()},
              directory / "config.json")
    return directory


def load_encoder(path: Union[str, Path], weights: str = "student") -> Encoder:
    """The encoder at ``path``, in eval mode, whatever kind of source it is.

    - a directory written by ``save_encoder`` / ``d2v-export format=safetensors`` (read here);
    - a ``d2v-pretrain`` run directory (its ``checkpoints/last.ckpt``) or any ``.ckpt`` of
      ``d2v-pretrain`` (``weights``: ``student`` or the EMA ``teacher``) or ``d2v-finetune`` (the
      task model's encoder);
    - a transformers Data2Vec directory (bare or task model), a fairseq / BEiT data2vec v1 or fairseq 2.0 file.

    Everything but our own directory goes through ``interop.sources.load_source``, the reader that
    ``d2v-export`` and ``pretrained=`` use, so all three accept the same things.
    """
    directory = Path(path)
    if not (directory / "encoder.safetensors").is_file():
        from .sources import load_source  # sources imports this module: import at call time

        return load_source(directory, weights).encoder.eval()
    return read_native(directory)


def read_native(path: Union[str, Path]) -> Encoder:
    """Our encoder from a directory written by ``save_encoder`` (or ``d2v-export format=safetensors``)."""
    directory = Path(path)
    meta = load_json(directory / "config.json")
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{directory / 'config.json'}: format is {meta.get('format')!r}, expected {FORMAT!r} "
            "(for a transformers directory use d2v_train.interop.load_transformers)"
        )
    if meta.get("version") != VERSION:
        raise ValueError(f"{directory / 'config.json'}: unsupported format version {meta.get('version')!r}")
    encoder = build_encoder(meta.get("modality"), meta.get("config") or {})
    state = load_weights(directory / "encoder.safetensors")
    check_state(encoder.state_dict(), state, str(directory / "encoder.safetensors"))
    encoder.load_state_dict(state)
    return encoder.eval()  # like transformers' from_pretrained: ready for inference
