"""Multi-view fusion (spec 3.4): per-view token sequences, channel concatenation, the fusion MLP.

Per view k the sequence is [CLS_k ; flatten(Y_k)] (Y_0 = X_0, the reference itself), 1 + G*G tokens,
row-major. Views are concatenated along channels token by token in the order [t=0, selected...], so the
MLP's first layer is Linear(n*C -> C): the released checkpoint is tied to n = 3.

With `position_embedding=True` (not in the release; see `DynReferConfig.fusion_position_embedding`) a learned
table P (1 + G*G, C), started as 2-D sin-cos, is added to the fused tokens so that the Q-Former knows where
each RoI token lies.
"""
from __future__ import annotations

import torch
from torch import nn

from .vision import sincos_position_embedding


class ViewFusion(nn.Module):
    """(N, n, C) CLS tokens + (N, n, C, G, G) RoI maps -> fused tokens (N, 1 + G*G, C)."""

    def __init__(self, channels: int, n_views: int, grid: int | None = None, position_embedding: bool = False):
        super().__init__()
        self.n_views = n_views
        self.mlp = nn.Sequential(nn.Linear(n_views * channels, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.position_embedding = None
        if position_embedding:
            if grid is None:
                raise ValueError("a fusion position table needs the RoI grid size")
            self.position_embedding = nn.Parameter(sincos_position_embedding(grid, channels))

    def forward(self, cls: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        n, v, c = cls.shape
        if v != self.n_views:
            raise ValueError(f"got {v} views per region; this model was built for n_views={self.n_views}")
        spatial = maps.flatten(3).transpose(2, 3)  # (N, n, G*G, C)
        tokens = torch.cat([cls[:, :, None], spatial], dim=2)  # (N, n, 1+G*G, C)
        tokens = tokens.permute(0, 2, 1, 3).reshape(n, tokens.shape[2], v * c)  # channel concat
        fused = self.mlp(tokens)
        if self.position_embedding is not None:
            if fused.shape[1] != self.position_embedding.shape[0]:
                raise ValueError(f"{fused.shape[1]} tokens per region; the position table has "
                                 f"{self.position_embedding.shape[0]}")
            fused = fused + self.position_embedding.to(fused.dtype)
        return fused
