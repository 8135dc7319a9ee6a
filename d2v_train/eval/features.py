"""Frozen features of an encoder: any source in, one pooled vector per example out.

    from d2v_train.eval import load_encoder, extract_features, embed
    encoder = load_encoder("runs/pretrain/vision/2026-.../")      # run dir, .ckpt, export or transformers dir
    feats = extract_features(encoder, probe.val, collate_fn=probe.collate_fn, pooling="mean")
    feats.features.shape   # (N, hidden_size); feats.labels: (N,) when the data carries labels

The encoder runs in eval mode under ``torch.inference_mode``, unmasked, in batches; its own train /
eval mode is restored afterwards, so a training run can call this on its student. Loaders built here
carry their own generator: extracting features never draws from the global RNG (a run that probes
itself resumes exactly like one that does not).

Poolings (``POOLINGS``):
- ``mean``: the last hidden state averaged over real tokens (padding and the CLS / prefix tokens
  excluded) - the default, and what the probe tables report;
- ``cls``: the first token (vision's CLS; text's ``<s>``); audio has none;
- ``topk``: the outputs of the top ``top_k`` blocks, each layer-normalised per token (no affine),
  averaged, then mean-pooled like ``mean``: the layers data2vec's targets read, normalised the way
  its v1 text and image targets normalise each layer. Without the norm a pre-norm encoder's (the
  ViT's) raw residual stream is read, whose few large channels swamp the rest: on digits a
  pretrained tiny ViT probed 6-19 points lower that way, a random one 24-42;
- ``grid``: vision only: patch tokens average-pooled to a ``grid`` x ``grid`` layout and concatenated
  (``grid**2 * hidden_size`` values), which keeps where things are in the image;
- ``token_idf``: text only: the rows of the encoder's token table for the example's tokens (before
  positions and blocks), averaged with weights ``token_weights[id]``, usually ``token_idf(corpus)``:
  a weighted bag of learnt token vectors, as TF-IDF weighs its counts. On a small text encoder
  pretrained on little text this is where what data2vec learnt about topics sits
  (docs/presets.md measures it); it says nothing about what the blocks learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from d2v_train.interop.native import load_encoder
from d2v_train.models.transformer import mean_pool

__all__ = ["POOLINGS", "Features", "embed", "encoder_token_idf", "extract_features", "load_encoder", "pool", "token_idf"]

POOLINGS = ("mean", "cls", "topk", "grid", "token_idf")


@dataclass
class Features:
    """Pooled features ``(N, dim)`` (float32, CPU) and, when the data has them, labels ``(N,)``."""

    features: Tensor
    labels: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def token_idf(data: Union[Dataset, Iterable[Mapping[str, Any]]], vocab_size: int, pad_token_id: Optional[int] = None) -> Tensor:
    """Smoothed inverse document frequency of every token id, ``ln((1 + N) / (1 + df)) + 1`` (scikit-
    learn's TF-IDF weighting), over the N items of ``data`` (each a dict whose ``inputs`` are token
    ids: one document); ids never seen get the largest weight, ``pad_token_id`` gets 0. The weights
    ``pooling="token_idf"`` reads; computed from unlabelled text, e.g. the pretraining corpus."""
    seen = torch.zeros(vocab_size, dtype=torch.long)
    docs = 0
    for item in data:
        ids = torch.as_tensor(item["inputs"]).long().flatten()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token_idf: document {docs} has token ids in [{int(ids.min())}, {int(ids.max())}], outside the vocabulary [0, {vocab_size})")
        seen[ids.unique()] += 1
        docs += 1
    if docs == 0:
        raise ValueError("token_idf: the corpus has no documents")
    idf = torch.log((1.0 + docs) / (1.0 + seen.double())).float() + 1.0
    if pad_token_id is not None:
        idf[pad_token_id] = 0.0
    return idf


def _require_token_table(encoder: nn.Module) -> None:
    modality = getattr(encoder, "modality", "?")
    if modality != "text":
        raise ValueError(f"pooling='token_idf' reads a token table (text), not a {modality} encoder")


def encoder_token_idf(encoder: nn.Module, corpus: Union[Dataset, Iterable[Mapping[str, Any]]]) -> Tensor:
    """``token_idf`` over ``corpus`` for a text encoder's vocabulary, its padding id weighing 0: the
    ``token_weights`` of ``pooling="token_idf"`` for that encoder."""
    _require_token_table(encoder)
    config = encoder.config  # type: ignore[union-attr]
    return token_idf(corpus, int(config.vocab_size), getattr(config, "pad_token_id", None))


def _check_pooling(encoder: nn.Module, pooling: str, token_weights: Optional[Tensor] = None) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    modality = getattr(encoder, "modality", "?")
    if pooling == "token_idf":
        _require_token_table(encoder)
        vocab = int(encoder.config.vocab_size)
        if token_weights is None or tuple(token_weights.shape) != (vocab,):
            got = "none" if token_weights is None else f"shape {tuple(token_weights.shape)}"
            raise ValueError(f"pooling='token_idf' needs token_weights of shape ({vocab},), one per token id (e.g. token_idf(corpus)); got {got}")
    if pooling == "grid" and modality != "vision":
        raise ValueError(f"pooling='grid' needs a patch grid (vision), not a {modality} encoder")
    if pooling == "cls" and modality == "audio":
        raise ValueError("pooling='cls': the audio encoder has no CLS token; use mean or topk")


def pool(
    encoder: nn.Module,
    inputs: Tensor,
    padding_mask: Optional[Tensor] = None,
    pooling: str = "mean",
    *,
    top_k: int = 3,
    grid: int = 2,
    token_weights: Optional[Tensor] = None,
    **forward_kwargs: Any,
) -> Tensor:
    """One forward pass of ``encoder`` (as it is: mode and grad are the caller's) -> ``(batch, dim)``;
    ``token_idf`` reads the token table only."""
    _check_pooling(encoder, pooling, token_weights)
    if pooling == "token_idf":  # the token table alone: no forward pass through the blocks
        assert token_weights is not None
        encoder.check_token_ids(inputs)  # the encoder's own checks: token_weights has one weight per id
        return mean_pool(encoder.embeddings.token(inputs), padding_mask, token_weights.to(inputs.device)[inputs])
    out = encoder(inputs, padding_mask=padding_mask, output_hidden_states=pooling == "topk", **forward_kwargs)
    prefix = int(getattr(encoder, "num_prefix_tokens", 0))
    if pooling == "cls":
        return out.last_hidden_state[:, 0]
    if pooling == "topk":
        blocks = out.hidden_states[1:]  # [0] is the input of the first block
        k = max(1, min(int(top_k), len(blocks)))
        top = torch.stack(blocks[-k:])
        x = F.layer_norm(top, top.shape[-1:]).mean(0)
    else:
        x = out.last_hidden_state
    x = x[:, prefix:]
    pad = out.padding_mask
    if pad is not None:
        pad = pad[:, prefix:] if pad.shape[1] == x.shape[1] + prefix else pad[:, -x.shape[1] :]
    if pooling == "grid":
        rows, cols = (inputs.shape[-2] // encoder.patch_size[0], inputs.shape[-1] // encoder.patch_size[1])
        maps = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)
        return F.adaptive_avg_pool2d(maps, (grid, grid)).flatten(1)
    return mean_pool(x, pad)


def _batch_parts(batch: Union[Mapping[str, Any], Tensor]) -> tuple[Tensor, Optional[Tensor], dict[str, Any], Optional[Tensor]]:
    if isinstance(batch, Tensor):
        return batch, None, {}, None
    extra = {"token_type_ids": batch["token_type_ids"]} if batch.get("token_type_ids") is not None else {}
    labels = batch.get("labels")
    return batch["inputs"], batch.get("padding_mask"), extra, labels if isinstance(labels, Tensor) else None


class _Eval:
    """Eval mode + inference mode for the block, the module's previous mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes = [(m, m.training) for m in module.modules()]
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.module.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.inference.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode


def _device(encoder: nn.Module) -> torch.device:
    param = next(encoder.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed(
    encoder: nn.Module,
    batch: Union[Mapping[str, Any], Tensor],
    pooling: str = "mean",
    *,
    top_k: int = 3,
    grid: int = 2,
    token_weights: Optional[Tensor] = None,
) -> Tensor:
    """Pooled features ``(batch, dim)`` of one batch: a collated dict (``inputs``, optional
    ``padding_mask`` / ``token_type_ids``) or a raw input tensor (pixels ``(B, 3, H, W)``, waveforms
    ``(B, samples)``, token ids ``(B, time)``). Eval + inference mode, no masking; float32 on CPU."""
    inputs, pad, extra, _ = _batch_parts(batch)
    device = _device(encoder)
    extra = {k: v.to(device) for k, v in extra.items()}
    with _Eval(encoder):
        out = pool(encoder, inputs.to(device), pad.to(device) if pad is not None else None, pooling,
                   top_k=top_k, grid=grid, token_weights=token_weights, **extra)  # fmt: skip
    return out.float().cpu()


def extract_features(
    encoder: nn.Module,
    data: Union[DataLoader, Dataset, Iterable[Mapping[str, Any]]],
    pooling: str = "mean",
    *,
    collate_fn: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
    batch_size: int = 128,
    top_k: int = 3,
    grid: int = 2,
    token_weights: Optional[Tensor] = None,
) -> Features:
    """Pooled features of every example in ``data`` (a DataLoader or other iterable of collated
    batches, or a map-style Dataset of items, batched here with ``collate_fn``), in order."""
    _check_pooling(encoder, pooling, token_weights)
    if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        data = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    for batch in data:
        feats.append(embed(encoder, batch, pooling, top_k=top_k, grid=grid, token_weights=token_weights))
        lab = _batch_parts(batch)[3]
        if lab is not None:
            labels.append(lab.reshape(-1).cpu())
    if not feats:
        raise ValueError("extract_features: the data yielded no batches")
    x = torch.cat(feats)
    y = torch.cat(labels) if len(labels) == len(feats) else None
    return Features(x, y)

