"""Vision heads: image classification and UperNet semantic segmentation.

Each matches the transformers class named in ``architecture``. Inputs are pixels
``(batch, 3, H, W)``; images have no padding.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import HeadOutput, TaskHead, replace_config, sequence_classification_loss


class VisionHead(TaskHead):
    modality = "vision"

    def _fit_pool_norm(self, wanted: bool) -> None:
        """Classification with mean pooling reads the pooling layer norm; segmentation has none.
        The encoder gets or loses it so the state dict is exactly that of the transformers class."""
        encoder = self.encoder
        if wanted and encoder.pool_norm is None:
            encoder.pool_norm = nn.LayerNorm(encoder.config.hidden_size, eps=encoder.config.layer_norm_eps)
        elif not wanted and encoder.pool_norm is not None:
            encoder.pool_norm = None
        if encoder.config.add_pooling_layer != wanted:
            replace_config(encoder, add_pooling_layer=wanted)


class VisionForImageClassification(VisionHead):
    """``Data2VecVisionForImageClassification``: a linear layer on the mean of the patch tokens
    (then a layer norm) when ``use_mean_pooling``, else on the final-normed CLS token.
    ``num_labels == 0`` returns the pooled features as logits."""

    architecture = "Data2VecVisionForImageClassification"
    defaults = {"problem_type": None}

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self._fit_pool_norm(bool(self.encoder.config.use_mean_pooling))
        dim = self.encoder.config.hidden_size
        self.out_proj = nn.Linear(dim, self.num_labels) if self.num_labels > 0 else nn.Identity()
        self.init_head([self.out_proj])

    def forward(self, inputs: Tensor, labels: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None) -> HeadOutput:
        logits = self.out_proj(self.encoder(inputs, padding_mask=padding_mask).pooler_output)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, self.num_labels, self.settings["problem_type"])
        return HeadOutput(logits=logits, loss=loss)


class ConvNormAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> ReLU, the unit every UperNet / FCN layer is made of."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class FeaturePyramid(nn.Module):
    """Turns four same-resolution ViT maps into strides 4, 8, 16, 32 (x4 up, x2 up, same, x2 down).

    A plain ViT has one resolution; UperNet needs a pyramid, so the first map is upsampled twice
    (transposed convs with a BatchNorm + GELU between), the second once, the last max-pooled.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], F.max_pool2d(maps[3], kernel_size=2, stride=2)]


def _resize(x: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperDecoder(nn.Module):
    """UperNet decode head: pyramid pooling (``pool_scales``) on the coarsest map, a top-down FPN,
    all levels resized to the finest and fused, then a 1x1 classifier. Logits come out at the
    finest pyramid level, 4x the patch grid."""

    def __init__(self, dim: int, channels: int, num_labels: int, pool_scales: list[int]) -> None:
        super().__init__()
        self.pool_scales = [int(s) for s in pool_scales]
        self.psp = nn.ModuleList(ConvNormAct(dim, channels) for _ in self.pool_scales)
        self.psp_fuse = ConvNormAct(dim + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral = nn.ModuleList(ConvNormAct(dim, channels) for _ in range(3))
        self.fpn = nn.ModuleList(ConvNormAct(channels, channels, 3, padding=1) for _ in range(3))
        self.fuse = ConvNormAct(4 * channels, channels, 3, padding=1)
        self.out_proj = nn.Conv2d(channels, num_labels, kernel_size=1)

    def pyramid_pooling(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        pooled = [_resize(conv(F.adaptive_avg_pool2d(x, s)), size) for s, conv in zip(self.pool_scales, self.psp)]
        return self.psp_fuse(torch.cat([x, *pooled], dim=1))

    def forward(self, maps: list[Tensor]) -> Tensor:
        levels = [conv(m) for conv, m in zip(self.lateral, maps)] + [self.pyramid_pooling(maps[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down: add each coarser level to the next finer
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[2:])
        outs = [conv(level) for conv, level in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size) for o in outs[1:]]
        return self.out_proj(self.fuse(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """Auxiliary FCN head on pyramid level ``in_index`` (2: stride 16): a few 3x3 conv units, an
    optional concat with its input, a 1x1 classifier. It adds a deep-supervision loss only."""

    def __init__(
        self, dim: int, channels: int, num_labels: int, num_convs: int, concat_input: bool, in_index: int = 2
    ) -> None:
        super().__init__()
        self.in_index = in_index
        ins = [dim] + [channels] * max(num_convs - 1, 0)
        self.convs = nn.ModuleList(ConvNormAct(i, channels, 3, padding=1) for i in ins[:num_convs])
        self.concat = ConvNormAct(dim + channels, channels, 3, padding=1) if concat_input else None
        self.out_proj = nn.Conv2d(channels, num_labels, kernel_size=1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        residual = x = maps[self.in_index]
        for conv in self.convs:
            x = conv(x)
        if self.concat is not None:
            x = self.concat(torch.cat([residual, x], dim=1))
        return self.out_proj(x)


class VisionForSemanticSegmentation(VisionHead):
    """``Data2VecVisionForSemanticSegmentation``: UperNet on four encoder hidden states.

    ``out_indices`` pick hidden states as transformers does: index ``k`` selects ``hidden_states[k - 1]``
    (``hidden_states[0]`` is the embedding output). Logits are ``(batch, num_labels, 4*gh, 4*gw)`` for a
    ``gh x gw`` patch grid; the loss upsamples them to the label size and ignores
    ``semantic_loss_ignore_index``, plus ``auxiliary_loss_weight`` times the auxiliary head's loss.
    """

    architecture = "Data2VecVisionForSemanticSegmentation"
    defaults = {
        "out_indices": [3, 5, 7, 11],
        "pool_scales": [1, 2, 3, 6],
        "use_auxiliary_head": True,
        "auxiliary_loss_weight": 0.4,
        "auxiliary_channels": 256,
        "auxiliary_num_convs": 1,
        "auxiliary_concat_input": False,
        "semantic_loss_ignore_index": 255,
    }

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self._fit_pool_norm(False)
        config, s = self.encoder.config, self.settings
        picked = [i for i in range(config.num_hidden_layers + 1) if i + 1 in set(int(k) for k in s["out_indices"])]
        if len(picked) != 4:
            raise ValueError(
                f"out_indices {s['out_indices']} must pick 4 of the {config.num_hidden_layers + 1} hidden states "
                "(index k selects hidden_states[k-1]; e.g. [3, 5, 7, 11] for a 12-layer encoder)"
            )
        self.picked = picked
        dim = config.hidden_size
        self.pyramid = FeaturePyramid(dim)
        self.decode = UperDecoder(dim, dim, self.num_labels, list(s["pool_scales"]))
        self.aux = None
        if s["use_auxiliary_head"]:
            self.aux = FCNHead(dim, int(s["auxiliary_channels"]), self.num_labels,
                               int(s["auxiliary_num_convs"]), bool(s["auxiliary_concat_input"]))
        self.init_head([m for m in (self.pyramid, self.decode, self.aux) if m is not None])

    def forward(self, inputs: Tensor, labels: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None) -> HeadOutput:
        if labels is not None and self.num_labels == 1:
            raise ValueError("semantic segmentation needs num_labels > 1")
        out = self.encoder(inputs, padding_mask=padding_mask, output_hidden_states=True)
        batch = inputs.shape[0]
        grid = (inputs.shape[2] // self.encoder.patch_size[0], inputs.shape[3] // self.encoder.patch_size[1])
        prefix = self.encoder.num_prefix_tokens
        maps = [out.hidden_states[i][:, prefix:].transpose(1, 2).reshape(batch, -1, *grid) for i in self.picked]
        maps = self.pyramid(maps)
        logits = self.decode(maps)
        aux = self.aux(maps) if self.aux is not None else None
        loss = None
        if labels is not None:
            ignore = int(self.settings["semantic_loss_ignore_index"])
            size = labels.shape[-2:]
            loss = F.cross_entropy(_resize(logits.float(), size), labels.long(), ignore_index=ignore)
            if aux is not None:
                aux_loss = F.cross_entropy(_resize(aux.float(), size), labels.long(), ignore_index=ignore)
                loss = loss + float(self.settings["auxiliary_loss_weight"]) * aux_loss
        return HeadOutput(logits=logits, loss=loss, auxiliary_logits=aux)
