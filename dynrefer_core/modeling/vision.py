"""Vision backbone + RoI-Align (spec 3.1-3.2).

All N*n view images go through the ViT as one batch, region-major and view-minor ("(s v)" order).
The ViT is transformers' `Blip2VisionModel`: EVA ViT-g/14 with 39 blocks for the official preset; its
`post_layernorm` plays the role of BLIP-2's `ln_vision`. RoI-Align is torchvision's, with the release's
flags (output G = S/P, scale 1/P, sampling 2, aligned=False) so that the released weights see the same
features.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import RoIAlign
from transformers import Blip2VisionConfig, Blip2VisionModel

from ..config import DynReferConfig


def vision_config(config: DynReferConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=config.vision_width,
        intermediate_size=config.vision_intermediate,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act="gelu",
        layer_norm_eps=config.vision_layer_norm_eps,
        qkv_bias=True,
        attention_dropout=0.0,
    )


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """(1 + grid*grid, dim) fixed 2-D sine-cosine position table (MAE style), zeros for the CLS slot."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for a 2-D sin-cos position table")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class ConvStem(nn.Module):
    """A convolutional patch embedding: the same (B, C, G, G) token grid as the linear P x P one.

    P/2-px sub-patches (a linear embedding to C/2 channels), a 3 x 3 convolution over them, then each 2 x 2
    block merged into one token, which thus sees its P x P patch and P/2 px around it (Xiao et al. 2021,
    "Early convolutions help transformers see better").
    A linear P x P embedding cannot tell shapes apart inside one patch, and a neighbour in the context views
    the pHASH rule picks is one to three 14-px patches wide (DynRefer-mini: README). There it costs 5 % more
    time per training step.
    """

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        half = patch_size // 2
        self.layers = nn.Sequential(
            nn.Conv2d(3, width // 2, kernel_size=half, stride=half), nn.GELU(),
            nn.Conv2d(width // 2, width, kernel_size=3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, kernel_size=2, stride=2),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The last layer's weight: `Blip2VisionEmbeddings` reads the stem's dtype from `.weight`."""
        return self.layers[-1].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


class VisionEncoder(nn.Module):
    """Pixels of every view -> (CLS_k, RoI map X_k) per view.

    Input `pixel_values (B, 3, S, S)` and `boxes (B, 4)` (the region box in each view's S-pixel
    coordinates). Output `cls (B, C)` and `rois (B, C, G, G)`.
    """

    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.grid = config.grid_size
        self.vit = Blip2VisionModel(vision_config(config))
        # Blip2VisionModel gives its post_layernorm the blocks' eps; LAVIS's ln_vision has its own (1e-5).
        self.vit.post_layernorm.eps = config.vision_post_layernorm_eps
        if config.vision_stem == "conv":
            self.vit.embeddings.patch_embedding = ConvStem(config.vision_width, config.patch_size)
        self.roi_align = RoIAlign(output_size=self.grid, spatial_scale=1.0 / config.patch_size,
                                  sampling_ratio=2, aligned=False)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT tokens after `ln_vision`: (B, 1 + G*G, C)."""
        dtype = self.vit.embeddings.patch_embedding.weight.dtype
        return self.vit(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def token_grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS tokens (B, C) and the spatial tokens as a (B, C, G, G) map, both fp32 (the release casts ViT
        features to fp32 before RoI-Align and fusion, predict_answers)."""
        tokens = self.tokens(pixel_values)
        b, length, c = tokens.shape
        if length != 1 + self.grid * self.grid:
            raise ValueError(f"ViT gave {length} tokens, expected 1 + {self.grid}^2 for this image size")
        grid = tokens[:, 1:].transpose(1, 2).reshape(b, c, self.grid, self.grid)
        return tokens[:, 0].float(), grid.float()

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor,
                return_grid: bool = False) -> tuple[torch.Tensor, ...]:
        """(cls, RoI maps), plus the token map when `return_grid` (training probes RoI-align it elsewhere)."""
        cls, grid = self.token_grid(pixel_values)
        # One RoI per view image, indexed by its own batch position.
        boxes = boxes.float()
        index = torch.arange(grid.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None]
        rois = self.roi_align(grid, torch.cat([index, boxes], dim=1).float())
        return (cls, rois, grid) if return_grid else (cls, rois)
