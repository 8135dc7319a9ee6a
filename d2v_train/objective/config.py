"""Schemas of the objective config group (``configs/objective/*.yaml``).

Plain dataclasses: Hydra configs are validated against them (unknown keys and bad types fail with
the key's name), and Python users build them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["DecoderConfig", "EMAConfig", "ObjectiveConfig"]


@dataclass
class EMAConfig:
    """Teacher decay schedule and which student parts are averaged, copied or shared.

    decay -> end_decay linearly over ``anneal_steps`` optimizer updates, then constant.
    anneal_fraction: when set, the ramp spans this fraction of the run's updates instead of
        ``anneal_steps`` (a ramp sized for 400k updates never starts in a 200-update run).
    max_horizon: caps the teacher's averaging horizon 1 / (1 - tau) at this fraction of the run's
        updates. The reference decays (0.999 -> 0.9999) average over 1k-10k updates: right for 400k
        updates, but in a run of a few hundred the teacher would stay its random initialisation and
        the targets random features. Runs of the reference's length are unaffected; null disables.
    copy: parameter-name prefixes copied from the student each update (reference ``skip_keys``).
    share: prefixes whose *outputs* the teacher takes from the student (audio CNN + projection).
    """

    decay: float = 0.999
    end_decay: float = 0.9999
    anneal_steps: int = 30000
    anneal_fraction: Optional[float] = None
    max_horizon: Optional[float] = None
    copy: list[str] = field(default_factory=list)
    share: list[str] = field(default_factory=list)


@dataclass
class DecoderConfig:
    """data2vec 2.0 conv decoder (``objective.decoder``; defaults: audio base).

    dim / kernel / layers / groups: the conv blocks; residual: add each block's input when widths
    match; projection_layers: 1 = Linear(dim, D), 2 = Linear(dim, ratio*dim) -> GELU -> Linear(-> D);
    input_dropout: dropout on the decoder input; mask_noise_std: std of the N(0, std) vectors that
    stand in for the masked tokens; add_positions: fixed sin-cos positions added to the decoder input
    at the masked positions (``masked``), at every position (``all``) or nowhere (``none``, the
    published recipes; the reference's ``add_positions_masked`` / ``add_positions_all``).
    """

    dim: int = 384
    kernel: int = 7
    layers: int = 4
    groups: int = 16
    residual: bool = True
    projection_layers: int = 1
    projection_ratio: float = 2.0
    input_dropout: float = 0.1
    mask_noise_std: float = 0.01
    add_positions: str = "none"


@dataclass
class ObjectiveConfig:
    """One data2vec objective (defaults: v1 audio base, ``configs/objective/d2v1_audio.yaml``).

    layer_targets: ``ffn`` (FFN output before residual; v1 audio/text) or ``block`` (block output; v1 vision).
    top_k: how many top blocks are averaged into the target.
    layer_norm / final_norm: parameter-free norm per layer / of the average
        (``instance``, ``layer``, ``batch``, ``none``).
    loss_beta: 0 = L2, > 0 = smooth L1 with this beta.
    loss_scale: multiplier of the per-position loss; null = 1/sqrt(dim).
    channel_reduction: ``sum`` over channels (fairseq) or ``mean`` (v1 vision / BEiT code).
    head: ``linear`` or ``mlp`` (text recipe: D -> 2D -> D with GELU).
    teacher_input: ``embed`` = the teacher contextualises the student's (unmasked) embeddings
        (audio: shared CNN features); ``raw`` = the teacher embeds the clean input itself.
    min_target_std / min_pred_std / collapse_check_after: stop training when the all-reduced
        per-dimension std of targets / predictions falls below these after that many updates
        (0 disables a check).
    version: 1 = data2vec (the student sees mask tokens, ``head``); 2 = data2vec 2.0: the student
        encodes only the kept tokens of ``clones`` independently masked copies of each sample, the
        teacher runs once per sample, the conv ``decoder`` predicts the masked tokens.
    clones: M, masked copies per sample (2.0).
    decoder: the 2.0 conv decoder.
    cls_loss: weight of the 2.0 image CLS loss (student CLS output vs the image's mean target).
    pooled_loss: weight of this project's sequence-level term (``objective/pooled.py``): a linear head
        on the student's mean-pooled output regresses the teacher's mean target, normalised over the
        batch; 0 (the reference) turns it off. The small text preset uses it.
    pooled_weights: how the pooled term's target averages a sequence's tokens: ``uniform``, or ``idf``
        (text: each token weighted by its inverse document frequency over the run's training text,
        so that the sequence-level target is about its rare, topical words rather than its
        function words).
    """

    layer_targets: str = "ffn"
    top_k: int = 8
    layer_norm: str = "instance"
    final_norm: str = "none"
    loss_beta: float = 0.0
    loss_scale: Optional[float] = None
    channel_reduction: str = "sum"
    head: str = "linear"
    head_hidden_mult: int = 2
    teacher_input: str = "embed"
    ema: EMAConfig = field(default_factory=EMAConfig)
    min_target_std: float = 0.1
    min_pred_std: float = 0.01
    collapse_check_after: int = 5000
    version: int = 1
    clones: int = 1
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    cls_loss: float = 0.0
    pooled_loss: float = 0.0
    pooled_weights: str = "uniform"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ObjectiveConfig":
        values = dict(values)
        ema = values.pop("ema", None)
        decoder = values.pop("decoder", None)
        cfg = cls(**values)
        if ema is not None:
            cfg.ema = ema if isinstance(ema, EMAConfig) else EMAConfig(**dict(ema))
        if decoder is not None:
            cfg.decoder = decoder if isinstance(decoder, DecoderConfig) else DecoderConfig(**dict(decoder))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        choices = {
            "layer_targets": ("ffn", "block"),
            "layer_norm": ("instance", "layer", "batch", "none"),
            "final_norm": ("instance", "layer", "batch", "none"),
            "channel_reduction": ("sum", "mean"),
            "head": ("linear", "mlp"),
            "teacher_input": ("embed", "raw"),
            "pooled_weights": ("uniform", "idf"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(
                    f"bad value for 'objective.{key}': {getattr(self, key)!r}; valid choices: {', '.join(valid)}"
                )
        if self.top_k < 1:
            raise ValueError(f"objective.top_k must be >= 1, got {self.top_k}")
        if self.version not in (1, 2):
            raise ValueError(f"bad value for 'objective.version': {self.version!r}; valid choices: 1, 2")
        if self.clones < 1:
            raise ValueError(f"objective.clones must be >= 1, got {self.clones}")
        if self.version == 1 and (self.clones != 1 or self.cls_loss):
            raise ValueError("objective.clones and objective.cls_loss are data2vec 2.0 options: set objective.version=2")
        if self.pooled_loss < 0:
            raise ValueError(f"objective.pooled_loss is a loss weight and must be >= 0, got {self.pooled_loss}")
        if self.pooled_loss > 0 and (self.final_norm == "instance" or (self.final_norm == "none" and self.layer_norm == "instance")):
            raise ValueError(
                "objective.pooled_loss needs targets whose mean over a sample carries something: instance-normalised "
                "targets (objective.layer_norm=instance with final_norm none, or final_norm=instance) average to 0 "
                "over every sample; use objective.layer_norm=layer or a final_norm of layer or batch, or pooled_loss=0"
            )
        if self.decoder.add_positions not in ("none", "masked", "all"):
            raise ValueError(
                f"objective.decoder.add_positions must be none, masked or all, got {self.decoder.add_positions!r}"
            )
        if self.decoder.layers < 0 or self.decoder.dim < 1 or self.decoder.mask_noise_std < 0:
            raise ValueError("objective.decoder: layers must be >= 0, dim >= 1 and mask_noise_std >= 0")
        if not 0.0 <= self.ema.decay <= 1.0 or not 0.0 <= self.ema.end_decay <= 1.0:
            raise ValueError("objective.ema.decay and end_decay must lie in [0, 1]")
        for key in ("anneal_fraction", "max_horizon"):
            value = getattr(self.ema, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"objective.ema.{key} must lie in (0, 1] (a fraction of the run's updates) or be null, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
