"""The tag decoder D_tag and the region-text contrastive decoder D_rtc (spec 4.1-4.2).

Both are RAM-style query heads: a stack of cross-attention-only BERT layers (no embeddings, no
self-attention, no positions) in which the projected text embeddings are the queries and the region's
Q-Former tokens z are the keys and values. Layer = cross-attention -> dense -> dropout -> residual
LayerNorm -> FFN (GELU) -> dropout -> residual LayerNorm; built from transformers' BERT blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from ..config import DynReferConfig


def head_config(config: DynReferConfig) -> BertConfig:
    bert = BertConfig(
        hidden_size=config.head_hidden,
        num_attention_heads=config.head_heads,
        intermediate_size=config.head_intermediate,
        hidden_act="gelu",
        hidden_dropout_prob=config.head_dropout,
        attention_probs_dropout_prob=config.head_dropout,
        layer_norm_eps=1e-12,
    )
    bert._attn_implementation = "sdpa"
    return bert


class CrossAttentionLayer(nn.Module):
    """One BERT layer in the release's 'tagging' mode (cross-attention + FFN)."""

    def __init__(self, bert: BertConfig):
        super().__init__()
        self.crossattention = BertAttention(bert, is_cross_attention=True)
        self.intermediate = BertIntermediate(bert)
        self.output = BertOutput(bert)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        attended = self.crossattention(queries, encoder_hidden_states=memory)[0]
        return self.output(self.intermediate(attended), attended)


class CrossAttentionHead(nn.Module):
    """queries (N, Q, D) attend to memory (N, M, D) through `head_layers` layers -> (N, Q, D)."""

    def __init__(self, config: DynReferConfig):
        super().__init__()
        bert = head_config(config)
        self.layer = nn.ModuleList(CrossAttentionLayer(bert) for _ in range(config.head_layers))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            queries = layer(queries, memory)
        return queries


class TagDecoder(nn.Module):
    """D_tag: logits (N, V) for V tag embeddings (V, D_text) given z (N, Q, D_qformer)."""

    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.vision_proj = nn.Linear(config.qformer_hidden, config.head_hidden)
        self.text_proj = nn.Linear(config.text_embed_dim, config.head_hidden)
        self.head = CrossAttentionHead(config)
        self.fc = nn.Linear(config.head_hidden, 1)

    def forward(self, z: torch.Tensor, tag_embeds: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attend(z, tag_embeds)).squeeze(-1)

    def attend(self, z: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Text embeddings as queries over the region tokens z: (N, T, head_hidden)."""
        memory = self.vision_proj(z)
        queries = self.text_proj(text_embeds.to(memory.dtype))[None].expand(z.shape[0], -1, -1)
        return self.head(queries, memory)


class RegionTextDecoder(TagDecoder):
    """D_rtc: matching score s (N, T) of each region with each text, s = fc(L2norm(h)).

    Training logits are s * exp(t) + b with learned scalars t (init ln 10) and b (init -10), as in
    SigLIP. `calibrated(s)` applies them.
    """

    def __init__(self, config: DynReferConfig):
        super().__init__(config)  # the same layers as D_tag (the release's attr_* mirror tag_*)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, z: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.fc(F.normalize(self.attend(z, text_embeds), dim=-1)).squeeze(-1)

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.logit_scale.exp() + self.logit_bias
