"""data2vec text encoder: RoBERTa embeddings and post-norm transformer blocks.

The same network as transformers' ``Data2VecTextModel``: positions start after the pad index and
skip padding (fairseq's ``make_positions``), token-type embeddings are added, then a layer norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .config import EncoderConfig
from .base import EncoderBase
from .transformer import EncoderOutput, LayerTarget, attention_mask, init_weights
from .visible import gather_padding, gather_tokens, keep_index


@dataclass
class TextEncoderConfig(EncoderConfig):
    vocab_size: int = 30522
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    is_decoder: bool = False
    add_pooling_layer: bool = True
    position_embedding_type: str = "absolute"

    def validate(self) -> None:
        super().validate()
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r} is not supported; "
                "data2vec text uses 'absolute' (learned) positions"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(
                f"max_position_embeddings ({self.max_position_embeddings}) must exceed pad_token_id + 1 "
                f"({self.pad_token_id + 1}): positions start after the pad index"
            )

    @property
    def max_length(self) -> int:
        """Longest sequence the learned positions cover."""
        return self.max_position_embeddings - self.pad_token_id - 1


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.token = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def positions(self, input_ids: Tensor) -> Tensor:
        """Position ids counting only non-pad tokens, starting at ``pad_token_id + 1``."""
        real = input_ids.ne(self.pad_token_id).long()
        return real.cumsum(1) * real + self.pad_token_id

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        x = self.token(input_ids) + self.position(self.positions(input_ids))
        if token_type_ids is None:
            x = x + self.token_type.weight[0]
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class Pooler(nn.Module):
    """Dense + tanh on the first token (kept for transformers compatibility)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class TextEncoder(EncoderBase):
    """Token ids ``(batch, length)`` -> contextual tokens ``(batch, length, hidden_size)``.

    ``forward`` also takes ``token_type_ids`` (passed on to ``embed``)."""

    modality = "text"

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config)
        self.embeddings = TextEmbeddings(config)
        self.transformer = self.transformer_stack(
            norm_first=False,
            dropout=config.hidden_dropout_prob,
            attn_dropout=config.attention_probs_dropout_prob,
        )
        self.pooler = Pooler(config.hidden_size) if config.add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def embed(
        self, inputs: Tensor, padding_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        self.check_token_ids(inputs)
        return self.embeddings(inputs, token_type_ids), padding_mask

    def check_token_ids(self, inputs: Tensor) -> None:
        """A clear error for ids this encoder cannot read (shape, dtype, length, vocabulary range)."""
        if inputs.ndim != 2 or inputs.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"text encoder expects integer token ids of shape (batch, length), got {inputs.dtype} "
                f"{tuple(inputs.shape)}"
            )
        if inputs.shape[1] > self.config.max_length:
            raise ValueError(
                f"text input has {inputs.shape[1]} tokens; max_position_embeddings="
                f"{self.config.max_position_embeddings} allows at most {self.config.max_length}"
            )
        if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{int(inputs.min())}, {int(inputs.max())}]"
            )

    def contextualize(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
        drop_masked: bool = False,
    ) -> EncoderOutput:
        """``drop_masked`` (data2vec 2.0): only the unmasked embedded tokens (learned positions
        already inside) go through the transformer."""
        kept = None
        if drop_masked:
            if mask is None:
                raise ValueError("drop_masked=True needs a mask")
            kept = keep_index(mask)
            tokens, padding_mask = gather_tokens(tokens, kept), gather_padding(padding_mask, kept)
        elif mask is not None:
            raise ValueError("text is masked at the token-id level: replace ids with <mask> before calling the encoder")
        attn = attention_mask(padding_mask, causal=self.config.is_decoder, length=tokens.shape[1])
        x, hidden, targets = self.transformer(
            tokens, attn, layer_targets=layer_targets, output_hidden_states=output_hidden_states
        )
        pooled = self.pooler(x) if self.pooler is not None else None
        return EncoderOutput(x, hidden, targets, padding_mask, pooled, kept_index=kept)
