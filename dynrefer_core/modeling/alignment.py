"""Alignment module: DCNv4 deformable resampling of a context view onto the reference view (spec 3.3).

Each context RoI map X_k (k >= 1) is resampled onto the reference R = X_0 (the t=0 view):

    V      = value_proj(X_k)                                   per-pixel Linear(C -> C)
    F      = offset_conv(concat_ch[X_k, R])                    Conv2d(2C -> C, 3x3, groups=C)
    OM     = offset_mask(F)                                    per-pixel Linear(C -> ceil(27 G / 8) * 8)
    out_g  = sum_k m_k * Bilinear(V_g, p + p_k + Delta p_k)     9 taps per group g, m unnormalised
    Y_k    = output_proj(out)                                  no residual: Y_k replaces X_k

This is the semantics of the CUDA `DCNv4` package used by the release, written with `grid_sample` so
it runs anywhere. Layout of OM per group g (starting at 27 g): (dx_0, dy_0, ..., dx_8, dy_8, m_0..m_8);
tap k has x-offset index k // 3 and y-offset index k % 3. Sample positions are feature-pixel indices
with zero padding outside (grid_sample, align_corners=True).

Initialisation as released: offset_mask weight and bias are zero (so all modulation m is 0 and the
aligned maps start at zero), value/output projections Xavier-uniform with zero bias, offset_conv the
PyTorch default. `modulation_init` (not in the release; DynReferConfig.align_modulation_init) starts
every m at that value instead, e.g. 1/9: a 3x3 mean, so that gradient reaches a ViT trained from scratch.

Quirk kept on purpose: with groups=C over the concatenation, output channel c sees input channels 2c and
2c+1, so the first half of F depends only on X_k and the second half only on R.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = 3
TAPS = KERNEL * KERNEL


class AlignmentModule(nn.Module):
    """Aligns context RoI maps to the reference map. Shapes: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, groups: int = 4, modulation_init: float = 0.0):
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels={channels} is not divisible by groups={groups}")
        self.channels = channels
        self.groups = groups
        self.modulation_init = modulation_init
        self.value_proj = nn.Linear(channels, channels)
        self.offset_conv = nn.Conv2d(2 * channels, channels, KERNEL, padding=KERNEL // 2, groups=channels)
        # DCNv4 pads the offset/mask width to a multiple of 8 for its CUDA kernel; the tail is unused.
        self.offset_mask = nn.Linear(channels, int(math.ceil(groups * TAPS * 3 / 8) * 8))
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if self.modulation_init:
            with torch.no_grad():
                bias = self.offset_mask.bias[: self.groups * TAPS * 3].view(self.groups, TAPS * 3)
                bias[:, 2 * TAPS:] = self.modulation_init
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def offsets_and_modulation(self, context: torch.Tensor, reference: torch.Tensor):
        """OM split into offsets (B, H, W, G, 9, 2) as (dx, dy) and modulation m (B, H, W, G, 9)."""
        b, c, h, w = context.shape
        features = self.offset_conv(torch.cat([context, reference], dim=1))
        om = self.offset_mask(features.permute(0, 2, 3, 1))[..., : self.groups * TAPS * 3]
        om = om.reshape(b, h, w, self.groups, TAPS * 3)
        return om[..., : 2 * TAPS].reshape(b, h, w, self.groups, TAPS, 2), om[..., 2 * TAPS:]

    def forward(self, context: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if context.shape != reference.shape:
            raise ValueError(f"context {tuple(context.shape)} and reference {tuple(reference.shape)} differ")
        b, c, h, w = context.shape
        g, cg = self.groups, c // self.groups
        value = self.value_proj(context.permute(0, 2, 3, 1))  # (B, H, W, C)
        # Sampling runs in fp32 even under bf16 autocast: bf16 positions near 16 are only 1/16 px precise.
        value = value.float().reshape(b, h, w, g, cg).permute(0, 3, 4, 1, 2).reshape(b * g, cg, h, w)
        offsets, modulation = (t.float() for t in self.offsets_and_modulation(context, reference))
        offsets = offsets.permute(0, 3, 1, 2, 4, 5).reshape(b * g, h, w, TAPS, 2)
        modulation = modulation.permute(0, 3, 1, 2, 4).reshape(b * g, 1, h, w, TAPS)

        ys, xs = torch.meshgrid(torch.arange(h, device=context.device, dtype=offsets.dtype),
                                torch.arange(w, device=context.device, dtype=offsets.dtype), indexing="ij")
        # Tap k: x-offset index k // 3 (outer), y-offset index k % 3 (inner), as in DCNv4. All nine taps are
        # sampled by one grid_sample over a (h, w * 9) grid (a loop over taps costs ~10 % of a CPU train step).
        taps = torch.arange(TAPS, device=context.device)
        x = xs[..., None] + (taps // KERNEL - 1).to(offsets.dtype) + offsets[..., 0]  # (B*g, h, w, 9)
        y = ys[..., None] + (taps % KERNEL - 1).to(offsets.dtype) + offsets[..., 1]
        grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
        grid = grid.reshape(b * g, h, w * TAPS, 2)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = (sampled.reshape(b * g, cg, h, w, TAPS) * modulation).sum(-1)
        out = out.reshape(b, g, cg, h, w).permute(0, 3, 4, 1, 2).reshape(b, h, w, c)
        return self.output_proj(out).permute(0, 3, 1, 2)
