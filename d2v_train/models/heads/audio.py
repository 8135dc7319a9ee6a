"""Audio heads: CTC, utterance classification, frame classification and x-vector.

Each matches the transformers class named in ``architecture`` (same maths, same config fields,
same defaults) so a fine-tuned transformers checkpoint loads and behaves identically, and ours
exports to it. Inputs are waveforms ``(batch, samples)`` with an optional sample-level padding
mask (True = padding); every pooling and every loss works at frame resolution through the
encoder's frame padding mask. ``mask`` (bool ``(batch, frames)``, True = masked) is passed to the
encoder, which puts its mask embedding there: SpecAugment-style time masking during fine-tuning
is drawn by the caller (the fine-tuning module), not here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import HeadOutput, TaskHead, resolve_settings, sequence_classification_loss


class LayerMix(nn.Module):
    """Softmax-weighted sum of the encoder's hidden states (``use_weighted_layer_sum``).

    The SUPERB recipe: lower layers carry more acoustic detail, so a task learns which to use.
    """

    def __init__(self, num_states: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.full((num_states,), 1.0 / num_states))

    def forward(self, states: tuple[Tensor, ...]) -> Tensor:
        if len(states) != self.weights.numel():
            raise ValueError(f"expected {self.weights.numel()} hidden states to mix, got {len(states)}")
        weights = torch.softmax(self.weights, dim=-1).to(states[0].dtype)
        return (torch.stack(states, dim=0) * weights.view(-1, 1, 1, 1)).sum(dim=0)


class AudioHead(TaskHead):
    """Shared encoder call: last hidden state, or the weighted layer sum, plus the frame padding."""

    modality = "audio"

    def _maybe_layer_mix(self) -> Optional[LayerMix]:
        if not self.settings.get("use_weighted_layer_sum"):
            return None
        return LayerMix(self.encoder.config.num_hidden_layers + 1)

    @classmethod
    def min_frames(cls, settings: Mapping[str, Any]) -> int:
        """Frames a clip must keep after the CNN (and adapter) for this head to run on it alone
        (``settings``: the head's resolved settings)."""
        return 1

    @classmethod
    def min_samples(cls, encoder: nn.Module, overrides: Mapping[str, Any]) -> int:
        """The shortest clip, in samples, that gives ``min_frames`` frames through ``encoder``: the
        fine-tuning data skips shorter clips, so one short clip cannot stop a run mid-epoch."""
        settings = resolve_settings(
            cls.defaults, encoder.config.extra, {k: v for k, v in overrides.items() if k in cls.defaults},
            with_labels=False, where=cls.__name__,
        )  # fmt: skip
        need = cls.min_frames(settings)

        def enough(samples: int) -> bool:
            return int(encoder.output_lengths(torch.tensor([samples]), with_adapter=True)[0]) >= need

        high = 1
        while not enough(high):  # frames grow with samples: double, then bisect
            high *= 2
        low = high // 2  # not enough (or 0)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if enough(mid) else (mid, high)
        return high

    def _reject_adapter(self) -> None:
        if self.encoder.config.add_adapter:
            raise ValueError(
                f"{type(self).__name__} does not support the audio adapter (add_adapter=True), as in transformers"
            )

    def encode(
        self, inputs: Tensor, padding_mask: Optional[Tensor], mask: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor], Optional[tuple[Tensor, ...]]]:
        """(features ``(batch, frames, dim)``, frame padding mask, hidden states or None).

        With a weighted layer sum every block output is needed, so layerdrop must not skip any:
        asking for per-block targets is how the encoder's contract turns layerdrop off.
        """
        mix: Optional[LayerMix] = getattr(self, "layer_mix", None)
        if mix is None:
            out = self.encoder(inputs, padding_mask=padding_mask, mask=mask)
            return out.last_hidden_state, out.padding_mask, None
        out = self.encoder(inputs, padding_mask=padding_mask, mask=mask, layer_targets="block", output_hidden_states=True)
        return mix(out.hidden_states), out.padding_mask, out.hidden_states


def require_frames(count: Tensor, minimum: int, head: str) -> None:
    """Pooling fewer frames than it needs gives NaN (0 / 0, or the spread of one frame), and one
    NaN row poisons the loss of the whole batch; name the rows instead (one host sync a forward)."""
    short = (count < minimum).nonzero().flatten()
    if short.numel():
        raise ValueError(
            f"{head}: batch row(s) {short.tolist()} keep {count[short].clamp(min=0).tolist()} unpadded frame(s) for pooling, "
            f"which needs at least {minimum}; give it longer clips (d2v-finetune skips clips shorter than its head needs)"
        )


def masked_mean(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Mean over time ``(batch, time, dim) -> (batch, dim)`` of the non-padded frames only."""
    if padding_mask is None:
        return x.mean(dim=1)
    keep = (~padding_mask).to(x.dtype)
    return x.masked_fill(padding_mask[..., None], 0.0).sum(dim=1) / keep.sum(dim=1, keepdim=True)


def ctc_loss(
    logits: Tensor, labels: Tensor, lengths: Tensor, blank: int, reduction: str, zero_infinity: bool
) -> Tensor:
    """CTC over ``logits (batch, frames, vocab)``; label padding is -100 or the blank id.

    Computed in fp32 (CTC underflows in half precision) and without cuDNN, whose CTC kernel has
    restrictions (blank 0, int32 lengths) and is non-deterministic.
    """
    keep = (labels != -100) & (labels != blank)
    targets = labels.masked_select(keep)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(
            log_probs, targets, lengths, keep.sum(-1), blank=blank, reduction=reduction, zero_infinity=zero_infinity
        )


class AudioForCTC(AudioHead):
    """Per-frame vocabulary logits trained with CTC (``Data2VecAudioForCTC``); blank = ``pad_token_id``."""

    architecture = "Data2VecAudioForCTC"
    with_labels = False
    defaults = {
        "vocab_size": 32,
        "pad_token_id": 0,
        "final_dropout": 0.1,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": False,
    }

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        config = self.encoder.config
        dim = (config.output_hidden_size or config.hidden_size) if config.add_adapter else config.hidden_size
        self.dropout = nn.Dropout(self.settings["final_dropout"])
        self.out_proj = nn.Linear(dim, int(self.settings["vocab_size"]))
        self.init_head([self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> HeadOutput:
        """``labels (batch, target_length)``: token ids, padded with -100 (or the blank id)."""
        vocab = int(self.settings["vocab_size"])
        if labels is not None and labels.numel() and int(labels.max()) >= vocab:
            raise ValueError(f"CTC label ids must be < vocab_size ({vocab}), got {int(labels.max())}")
        out = self.encoder(inputs, padding_mask=padding_mask, mask=mask)
        logits = self.out_proj(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            frames = logits.shape[1]
            if out.padding_mask is None:
                lengths = torch.full((logits.shape[0],), frames, dtype=torch.long, device=logits.device)
            else:
                lengths = (~out.padding_mask).sum(-1)
            loss = ctc_loss(
                logits,
                labels,
                lengths,
                int(self.settings["pad_token_id"]),
                self.settings["ctc_loss_reduction"],
                bool(self.settings["ctc_zero_infinity"]),
            )
        return HeadOutput(logits=logits, loss=loss, padding_mask=out.padding_mask)


class AudioForSequenceClassification(AudioHead):
    """Utterance classification (``Data2VecAudioForSequenceClassification``): project every frame,
    average the non-padded frames, classify."""

    architecture = "Data2VecAudioForSequenceClassification"
    defaults = {"use_weighted_layer_sum": False, "classifier_proj_size": 256, "problem_type": None}

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self._reject_adapter()
        dim, proj = self.encoder.config.hidden_size, int(self.settings["classifier_proj_size"])
        self.layer_mix = self._maybe_layer_mix()
        self.proj = nn.Linear(dim, proj)
        self.out_proj = nn.Linear(proj, self.num_labels)
        self.init_head([self.proj, self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> HeadOutput:
        x, frame_padding, hidden = self.encode(inputs, padding_mask, mask)
        if frame_padding is not None:
            require_frames((~frame_padding).sum(1), 1, self.architecture)
        logits = self.out_proj(masked_mean(self.proj(x), frame_padding))
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, self.num_labels, self.settings["problem_type"])
        return HeadOutput(logits=logits, loss=loss, hidden_states=hidden)


class AudioForFrameClassification(AudioHead):
    """Per-frame classification (``Data2VecAudioForAudioFrameClassification``), e.g. diarization.

    Labels are either transformers' form, ``(batch, frames, num_labels)`` one-/multi-hot scores
    (their argmax is the class; every frame counts, as in transformers), or class ids
    ``(batch, frames)`` where -100 and padded frames are ignored.
    """

    architecture = "Data2VecAudioForAudioFrameClassification"
    defaults = {"use_weighted_layer_sum": False}

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self._reject_adapter()
        self.layer_mix = self._maybe_layer_mix()
        self.out_proj = nn.Linear(self.encoder.config.hidden_size, self.num_labels)
        self.init_head([self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> HeadOutput:
        x, frame_padding, hidden = self.encode(inputs, padding_mask, mask)
        logits = self.out_proj(x)
        loss = None
        if labels is not None:
            flat = logits.reshape(-1, self.num_labels).float()
            if labels.dim() == logits.dim():
                target = labels.reshape(-1, self.num_labels).argmax(dim=1)
            else:
                target = labels.long()
                if frame_padding is not None:
                    target = target.masked_fill(frame_padding, -100)
                target = target.reshape(-1)
            loss = F.cross_entropy(flat, target, ignore_index=-100)
        return HeadOutput(logits=logits, loss=loss, padding_mask=frame_padding, hidden_states=hidden)


class TDNN(nn.Module):
    """Time-delay layers: dilated 1-D convolutions + ReLU over frames ``(batch, time, dim)``."""

    def __init__(self, in_dim: int, dims: list[int], kernels: list[int], dilations: list[int]) -> None:
        super().__init__()
        if not (len(dims) == len(kernels) == len(dilations)) or not dims:
            raise ValueError(
                f"tdnn_dim, tdnn_kernel and tdnn_dilation must be non-empty and of equal length, got "
                f"{len(dims)}, {len(kernels)} and {len(dilations)}"
            )
        ins = [in_dim] + list(dims[:-1])
        self.layers = nn.ModuleList(
            nn.Conv1d(i, o, k, dilation=d) for i, o, k, d in zip(ins, dims, kernels, dilations)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = F.relu(layer(x))
        return x.transpose(1, 2)


def statistics_pooling(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Mean and (unbiased) standard deviation over the first ``lengths`` frames, concatenated."""
    if lengths is None:
        return torch.cat([x.mean(dim=1), x.std(dim=1)], dim=-1)
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    count = keep.sum(dim=1, keepdim=True).to(x.dtype)
    drop = ~keep[..., None]
    mean = x.masked_fill(drop, 0.0).sum(dim=1) / count
    var = (x - mean[:, None]).masked_fill(drop, 0.0).pow(2).sum(dim=1) / (count - 1)
    return torch.cat([mean, var.sqrt()], dim=-1)


class AMSoftmax(nn.Module):
    """Additive-margin softmax loss: cosine logits, the true class's cosine lowered by ``margin``.

    The margin pulls same-speaker embeddings together on the sphere, which is what speaker
    verification's cosine scoring needs; plain softmax does not enforce it.
    """

    def __init__(self, dim: int, num_labels: int, scale: float = 30.0, margin: float = 0.4) -> None:
        super().__init__()
        self.scale, self.margin, self.num_labels = scale, margin, num_labels
        self.weight = nn.Parameter(torch.randn(dim, num_labels))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        labels = labels.reshape(-1).long()
        cosine = F.normalize(x.float(), dim=1) @ F.normalize(self.weight.float(), dim=0)
        margin = self.margin * F.one_hot(labels, self.num_labels).to(cosine.dtype)
        return F.cross_entropy(self.scale * (cosine - margin), labels)


class AudioForXVector(AudioHead):
    """Speaker embeddings (``Data2VecAudioForXVector``): projector, TDNN stack, statistics pooling,
    embedding layer; the AM-softmax loss is applied to the classifier output as in transformers.

    Pooling lengths follow transformers' formula (frames minus ``kernel - 1`` per TDNN layer, dilation
    not counted), so imported checkpoints pool exactly the frames they were trained on.
    """

    architecture = "Data2VecAudioForXVector"
    defaults = {
        "use_weighted_layer_sum": False,
        "tdnn_dim": [512, 512, 512, 512, 1500],
        "tdnn_kernel": [5, 3, 3, 1, 1],
        "tdnn_dilation": [1, 2, 3, 1, 1],
        "xvector_output_dim": 512,
    }
    am_scale = 30.0
    am_margin = 0.4

    @classmethod
    def min_frames(cls, settings: Mapping[str, Any]) -> int:
        """Each TDNN layer trims ``dilation * (kernel - 1)`` frames; the statistics pooling's unbiased
        standard deviation needs two of what is left."""
        spans = zip(settings["tdnn_kernel"], settings["tdnn_dilation"])
        return 2 + sum(int(d) * (int(k) - 1) for k, d in spans)

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        config = self.encoder.config
        if config.add_adapter and (config.output_hidden_size or config.hidden_size) != config.hidden_size:
            raise ValueError("AudioForXVector needs the adapter (if any) to keep hidden_size (output_hidden_size)")
        dims = [int(d) for d in self.settings["tdnn_dim"]]
        out_dim = int(self.settings["xvector_output_dim"])
        self.layer_mix = self._maybe_layer_mix()
        self.proj = nn.Linear(config.hidden_size, dims[0])
        self.tdnn = TDNN(dims[0], dims, list(self.settings["tdnn_kernel"]), list(self.settings["tdnn_dilation"]))
        self.embed_proj = nn.Linear(2 * dims[-1], out_dim)
        self.out_proj = nn.Linear(out_dim, out_dim)
        self.am_softmax = AMSoftmax(out_dim, self.num_labels, self.am_scale, self.am_margin)
        self.init_head([self.proj, self.tdnn, self.embed_proj, self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> HeadOutput:
        x, frame_padding, hidden = self.encode(inputs, padding_mask, mask)
        x = self.tdnn(self.proj(x))
        lengths = None
        if padding_mask is not None:
            frames = self.encoder.output_lengths((~padding_mask).sum(-1), with_adapter=True)
            lengths = (frames - sum(int(k) - 1 for k in self.settings["tdnn_kernel"])).clamp(max=x.shape[1])
            require_frames(lengths, 2, self.architecture)  # an unbiased std needs two
        embeddings = self.embed_proj(statistics_pooling(x, lengths))
        logits = self.out_proj(embeddings)
        loss = self.am_softmax(logits, labels) if labels is not None else None
        return HeadOutput(logits=logits, loss=loss, embeddings=embeddings, hidden_states=hidden)
