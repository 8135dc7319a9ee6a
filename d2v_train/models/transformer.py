"""The transformer shared by every modality: attention, feed-forward, block and block stack.

One block covers the three layouts data2vec uses:
- post-norm (wav2vec 2.0 / RoBERTa order: ``x = norm(x + f(x))``), used by audio and text;
- pre-norm (BEiT order: ``x = x + f(norm(x))``) with optional layer scale, used by vision;
- the BEiT attention bias pattern (query and value bias, no key bias) and relative position bias.

A block can hand back the tensor data2vec regresses: ``"ffn"`` is the feed-forward output before
dropout, residual and norm (v1 audio and text, all of 2.0); ``"block"`` is the block output (v1 vision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerTarget = Optional[Literal["ffn", "block"]]

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
    "tanh": lambda: nn.Tanh(),
}


def activation(name: str) -> nn.Module:
    """Builds the activation named like transformers' ``hidden_act`` strings."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


def norm_over_channels(norm: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``norm`` (a layer norm over the last axis) applied to the channel axis (dim 1) of a conv's
    ``(batch, channels, ...)`` output, computed on the channels-last view.

    What the next conv receives is chosen for speed on CPU. Over time (1-D), the output is copied
    back to a contiguous ``(batch, channels, time)``: oneDNN's 1-D convolution has no channels-last
    format, and the strided view made the activation's backward and the next conv about twice as slow
    in the tiny audio CNN; in the 2.0 decoder the copy takes 12% off a tiny text update. Over a 2-D
    grid the channels-last view goes on as it is: oneDNN's 2-D convolution takes it natively, and a
    copy made the tiny vision 2.0 update 16% slower."""
    y = norm(x.movedim(1, -1)).movedim(-1, 1)
    return y.contiguous() if y.ndim == 3 else y


@dataclass
class EncoderOutput:
    """What every encoder returns; field names follow transformers' model outputs.

    Shapes: ``last_hidden_state (batch, time, dim)``; ``padding_mask (batch, time)`` with True = padding.
    """

    last_hidden_state: Tensor
    hidden_states: Optional[tuple[Tensor, ...]] = None
    layer_targets: Optional[list[Tensor]] = None
    padding_mask: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    # with ``drop_masked=True``: (batch, kept) positions of the encoded tokens in the full sequence
    # (prefix tokens such as CLS not counted); ``last_hidden_state`` then holds prefix + kept tokens
    kept_index: Optional[Tensor] = None


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch for a random subset of samples."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class RelativePositionBias(nn.Module):
    """BEiT relative position bias over a 2-D patch grid plus a CLS token.

    The table holds one bias per head for every 2-D offset and three extra rows for
    CLS->patch, patch->CLS and CLS->CLS. For another grid size the offset table is resized
    bilinearly (the MiDaS v3.1 extension transformers implements), so a model trained at one
    resolution runs at another.
    """

    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        num_distances = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        self.table = nn.Parameter(torch.zeros(num_distances, num_heads))
        self._index_cache: dict[tuple[int, int], Tensor] = {}

    @staticmethod
    def _index(window: tuple[int, int]) -> Tensor:
        wh, ww = window
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += wh - 1
        rel[:, :, 1] += ww - 1
        rel[:, :, 0] *= 2 * ww - 1
        num_distances = (2 * wh - 1) * (2 * ww - 1) + 3
        index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
        index[1:, 1:] = rel.sum(-1)
        index[0, :] = num_distances - 3
        index[:, 0] = num_distances - 2
        index[0, 0] = num_distances - 1
        return index

    def forward(self, window: Optional[tuple[int, int]] = None) -> Tensor:
        """Returns the bias ``(1, heads, 1 + wh*ww, 1 + wh*ww)`` for a patch grid ``window``."""
        window = tuple(window or self.window_size)
        table = self.table
        if window != self.window_size:
            old_h, old_w = 2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1
            new_h, new_w = 2 * window[0] - 1, 2 * window[1] - 1
            grid = table[:-3].reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(new_h, new_w), mode="bilinear")
            table = torch.cat([grid.permute(0, 2, 3, 1).reshape(new_h * new_w, -1), table[-3:]])
        index = self._index_cache.get(window)
        if index is None or index.device != table.device:
            # built outside inference mode so a cache filled during validation serves training too
            with torch.inference_mode(False):
                index = self._index(window).to(table.device)
            self._index_cache[window] = index
        n = window[0] * window[1] + 1
        # contiguous: CUDA's fused attention kernels want a mask whose last dimension has stride 1;
        # the permuted view sent every vision attention call to the fp32 math path
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` with one fused qkv matmul.

    ``qkv_bias``: ``"all"`` (wav2vec 2.0 / RoBERTa), ``"qv"`` (BEiT: query and value bias, no key
    bias) or ``"none"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: Literal["all", "qv", "none"] = "all",
        attn_dropout: float = 0.0,
        rel_pos_window: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_attention_heads {num_heads}")
        if qkv_bias not in ("all", "qv", "none"):
            raise ValueError(f"qkv_bias must be 'all', 'qv' or 'none', got {qkv_bias!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "all")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(rel_pos_window, num_heads) if rel_pos_window else None

    def forward(
        self, x: Tensor, attn_mask: Optional[Tensor] = None, window: Optional[tuple[int, int]] = None
    ) -> Tensor:
        batch, length, dim = x.shape
        if self.q_bias is not None:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias(window).to(q.dtype)
            attn_mask = bias if attn_mask is None else _combine(attn_mask, bias)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


def _combine(mask: Tensor, bias: Tensor) -> Tensor:
    """Adds a float bias to a bool (True = attend) or float attention mask."""
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return mask + bias


def attention_mask(
    padding_mask: Optional[Tensor],
    *,
    causal: bool = False,
    length: Optional[int] = None,
    bias: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Optional[Tensor]:
    """Builds the SDPA mask for a stack: padded keys are never attended to.

    Returns a bool mask (True = attend) when there is no additive bias, so SDPA can pick a fused
    kernel; a float mask of ``dtype`` when a relative position bias has to be added.
    """
    mask = None
    if padding_mask is not None:
        mask = (~padding_mask)[:, None, None, :]
    if causal:
        n = length if padding_mask is None else padding_mask.shape[1]
        device = None if padding_mask is None else padding_mask.device
        tri = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        mask = tri if mask is None else mask & tri
    if bias is not None:
        bias = bias.to(dtype)
        return bias if mask is None else _combine(mask, bias)
    return mask


def mean_pool(x: Tensor, padding_mask: Optional[Tensor] = None, weights: Optional[Tensor] = None) -> Tensor:
    """``(B, T, D)`` -> ``(B, D)``: the mean over each row's valid positions (True in
    ``padding_mask`` = padding; a row with none gives 0), weighted by ``weights`` ``(B, T)`` if given."""
    if weights is not None:
        w = weights.to(x.dtype) if padding_mask is None else weights.to(x.dtype).masked_fill(padding_mask, 0.0)
        return (x * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)
    if padding_mask is None:
        return x.mean(dim=1)
    keep = (~padding_mask).to(x.dtype).unsqueeze(-1)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class Mlp(nn.Module):
    """Feed-forward: fc1 -> activation -> activation dropout -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation(act)
        self.drop = nn.Dropout(activation_dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """One transformer block, post-norm or pre-norm (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        norm_first: bool = False,
        act: str = "gelu",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        layer_scale_init: float = 0.0,
        qkv_bias: Literal["all", "qv", "none"] = "all",
        drop_path: float = 0.0,
        rel_pos_window: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, rel_pos_window=rel_pos_window
        )
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, mlp_dim, act, activation_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        if layer_scale_init > 0:
            self.ls1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.ls2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.ls1 = self.ls2 = None

    def _scale(self, x: Tensor, gamma: Optional[Tensor]) -> Tensor:
        return x if gamma is None else x * gamma

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        window: Optional[tuple[int, int]] = None,
        layer_target: LayerTarget = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Returns the block output and, if asked, the data2vec target tensor of this block."""
        if self.norm_first:
            a = self.attn(self.norm1(x), attn_mask, window)
            x = x + self.drop_path(self._scale(self.dropout(a), self.ls1))
            ffn = self.mlp(self.norm2(x))
            x = x + self.drop_path(self._scale(self.dropout(ffn), self.ls2))
        else:
            a = self.attn(x, attn_mask, window)
            x = self.norm1(x + self.drop_path(self._scale(self.dropout(a), self.ls1)))
            ffn = self.mlp(x)
            x = self.norm2(x + self.drop_path(self._scale(self.dropout(ffn), self.ls2)))
        if layer_target == "ffn":
            return x, ffn
        if layer_target == "block":
            return x, x
        return x, None


class TransformerStack(nn.Module):
    """A stack of blocks with layerdrop and a linear drop-path schedule (0 -> drop_path_rate)."""

    def __init__(
        self,
        num_layers: int,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        layerdrop: float = 0.0,
        drop_path_rate: float = 0.0,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.layerdrop = layerdrop
        # linear 0 -> drop_path_rate, computed in Python so the stack also builds on the meta device
        rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, drop_path=rate, **block_kwargs) for rate in rates
        )

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        *,
        window: Optional[tuple[int, int]] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, Optional[tuple[Tensor, ...]], Optional[list[Tensor]]]:
        """Returns (output, hidden states, per-block targets).

        Hidden states follow transformers: the input of the first block, then every block output.
        Layerdrop is off when targets are requested, since a dropped block has no target.
        """
        hidden = [x] if output_hidden_states else None
        targets: Optional[list[Tensor]] = [] if layer_targets else None
        drop: Sequence[bool] = [False] * len(self.blocks)
        if self.training and self.layerdrop > 0 and not layer_targets:
            drop = (torch.rand(len(self.blocks)) < self.layerdrop).tolist()
        for block, skip in zip(self.blocks, drop):
            if skip:
                continue
            x, target = block(x, attn_mask, window, layer_targets)
            if targets is not None:
                targets.append(target)
            if hidden is not None:
                hidden.append(x)
        return x, (tuple(hidden) if hidden is not None else None), targets


def init_weights(module: nn.Module, std: float = 0.02, truncated: bool = False) -> None:
    """BERT-style init used by data2vec: normal(0, std) linears and embeddings, unit norms.

    ``truncated``: linear weights from a normal truncated at +-2 (absolute, as timm's
    ``trunc_normal_``), the BEiT / data2vec-vision init; BERT (audio, text) uses the plain normal.
    """
    if isinstance(module, nn.Linear):
        if truncated:
            nn.init.trunc_normal_(module.weight, std=std)
        else:
            nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def rescale_residual_branches(stack: "TransformerStack") -> None:
    """BEiT's ``fix_init_weight``: divide the weights that write into the residual stream (attention
    output projection, second FFN linear) of block ``i`` (1-based) by sqrt(2 i), so deeper blocks
    start with smaller updates to the stream."""
    for layer_id, block in enumerate(stack.blocks, start=1):
        scale = math.sqrt(2.0 * layer_id)
        block.attn.proj.weight.div_(scale)
        block.mlp.fc2.weight.div_(scale)
