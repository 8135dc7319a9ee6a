"""Regression heads that map the student's output at masked positions to the target space.

data2vec v1: a linear layer (audio, vision; "one Linear with bias", fairseq issue 4199) or the text
recipe's 2-layer MLP D -> 2D -> D with GELU (``head_layers: 2``).
data2vec 2.0: ``ConvDecoder``, 1-D over time (audio, text) or 2-D over the patch grid (images).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v_train.models.positions import sincos_1d, sincos_2d
from d2v_train.models.transformer import norm_over_channels

__all__ = ["ConvDecoder", "RegressionHead"]


class RegressionHead(nn.Module):
    """``linear``: Linear(D, D). ``mlp``: Linear(D, mult*D) -> GELU -> Linear(mult*D, D)."""

    def __init__(self, dim: int, kind: str = "linear", hidden_mult: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.kind = kind
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(dim, out_dim)
        elif kind == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(dim, hidden_mult * dim), nn.GELU(), nn.Linear(hidden_mult * dim, out_dim)
            )
        else:
            raise ValueError(f"unknown head {kind!r}; valid: linear, mlp")

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., out_dim)``."""
        return self.proj(x)



# ---------------------------------------------------------------------------------------------
# data2vec 2.0 conv decoder


class _ChannelNorm(nn.Module):
    """Parameter-free layer norm over the channel axis (dim 1) of ``(batch, channels, ...)``."""

    def forward(self, x: Tensor) -> Tensor:
        return norm_over_channels(lambda t: F.layer_norm(t, (t.shape[-1],)), x)


class ConvDecoder(nn.Module):
    """data2vec 2.0 decoder: ``layers`` x [grouped conv ('same' padding) -> layer norm over channels
    without affine -> GELU], a residual around every block whose input and output widths match,
    then a linear projection to the target width (or Linear -> GELU -> Linear with
    ``projection_layers=2``).

    It sees the whole sequence: the student's outputs at kept positions and N(0, std) noise at masked
    ones (see ``multimask.decoder_input``), with no mask token. The published recipes add no
    positions: the convolutions infer where they are from the neighbours, so the student's outputs
    must carry them. ``add_positions`` (``masked`` / ``all``) adds fixed sin-cos positions (1-D, or
    2-D over the patch grid) after the input dropout, so the decoder knows where each masked token
    sits without the student spending its features on it. ``spatial=True`` runs 2-D convs over the
    patch grid.

    Shapes: ``(batch, tokens, in_dim)`` -> ``(batch, tokens, out_dim)``; 2-D takes ``grid=(rows, cols)``;
    ``mask`` ``(batch, tokens)`` (True = masked) is needed with ``add_positions='masked'``.
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: Any, spatial: bool = False) -> None:
        super().__init__()
        dim, kernel, groups = int(cfg.dim), int(cfg.kernel), int(cfg.groups)
        if dim % groups or in_dim % groups:
            raise ValueError(
                f"objective.decoder.groups={groups} must divide decoder.dim={dim} and the encoder width {in_dim}"
            )
        if kernel % 2 == 0:
            raise ValueError(f"objective.decoder.kernel must be odd ('same' padding), got {kernel}")
        conv = nn.Conv2d if spatial else nn.Conv1d
        self.spatial = spatial
        self.residual = bool(cfg.residual)
        self.add_positions = str(cfg.add_positions)
        step = 4 if spatial else 2
        if self.add_positions != "none" and in_dim % step:
            raise ValueError(
                f"objective.decoder.add_positions={self.add_positions!r} needs an encoder width divisible by {step} "
                f"(sin-cos positions), got {in_dim}"
            )
        self.input_dropout = nn.Dropout(float(cfg.input_dropout))
        self.blocks = nn.ModuleList()
        width = in_dim
        for _ in range(int(cfg.layers)):
            self.blocks.append(
                nn.Sequential(conv(width, dim, kernel, padding=kernel // 2, groups=groups), _ChannelNorm(), nn.GELU())
            )
            width = dim
        if int(cfg.projection_layers) == 1:
            self.proj: nn.Module = nn.Linear(width, out_dim)
        elif int(cfg.projection_layers) == 2:
            hidden = int(width * float(cfg.projection_ratio))
            self.proj = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"objective.decoder.projection_layers must be 1 or 2, got {cfg.projection_layers}")

    def positions(self, x: Tensor, grid: tuple[int, int] | None, mask: Tensor | None) -> Tensor:
        """``x`` plus the fixed sin-cos positions where ``add_positions`` asks for them."""
        tokens, dim = x.shape[1], x.shape[2]
        if self.spatial:
            pos = sincos_2d(dim, grid, x.device)  # type: ignore[arg-type]
        else:
            pos = sincos_1d(dim, torch.arange(tokens, device=x.device)).unsqueeze(0)
        pos = pos.to(x.dtype)
        if self.add_positions == "all":
            return x + pos
        if mask is None:
            raise ValueError("objective.decoder.add_positions='masked' needs the mask")
        return x + pos * mask.unsqueeze(-1).to(x.dtype)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, mask: Tensor | None = None) -> Tensor:
        batch, tokens, _ = x.shape
        if self.spatial and (grid is None or grid[0] * grid[1] != tokens):
            raise ValueError(f"the 2-D decoder needs the patch grid of its {tokens} tokens, got {grid}")
        x = self.input_dropout(x)
        if self.add_positions != "none":
            x = self.positions(x, grid, mask)
        x = x.transpose(1, 2)  # (B, C, T)
        if self.spatial:
            x = x.reshape(batch, -1, grid[0], grid[1])  # type: ignore[index]
        for block in self.blocks:
            y = block(x)
            x = x + y if self.residual and y.shape == x.shape else y
        x = x.reshape(batch, x.shape[1], tokens).transpose(1, 2)
        return self.proj(x)
