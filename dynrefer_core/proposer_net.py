"""The class-agnostic box proposer's network: a small residual conv trunk, an FPN and torchvision's FCOS head.

Why FCOS: it is anchor-free (one point per feature location, no anchor shapes to tune for objects that are
all roughly square), its centre-ness branch ranks well-centred boxes first (what a top-30 cap rewards), and
its per-level size ranges split our three object sizes (12-20, 28-44, 60-92 px) over the pyramid levels with
no sampling of negatives. One class, "object": the proposer only says where things are.

Levels: strides 8, 16, 32 (P3-P5). torchvision's FCOS reads a level's scale range from its anchor size
(an object goes to a level when its largest left/top/right/bottom distance lies in [4 a, 8 a)) and its
centre-sampling radius from it too (radius x a). With a = stride / 2 and radius 3, a level's points lie
within 1.5 strides of the centre (FCOS's usual rule), tiny and small objects land on P3 (distances < 32 px)
and large ones on P4, so the stride-8 level, whose points are dense enough for 12-px objects, gets them.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork


@dataclass
class ProposerNetConfig:
    """The network's shape; stored in the checkpoint's config.json so a folder rebuilds its own net."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 96, 128])  # stem (stride 2), then 4 stages
    blocks: list[int] = field(default_factory=lambda: [0, 1, 1, 1])  # residual blocks after each stage's stride-2 conv
    fpn_channels: int = 64
    head_convs: int = 1  # conv layers per head branch (torchvision: 4); 1 fits more training steps in 30 CPU minutes
    anchor_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])  # per level P3, P4, P5 (see module doc)
    center_sampling_radius: float = 3.0
    image_size: int = 384  # min_size = max_size: a 384 x 384 scene is not resized
    score_thresh: float = 0.02  # the net's own pre-NMS filter; the proposer's threshold is applied after it
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.blocks) + 1 or len(self.blocks) != 4:
            raise ValueError(f"channels ({self.channels}) needs a stem and 4 stages; blocks ({self.blocks}) 4 entries")
        if len(self.anchor_sizes) != 3:
            raise ValueError(f"anchor_sizes {self.anchor_sizes} needs one size per level P3, P4, P5")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProposerNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown proposer net keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _conv(cin: int, cout: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(c, c), _conv(c, c, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class Trunk(nn.Module):
    """Stem (stride 2) and four stride-2 stages; returns P3-P5 of an FPN over the stride 8, 16, 32 stages."""

    def __init__(self, cfg: ProposerNetConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.stem = _conv(3, c[0], stride=2)
        self.stages = nn.ModuleList(
            nn.Sequential(_conv(c[i], c[i + 1], stride=2), *[_Residual(c[i + 1]) for _ in range(cfg.blocks[i])])
            for i in range(4))
        self.fpn = FeaturePyramidNetwork(c[2:], cfg.fpn_channels)
        self.out_channels = cfg.fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:  # strides 8, 16, 32
                feats[f"p{i + 2}"] = x
        return self.fpn(feats)


def build_net(cfg: ProposerNetConfig) -> FCOS:
    """FCOS with one class over `Trunk`; weights initialised from scratch (no pretrained download)."""
    trunk = Trunk(cfg)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((1.0,),) * len(cfg.anchor_sizes))
    head = FCOSHead(trunk.out_channels, 1, num_classes=1, num_convs=cfg.head_convs)
    return FCOS(trunk, num_classes=1, min_size=cfg.image_size, max_size=cfg.image_size, anchor_generator=anchors,
                head=head, center_sampling_radius=cfg.center_sampling_radius, score_thresh=cfg.score_thresh,
                nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
                topk_candidates=cfg.topk_candidates)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as the (3, H, W) float tensor in [0, 1] that torchvision detectors take."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
