"""The data2vec objective, independent of Lightning: masks, EMA teacher, targets, head and loss."""

from .config import DecoderConfig, EMAConfig, ObjectiveConfig
from .decoder import ConvDecoder, RegressionHead
from .ema import EMASchedule, EMATeacher, ema_decay_at, resolve_schedule
from .loss import all_reduce_sum, global_std, masked_regression_loss, regression_loss, world_size
from .masking import (
    MaskingConfig,
    TokenMaskOutput,
    block_mask_1d,
    block_mask_2d,
    compute_mask,
    exact_count_mask,
    inverse_block_mask_2d,
    mask_tokens,
    random_mask,
    span_mask,
)
from .multimask import clone_targets, d2v2_objective, decoder_input, repeat_clones
from .pooled import add_pooled_loss, pooled_loss, pooled_targets
from .targets import NORMS, batch_norm, build_targets, instance_norm, layer_norm, normalize

__all__ = [
    "ConvDecoder",
    "DecoderConfig",
    "EMAConfig",
    "EMASchedule",
    "EMATeacher",
    "ObjectiveConfig",
    "clone_targets",
    "d2v2_objective",
    "decoder_input",
    "add_pooled_loss",
    "pooled_loss",
    "pooled_targets",
    "repeat_clones",
    "MaskingConfig",
    "NORMS",
    "RegressionHead",
    "TokenMaskOutput",
    "all_reduce_sum",
    "batch_norm",
    "block_mask_1d",
    "block_mask_2d",
    "build_targets",
    "compute_mask",
    "ema_decay_at",
    "exact_count_mask",
    "global_std",
    "instance_norm",
    "inverse_block_mask_2d",
    "layer_norm",
    "mask_tokens",
    "masked_regression_loss",
    "normalize",
    "random_mask",
    "regression_loss",
    "resolve_schedule",
    "span_mask",
    "world_size",
]
