"""Turn a ViewPlan into model input (spec §1.4): each crop resized to SxS, CLIP-normalised, box mapped into it."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .geometry import map_box_to_view
from .imageio import ImageSource, load_image
from .planning import ViewPlan

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class RenderedViews:
    """pixel_values (N, n, 3, S, S) normalised; boxes (N, n, 4) region box per view in S-pixel coordinates."""

    pixel_values: torch.Tensor
    boxes: torch.Tensor
    crops: list[list[Image.Image]]

    def to_dict(self) -> dict:
        return {"shape": list(self.pixel_values.shape), "boxes": self.boxes.tolist()}


def render_views(image: ImageSource, plans: ViewPlan | Sequence[ViewPlan], size: int = 224, *,
                 box_rounding: str = "none") -> RenderedViews:
    """Crop the views of each plan from ``image`` (converted once) and build the model inputs.

    The crop is resized as a PIL image with torchvision's v2 ``resize`` (bicubic, aspect not kept), exactly the
    reference's path (its v2 ``Resize`` receives PIL crops, so PIL's antialiased bicubic does the work).
    ``box_rounding``: "none" gives spec §1.4's exact mapping (view 0 = [0, 0, S, S]); "reference" truncates like
    the reference's torchvision int64 box resize (see ``geometry.map_box_to_view``).
    """
    plan_list = [plans] if isinstance(plans, ViewPlan) else list(plans)
    rgb = np.asarray(load_image(image))
    H, W = rgb.shape[:2]
    for p in plan_list:
        if tuple(p.image_size) != (W, H):
            raise ValueError(f"plan was made for a {p.image_size[0]}x{p.image_size[1]} image but this image is "
                             f"{W}x{H}: plan and render the same image")
    pixels, boxes, crops = [], [], []
    for p in plan_list:
        views = p.views
        base = np.array(p.base.crop_box)
        row_crops = []
        for v in views:
            u1, v1, u2, v2 = v.crop_box
            crop = Image.fromarray(np.ascontiguousarray(rgb[v1:v2, u1:u2]), "RGB")
            row_crops.append(TF.resize(crop, [size, size], interpolation=InterpolationMode.BICUBIC))
        x = torch.stack([TF.to_dtype(TF.to_image(c), torch.float32, scale=True) for c in row_crops])
        pixels.append(TF.normalize(x, list(CLIP_MEAN), list(CLIP_STD)))
        boxes.append(torch.from_numpy(np.stack([map_box_to_view(base, np.array(v.crop_box), size, box_rounding)
                                                for v in views])))
        crops.append(row_crops)
    if not plan_list:
        return RenderedViews(torch.empty(0, 0, 3, size, size), torch.empty(0, 0, 4), [])
    return RenderedViews(torch.stack(pixels), torch.stack(boxes), crops)
