"""data2vec vision encoder: BEiT-style ViT (pre-norm, layer scale, relative position bias).

The same network as transformers' ``Data2VecVisionModel``: patch embedding, CLS token, optional
mask token, absolute position embeddings or relative position bias (per layer or shared),
a final layer norm or mean pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .base import EncoderBase
from .transformer import (
    EncoderOutput,
    LayerTarget,
    RelativePositionBias,
    attention_mask,
    init_weights,
    rescale_residual_branches,
)
from .positions import sincos_2d
from .visible import gather_tokens, keep_index


def _pair(value: Union[int, list, tuple]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass
class VisionEncoderConfig(EncoderConfig):
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    image_size: Union[int, list[int]] = 224
    patch_size: Union[int, list[int]] = 16
    num_channels: int = 3
    use_mask_token: bool = False
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = False
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.1
    use_mean_pooling: bool = True
    add_pooling_layer: bool = False
    # data2vec 2.0 images (not transformers fields): fixed 2-D sin-cos positions added to the patches,
    # and post-norm blocks (``norm_first: false``, with a layer norm on the embedded tokens first)
    use_sincos_position_embeddings: bool = False
    norm_first: bool = True

    def validate(self) -> None:
        super().validate()
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(f"image_size {image} must be a multiple of patch_size {patch}")
        if self.use_sincos_position_embeddings and self.use_absolute_position_embeddings:
            raise ValueError("use_sincos_position_embeddings and use_absolute_position_embeddings exclude each other")

    @property
    def grid_size(self) -> tuple[int, int]:
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        return image[0] // patch[0], image[1] // patch[1]


class PatchEmbed(nn.Module):
    """Pixels ``(batch, channels, H, W)`` -> patch tokens ``(batch, patches, dim)`` and the grid."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        patch = _pair(config.patch_size)
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch, stride=patch)

    def forward(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if pixels.ndim != 4 or pixels.shape[1] != self.num_channels:
            raise ValueError(
                f"vision encoder expects pixels of shape (batch, {self.num_channels}, H, W), got {tuple(pixels.shape)}"
            )
        x = self.proj(pixels.to(self.proj.weight.dtype))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class VisionEncoder(EncoderBase):
    """Pixels ``(batch, 3, H, W)`` -> ``(batch, 1 + patches, hidden_size)`` with CLS first."""

    modality = "vision"
    num_prefix_tokens = 1

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__(config)
        dim = config.hidden_size
        grid = config.grid_size
        self.patch_size = _pair(config.patch_size)
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_mask_token else None
        if config.use_absolute_position_embeddings:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, dim))
        else:
            self.pos_embed = None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.rel_pos_bias = (
            RelativePositionBias(grid, config.num_attention_heads) if config.use_shared_relative_position_bias else None
        )
        self.transformer = self.transformer_stack(
            drop_path_rate=config.drop_path_rate,
            dropout=config.hidden_dropout_prob,
            attn_dropout=config.attention_probs_dropout_prob,
            layer_scale_init=config.layer_scale_init_value,
            qkv_bias="qv",
            rel_pos_window=grid if config.use_relative_position_bias else None,
            norm_first=config.norm_first,
        )
        # post-norm stacks normalise their input (the blocks only normalise after each residual)
        self.embed_norm = None if config.norm_first else nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm = None if config.use_mean_pooling else nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if config.add_pooling_layer and config.use_mean_pooling:
            self.pool_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        else:
            self.pool_norm = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """data2vec-vision / BEiT init: truncated normal (std ``initializer_range``) linears, then
        the per-block rescale of the residual-branch outputs by 1/sqrt(2 * block).

        With the 2.0 image embedding (fixed sin-cos positions) the CLS token is drawn from N(0, 1)
        as data2vec 2.0 draws its extra token (``init_extra_token_zero: false`` in its image configs),
        not at ``initializer_range``: behind the post-norm stack's input layer norm the scale mostly
        sets how fast Adam turns the token (a step of size lr is 50x smaller relative to a std-1 token
        than to a std-0.02 one)."""
        self.apply(lambda m: init_weights(m, self.config.initializer_range, truncated=True))
        rescale_residual_branches(self.transformer)
        for param in (self.cls_token, self.mask_token, self.pos_embed):
            if param is not None:
                nn.init.trunc_normal_(param, std=self.config.initializer_range)
        if self.config.use_sincos_position_embeddings:
            nn.init.normal_(self.cls_token, std=1.0)

    def interpolated_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Absolute positions for another grid size: patch positions resized bicubically."""
        num_patches = self.pos_embed.shape[1] - 1
        if grid[0] * grid[1] == num_patches and grid[0] == grid[1]:
            return self.pos_embed
        side = int(num_patches**0.5)
        dim = self.pos_embed.shape[-1]
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def embed(self, inputs: Tensor, padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Patch projection only; masking, CLS and positions are added in ``contextualize``."""
        if padding_mask is not None:
            raise ValueError("images have no padding: pass padding_mask=None to the vision encoder")
        tokens, _ = self.patch_embed(inputs)
        return tokens, None

    def infer_grid(self, num_patches: int) -> tuple[int, int]:
        """The patch grid behind ``num_patches`` tokens: the configured one, else a square."""
        grid = self.config.grid_size
        if grid[0] * grid[1] == num_patches:
            return grid
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise ValueError(f"cannot tell the patch grid of {num_patches} tokens: pass grid=(rows, cols)")
        return side, side

    def contextualize(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
        grid: Optional[tuple[int, int]] = None,
        drop_masked: bool = False,
    ) -> EncoderOutput:
        """``drop_masked`` (data2vec 2.0): positions are added to the patches, the masked ones are
        removed, CLS goes in front of the kept ones; needs absolute or sin-cos positions (a relative
        position bias is defined on the full grid)."""
        batch, num_patches, _ = tokens.shape
        grid = tuple(grid) if grid else self.infer_grid(num_patches)
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"{num_patches} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        if drop_masked:
            return self._contextualize_kept(tokens, mask, grid, layer_targets, output_hidden_states)
        x = tokens
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this vision encoder has no mask token: set use_mask_token=True to mask patches")
            if mask.shape != (batch, num_patches):
                raise ValueError(f"mask must have shape {(batch, num_patches)} (one entry per patch), got {tuple(mask.shape)}")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.interpolated_pos_embed(grid)
        if self.config.use_sincos_position_embeddings:
            x = torch.cat([x[:, :1], x[:, 1:] + sincos_2d(x.shape[-1], grid, x.device).to(x.dtype)], dim=1)
        return self._run_stack(x, grid, layer_targets, output_hidden_states)

    def _contextualize_kept(
        self,
        tokens: Tensor,
        mask: Optional[Tensor],
        grid: tuple[int, int],
        layer_targets: LayerTarget,
        output_hidden_states: bool,
    ) -> EncoderOutput:
        if mask is None:
            raise ValueError("drop_masked=True needs a mask")
        if self.config.use_relative_position_bias or self.rel_pos_bias is not None:
            raise ValueError(
                "encoding only the kept patches needs absolute or sin-cos positions: set "
                "use_relative_position_bias=false and use_shared_relative_position_bias=false"
            )
        x = tokens
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        if self.pos_embed is not None:
            pos = self.interpolated_pos_embed(grid).to(x.dtype)
            x, cls = x + pos[:, 1:], cls + pos[:, :1]
        if self.config.use_sincos_position_embeddings:
            x = x + sincos_2d(x.shape[-1], grid, x.device).to(x.dtype)
        kept = keep_index(mask)
        x = torch.cat([cls, gather_tokens(x, kept)], dim=1)
        out = self._run_stack(x, None, layer_targets, output_hidden_states)
        out.kept_index = kept
        return out

    def _run_stack(
        self, x: Tensor, grid: Optional[tuple[int, int]], layer_targets: LayerTarget, output_hidden_states: bool
    ) -> EncoderOutput:
        """Input norm (post-norm stacks), dropout, the blocks, the final norm or pooling."""
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        bias = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        attn = attention_mask(None, bias=bias, dtype=x.dtype)
        x, hidden, targets = self.transformer(
            x, attn, window=grid, layer_targets=layer_targets, output_hidden_states=output_hidden_states
        )
        pooled = None
        if self.norm is not None:
            x = self.norm(x)
            pooled = x[:, 0]  # transformers' pooler without mean pooling: the normed CLS output
        elif self.pool_norm is not None:
            pooled = self.pool_norm(x[:, 1:].mean(1))
        return EncoderOutput(x, hidden, targets, None, pooled)

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
        drop_masked: bool = False,
    ) -> EncoderOutput:
        """Like ``EncoderBase.forward``, passing the input's patch grid on (any image size works)."""
        tokens, _ = self.embed(inputs, padding_mask)
        grid = (inputs.shape[-2] // self.patch_size[0], inputs.shape[-1] // self.patch_size[1])
        return self.contextualize(
            tokens, None, mask, layer_targets, output_hidden_states, grid=grid, drop_masked=drop_masked
        )
