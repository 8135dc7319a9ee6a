"""Text heads: masked LM, causal LM, sequence classification, multiple choice, token
classification and extractive question answering.

Each matches the transformers class named in ``architecture``. Inputs are token ids
``(batch, length)`` (multiple choice: ``(batch, choices, length)``) with an optional padding mask
(True = padding) and token type ids. Token-level losses never count padded positions.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..text import Pooler
from ..transformer import EncoderOutput
from .common import HeadOutput, TaskHead, replace_config, sequence_classification_loss

log = logging.getLogger(__name__)


def _ignore_padding(labels: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Labels with padded positions set to -100, so a collator that forgets cannot train on pads."""
    if padding_mask is None:
        return labels
    return labels.masked_fill(padding_mask, -100)


class TextHead(TaskHead):
    """Shared parts: the pooler the matching transformers class has (or not), dropout defaults."""

    modality = "text"
    needs_pooler: ClassVar[bool] = False

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self._fit_pooler()

    def _fit_pooler(self) -> None:
        """Only multiple choice reads the pooler; the other transformers heads have none, so the
        encoder gets or loses one to keep the state dict exactly that of the transformers class."""
        encoder = self.encoder
        if self.needs_pooler and encoder.pooler is None:
            encoder.pooler = Pooler(encoder.config.hidden_size)
            self.init_head([encoder.pooler])
        elif not self.needs_pooler and encoder.pooler is not None:
            encoder.pooler = None
        if encoder.config.add_pooling_layer != self.needs_pooler:
            replace_config(encoder, add_pooling_layer=self.needs_pooler)

    def classifier_dropout(self) -> float:
        value = self.settings.get("classifier_dropout")
        return float(self.encoder.config.hidden_dropout_prob if value is None else value)

    def encode(self, inputs: Tensor, padding_mask: Optional[Tensor], token_type_ids: Optional[Tensor]) -> EncoderOutput:
        return self.encoder(inputs, padding_mask=padding_mask, token_type_ids=token_type_ids)


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> vocabulary logits.

    The output projection is the token embedding matrix (``tie_word_embeddings``, the default),
    passed in at call time so the weight exists once; untied, it is its own linear layer.
    """

    def __init__(self, dim: int, vocab_size: int, eps: float, tied: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.decoder = None if tied else nn.Linear(dim, vocab_size)
        if not tied:
            # transformers keeps lm_head.bias when untied but never reads it; frozen so optimizers
            # and DDP do not see an unused trainable parameter.
            self.bias.requires_grad_(False)

    def forward(self, x: Tensor, embedding_weight: Tensor) -> Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        if self.decoder is not None:
            return self.decoder(x)
        return F.linear(x, embedding_weight, self.bias)


class _LanguageModel(TextHead):
    with_labels = False
    defaults = {"tie_word_embeddings": True}

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        config = self.encoder.config
        tied = bool(self.settings["tie_word_embeddings"])
        self.lm = LMHead(config.hidden_size, config.vocab_size, config.layer_norm_eps, tied)
        self.init_head([self.lm])

    # causal LM predicts the next token: labels are shifted left by one
    shift_labels = False

    def lm_logits(self, x: Tensor) -> Tensor:
        return self.lm(x, self.encoder.embeddings.token.weight)

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
    ) -> HeadOutput:
        logits = self.lm_logits(self.encode(inputs, padding_mask, token_type_ids).last_hidden_state)
        loss = None
        if labels is not None:
            labels = _ignore_padding(labels, padding_mask)
            if self.shift_labels:
                labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
        return HeadOutput(logits=logits, loss=loss)


class TextForMaskedLM(_LanguageModel):
    """Masked-token prediction (``Data2VecTextForMaskedLM``); labels are -100 except at masked ids."""

    architecture = "Data2VecTextForMaskedLM"

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        if self.encoder.config.is_decoder:
            log.warning("TextForMaskedLM on an encoder with is_decoder=True: attention is causal, not bidirectional")


class TextForCausalLM(_LanguageModel):
    """Next-token prediction (``Data2VecTextForCausalLM``). Attention is causal when the encoder
    config has ``is_decoder=True``; labels are the input ids (shifted here), -100 to skip."""

    architecture = "Data2VecTextForCausalLM"
    shift_labels = True

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        if not self.encoder.config.is_decoder:
            log.warning("TextForCausalLM on an encoder with is_decoder=False: attention is bidirectional; "
                        "set is_decoder=True in the encoder config for a causal language model")


class FirstTokenClassifier(nn.Module):
    """RoBERTa sentence head on the first token (``<s>``): dropout, dense, tanh, dropout, output."""

    def __init__(self, dim: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, num_labels)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.dense(self.dropout(x[:, 0])))
        return self.out_proj(self.dropout(x))


class TextForSequenceClassification(TextHead):
    """Sentence (pair) classification or regression (``Data2VecTextForSequenceClassification``):
    regression when ``num_labels == 1``, cross-entropy for integer labels, multi-label BCE for
    float labels, or as ``problem_type`` says."""

    architecture = "Data2VecTextForSequenceClassification"
    defaults = {"classifier_dropout": None, "problem_type": None}

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self.classifier = FirstTokenClassifier(self.encoder.config.hidden_size, self.num_labels, self.classifier_dropout())
        self.init_head([self.classifier])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
    ) -> HeadOutput:
        logits = self.classifier(self.encode(inputs, padding_mask, token_type_ids).last_hidden_state)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, self.num_labels, self.settings["problem_type"])
        return HeadOutput(logits=logits, loss=loss)


class TextForMultipleChoice(TextHead):
    """One score per (context, choice) pair from the pooled first token, softmax over choices
    (``Data2VecTextForMultipleChoice``). Inputs ``(batch, choices, length)``; labels ``(batch,)``."""

    architecture = "Data2VecTextForMultipleChoice"
    with_labels = False
    needs_pooler = True

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self.dropout = nn.Dropout(self.encoder.config.hidden_dropout_prob)
        self.out_proj = nn.Linear(self.encoder.config.hidden_size, 1)
        self.init_head([self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
    ) -> HeadOutput:
        if inputs.dim() != 3:
            raise ValueError(f"multiple choice expects ids of shape (batch, choices, length), got {tuple(inputs.shape)}")
        batch, choices, length = inputs.shape

        def flat(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.reshape(batch * choices, length)

        pooled = self.encode(flat(inputs), flat(padding_mask), flat(token_type_ids)).pooler_output
        logits = self.out_proj(self.dropout(pooled)).view(batch, choices)
        loss = F.cross_entropy(logits.float(), labels.reshape(-1)) if labels is not None else None
        return HeadOutput(logits=logits, loss=loss)


class TextForTokenClassification(TextHead):
    """Per-token labels, e.g. NER (``Data2VecTextForTokenClassification``); -100 and padding ignored."""

    architecture = "Data2VecTextForTokenClassification"
    defaults = {"classifier_dropout": None}

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        self.dropout = nn.Dropout(self.classifier_dropout())
        self.out_proj = nn.Linear(self.encoder.config.hidden_size, self.num_labels)
        self.init_head([self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
    ) -> HeadOutput:
        x = self.encode(inputs, padding_mask, token_type_ids).last_hidden_state
        logits = self.out_proj(self.dropout(x))
        loss = None
        if labels is not None:
            labels = _ignore_padding(labels, padding_mask)
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.reshape(-1))
        return HeadOutput(logits=logits, loss=loss, padding_mask=padding_mask)


class TextForQuestionAnswering(TextHead):
    """Extractive QA (``Data2VecTextForQuestionAnswering``): start and end logits per token.

    The loss averages start and end cross-entropy; positions outside the input (clamped to the
    length) are ignored, as in transformers. ``labels (batch, 2)`` may stand for
    ``(start_positions, end_positions)`` so the head fits the ``{"inputs", "labels"}`` batch contract.
    """

    architecture = "Data2VecTextForQuestionAnswering"

    def __init__(self, encoder: nn.Module, **overrides: Any) -> None:
        super().__init__(encoder, **overrides)
        if self.num_labels != 2:
            raise ValueError(f"question answering needs num_labels=2 (start, end), got {self.num_labels}")
        self.out_proj = nn.Linear(self.encoder.config.hidden_size, 2)
        self.init_head([self.out_proj])

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        start_positions: Optional[Tensor] = None,
        end_positions: Optional[Tensor] = None,
    ) -> HeadOutput:
        logits = self.out_proj(self.encode(inputs, padding_mask, token_type_ids).last_hidden_state)
        start_logits, end_logits = logits[..., 0].contiguous(), logits[..., 1].contiguous()
        if labels is not None:
            start_positions, end_positions = labels[:, 0], labels[:, 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            length = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, length)
            end = end_positions.reshape(-1).clamp(0, length)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=length)
                + F.cross_entropy(end_logits.float(), end, ignore_index=length)
            ) / 2
        return HeadOutput(logits=logits, loss=loss, start_logits=start_logits, end_logits=end_logits)
