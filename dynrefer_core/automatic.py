"""Describe everything in an image: box proposals, then `describe` on them (the automatic generator).

As segment-anything's automatic mask generator sits on its predictor, this sits on `describe`: a proposer
(an image in, boxes with objectness scores out; see `proposals.py`) gives at most `max_regions` boxes, each is
described, and the answers are ranked by

    confidence = caption probability x objectness

so a region must be both a likely object and one the model can say something probable about (the DenseCap
protocol ranks by one confidence per region); overlapping answers are then suppressed (NMS at `nms_iou`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import nms

from .describe import RegionResult, describe
from .views import ViewOptions, load_image


@dataclass
class AutomaticRegionDescriber:
    """`generate(image)` -> RegionResults of the proposed regions, best first, each with `objectness` and
    `confidence`. `proposer(image)` returns an object with `boxes` (K, 4) x1y1x2y2 pixels and `scores` (K,)."""

    model: object
    proposer: Callable
    max_regions: int = 30
    nms_iou: float = 0.7
    views: ViewOptions | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_regions < 1:
            raise ValueError(f"max_regions={self.max_regions} must be >= 1")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou={self.nms_iou} must lie in (0, 1]")

    def generate(self, image, phrases: Sequence[str] = (), proposals=None, **options) -> list[RegionResult]:
        """`proposals`: the proposer's answer for this image if the caller has it already."""
        proposals = self.proposer(image) if proposals is None else proposals  # as given: file proposers need a path
        image = load_image(image)
        boxes = torch.as_tensor(proposals.boxes, dtype=torch.float32).reshape(-1, 4)
        objectness = torch.as_tensor(proposals.scores, dtype=torch.float32).reshape(-1)
        keep = torch.argsort(objectness, descending=True, stable=True)[:self.max_regions]
        boxes, objectness = boxes[keep], objectness[keep]
        if not len(boxes):
            return []
        results = describe(self.model, image, boxes.tolist(), phrases, views=self.views, batch_size=self.batch_size,
                           **options)
        confidence = torch.tensor([r.caption_score for r in results]) * objectness
        for r, o, c in zip(results, objectness.tolist(), confidence.tolist()):
            r.objectness, r.confidence = o, c
        kept = nms(boxes, confidence, self.nms_iou).tolist()  # indices by descending confidence
        return [results[i] for i in kept]
