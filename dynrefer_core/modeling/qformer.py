"""Q-Former visual resampler (spec 3.5): learned queries cross-attend to the fused view tokens.

transformers' `Blip2QFormerModel` (BERT-style; cross-attention every `cross_attention_freq` layers;
query path only, as BLIP-2-T5 keeps it). Its output z = x_v (N, num_query_tokens, hidden) is the region
representation shared by all three decoders. The release keeps `query_tokens` frozen at their BLIP-2
values (the trainable-name filter misses them); `freeze_query_tokens` reproduces that.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..config import DynReferConfig


def qformer_config(config: DynReferConfig) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=config.qformer_hidden,
        num_hidden_layers=config.qformer_layers,
        num_attention_heads=config.qformer_heads,
        intermediate_size=config.qformer_intermediate,
        cross_attention_frequency=config.cross_attention_freq,
        encoder_hidden_size=config.vision_width,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        use_qformer_text_input=False,
    )


class QFormer(nn.Module):
    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_hidden))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.model = Blip2QFormerModel(qformer_config(config))

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, C_vision) fused tokens -> z (N, num_query_tokens, hidden); all-ones attention mask."""
        queries = self.query_tokens.expand(visual_tokens.shape[0], -1, -1)
        return self.model(query_embeds=queries, encoder_hidden_states=visual_tokens).last_hidden_state
