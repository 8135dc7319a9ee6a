"""data2vec audio encoder: conv feature extractor, feature projection, conv positions, transformer.

Numerically the same network as transformers' ``Data2VecAudioModel`` (post-norm wav2vec 2.0
blocks, a layer norm in every conv layer, a stack of grouped positional convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .base import EncoderBase
from .transformer import EncoderOutput, LayerTarget, activation, attention_mask, init_weights, norm_over_channels
from .positions import alibi_bias, alibi_slopes
from .visible import gather_padding, gather_tokens, keep_index


@dataclass
class AudioEncoderConfig(EncoderConfig):
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.1
    feat_extract_activation: str = "gelu"
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_bias: bool = False
    num_conv_pos_embedding_groups: int = 16
    conv_pos_kernel_size: int = 19
    num_conv_pos_embeddings: int = 5
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: Optional[int] = None
    # data2vec 2.0 audio: ALiBi attention biases with a learned per-head scale, on top of the conv
    # positions (no transformers equivalent: such an encoder exports to safetensors only)
    use_alibi: bool = False
    # Padded frames are zeroed before the positional convolutions (v1 and transformers). fairseq's
    # data2vec 2.0 encoder leaves them as the CNN made them (attention still ignores them), which
    # changes the real frames next to the padding; imported 2.0 checkpoints set this to False.
    pos_conv_zero_padding: bool = True
    # Input waveforms are normalised per utterance (zero mean, unit variance) by the data
    # pipeline; recorded here so fine-tuning and export use the same convention.
    do_normalize: bool = True

    def validate(self) -> None:
        super().validate()
        lengths = {len(self.conv_dim), len(self.conv_stride), len(self.conv_kernel)}
        if len(lengths) != 1 or not self.conv_dim:
            raise ValueError(
                "conv_dim, conv_stride and conv_kernel must be non-empty lists of the same length, got "
                f"{len(self.conv_dim)}, {len(self.conv_stride)} and {len(self.conv_kernel)}"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_conv_pos_embedding_groups "
                f"({self.num_conv_pos_embedding_groups})"
            )

    @property
    def receptive_field(self) -> int:
        """Samples the CNN needs for one output frame (400 for the default stack)."""
        field_, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field_ += (kernel - 1) * jump
            jump *= stride
        return field_


class ConvLayer(nn.Module):
    """Conv1d -> LayerNorm over channels -> activation (data2vec's ``layer_norm`` extractor mode)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm = nn.LayerNorm(out_dim)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(norm_over_channels(self.norm, self.conv(x)))


class ConvFeatureExtractor(nn.Module):
    """Waveform ``(batch, samples)`` -> features ``(batch, channels, frames)``."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        dims = [1] + list(config.conv_dim)
        self.layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], k, s, config.conv_bias, config.feat_extract_activation)
            for i, (k, s) in enumerate(zip(config.conv_kernel, config.conv_stride))
        )

    def forward(self, waveform: Tensor) -> Tensor:
        x = waveform[:, None]
        for layer in self.layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, x: Tensor, dropout: bool = True) -> Tensor:
        """LayerNorm -> Linear, then ``feat_proj_dropout`` unless ``dropout=False`` (what the
        data2vec teacher reads: the projected features *before* the input dropout)."""
        x = self.proj(self.norm(x))
        return self.dropout(x) if dropout else x


class PosConvLayer(nn.Module):
    """Grouped conv ('same' length) -> parameter-free LayerNorm -> activation."""

    def __init__(self, dim: int, kernel: int, groups: int, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.trim:
            x = x[:, :, : -self.trim]
        return self.act(norm_over_channels(self.norm, x))


class ConvPositionalEmbedding(nn.Module):
    """``num_conv_pos_embeddings`` stacked positional convolutions; (batch, time, dim) in and out."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            PosConvLayer(
                config.hidden_size,
                config.conv_pos_kernel_size,
                config.num_conv_pos_embedding_groups,
                config.feat_extract_activation,
            )
            for _ in range(config.num_conv_pos_embeddings)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


class Adapter(nn.Module):
    """Optional strided conv + GLU stack on top of the encoder (transformers' ``add_adapter``)."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        out_dim = config.output_hidden_size or config.hidden_size
        if out_dim != config.hidden_size:
            self.proj = nn.Linear(config.hidden_size, out_dim)
            self.proj_norm = nn.LayerNorm(out_dim)
        else:
            self.proj = self.proj_norm = None
        self.layers = nn.ModuleList(
            nn.Conv1d(out_dim, 2 * out_dim, config.adapter_kernel_size, stride=config.adapter_stride, padding=1)
            for _ in range(config.num_adapter_layers)
        )
        self.layerdrop = config.layerdrop

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj_norm(self.proj(x))
        x = x.transpose(1, 2)
        keep = [True] * len(self.layers)
        if self.training and self.layerdrop > 0:
            keep = (torch.rand(len(self.layers)) > self.layerdrop).tolist()
        for layer, kept in zip(self.layers, keep):
            if kept:
                x = F.glu(layer(x), dim=1)
        return x.transpose(1, 2)


class AudioEncoder(EncoderBase):
    """Raw waveform ``(batch, samples)`` -> contextual frames ``(batch, frames, hidden_size)``."""

    modality = "audio"

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__(config)
        self.feature_extractor = ConvFeatureExtractor(config)
        self.feature_projection = FeatureProjection(config)
        if config.mask_time_prob > 0 or config.mask_feature_prob > 0:
            self.mask_embedding = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        else:
            self.mask_embedding = None
        self.pos_conv = ConvPositionalEmbedding(config)
        if config.use_alibi:
            self.alibi_scale = nn.Parameter(torch.ones(config.num_attention_heads))
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        else:
            self.alibi_scale = None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.transformer = self.transformer_stack(
            layerdrop=config.layerdrop,
            norm_first=False,
            dropout=config.hidden_dropout,
            attn_dropout=config.attention_dropout,
            activation_dropout=config.activation_dropout,
        )
        self.adapter = Adapter(config) if config.add_adapter else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        self.transformer.apply(lambda m: init_weights(m, std))
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        bound = 1 / math.sqrt(self.feature_projection.proj.in_features)
        nn.init.uniform_(self.feature_projection.proj.weight, -bound, bound)
        nn.init.uniform_(self.feature_projection.proj.bias, -bound, bound)

    def output_lengths(self, lengths: Tensor, with_adapter: bool = False) -> Tensor:
        """Frames the CNN produces for ``lengths`` samples (the conv length formula, per layer)."""
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        if with_adapter and self.adapter is not None:
            lengths = self.adapter_lengths(lengths)
        return lengths

    def adapter_lengths(self, frames: Tensor) -> Tensor:
        """Frames left after the adapter's strided convs (transformers' formula)."""
        for _ in range(self.config.num_adapter_layers):
            frames = torch.div(frames - 1, self.config.adapter_stride, rounding_mode="floor") + 1
        return frames

    def frame_padding_mask(self, padding_mask: Tensor, num_frames: int, with_adapter: bool = False) -> Tensor:
        """Sample-level padding mask ``(batch, samples)`` -> frame-level ``(batch, frames)``."""
        lengths = self.output_lengths((~padding_mask).sum(-1), with_adapter)
        return torch.arange(num_frames, device=padding_mask.device)[None, :] >= lengths[:, None]

    def embed(self, inputs: Tensor, padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """CNN + feature projection. Returns frames ``(batch, frames, dim)`` and their padding mask."""
        tokens, _, frame_padding = self.embed_with_clean(inputs, padding_mask)
        return tokens, frame_padding

    def embed_with_clean(
        self, inputs: Tensor, padding_mask: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Like ``embed``, also returning the projected features before ``feat_proj_dropout``: the
        reference teacher reads those (fairseq ``pre_encoder_features``, cloned before
        ``dropout_input``), the student the dropped-out ones."""
        if inputs.ndim != 2:
            raise ValueError(f"audio encoder expects a waveform of shape (batch, samples), got {tuple(inputs.shape)}")
        if inputs.shape[1] < self.config.receptive_field:
            raise ValueError(
                f"audio input has {inputs.shape[1]} samples, fewer than the CNN's receptive field "
                f"({self.config.receptive_field} samples)"
            )
        features = self.feature_extractor(inputs).transpose(1, 2)
        frame_padding = None
        if padding_mask is not None:
            frame_padding = self.frame_padding_mask(padding_mask, features.shape[1])
        clean = self.feature_projection(features, dropout=False)
        return self.feature_projection.dropout(clean), clean, frame_padding

    def contextualize(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
        drop_masked: bool = False,
    ) -> EncoderOutput:
        """Masked frames take the learned mask embedding; padded frames are zeroed before the
        positional convolutions, as transformers does (not with ``pos_conv_zero_padding=False``,
        fairseq 2.0's way). With one conv that keeps padding out of the real frames; stacked convs see non-zero padded frames after the first (kept for parity), so
        the reference batches crop to the shortest clip rather than pad.

        ``drop_masked`` (data2vec 2.0): masked frames are zeroed, the positional convs run over the
        whole zero-filled sequence, then only the kept frames (plus their conv positions) go through
        the transformer; ALiBi biases use the kept frames' original positions."""
        x = tokens
        kept = None
        if drop_masked:
            if mask is None:
                raise ValueError("drop_masked=True needs a mask")
            x = x.masked_fill(mask[..., None], 0.0)
        elif mask is not None:
            if self.mask_embedding is None:
                raise ValueError("this audio encoder has no mask embedding (mask_time_prob and mask_feature_prob are 0)")
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        if padding_mask is not None and self.config.pos_conv_zero_padding:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        if drop_masked:
            kept = keep_index(mask)
            x, padding_mask = gather_tokens(x, kept), gather_padding(padding_mask, kept)
        x = self.dropout(self.norm(x))
        bias = None
        if self.alibi_scale is not None:
            positions = kept if kept is not None else torch.arange(x.shape[1], device=x.device)
            bias = alibi_bias(positions, self.alibi_slopes, self.alibi_scale)
        attn = attention_mask(padding_mask, bias=bias, dtype=x.dtype)
        x, hidden, targets = self.transformer(
            x, attn, layer_targets=layer_targets, output_hidden_states=output_hidden_states
        )
        if self.adapter is not None:
            x = self.adapter(x)
            if padding_mask is not None:
                lengths = self.adapter_lengths((~padding_mask).sum(-1))
                padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
        return EncoderOutput(x, hidden, targets, padding_mask, kept_index=kept)
