"""What the three encoders share: config handling, the stack they build, the two-stage forward."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .config import EncoderConfig
from .transformer import EncoderOutput, LayerTarget, TransformerStack


class EncoderBase(nn.Module):
    """An encoder is ``embed`` (modality-specific tokens) then ``contextualize`` (masking and the
    shared transformer). The split lets the audio teacher reuse the student's CNN features.

    ``mask`` has two meanings, chosen by ``drop_masked``: False (data2vec v1) replaces masked tokens
    by a learned mask embedding; True (data2vec 2.0) removes them, so the transformer runs on the
    kept tokens only (gathered in order, positions added before; every row must keep the same
    number) and the output carries ``kept_index``."""

    modality: str = ""
    num_prefix_tokens: int = 0

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config

    def transformer_stack(self, **block_kwargs: Any) -> TransformerStack:
        c = self.config
        return TransformerStack(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            act=c.hidden_act,
            layer_norm_eps=c.layer_norm_eps,
            **block_kwargs,
        )

    def embed(self, inputs: Tensor, padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def embed_with_clean(
        self, inputs: Tensor, padding_mask: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(tokens, clean_tokens, padding)``: ``clean_tokens`` are the tokens before any input
        noise ``embed`` adds (what a teacher sharing the embedding reads). Default: ``embed`` adds
        none, so both are the same tensor."""
        tokens, padding = self.embed(inputs, padding_mask)
        return tokens, tokens, padding

    def contextualize(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
        drop_masked: bool = False,
    ) -> EncoderOutput:
        raise NotImplementedError

    def forward(
        self,
        inputs: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        layer_targets: LayerTarget = None,
        output_hidden_states: bool = False,
        drop_masked: bool = False,
        **embed_kwargs: Any,
    ) -> EncoderOutput:
        tokens, token_padding = self.embed(inputs, padding_mask, **embed_kwargs)
        return self.contextualize(
            tokens, token_padding, mask, layer_targets, output_hidden_states, drop_masked=drop_masked
        )
