"""Other prompts than a box: a point (through SAM) or a mask becomes the region's box, since DynRefer only ever
sees a box (spec 1.1). The reference demo offered point prompts through SAM ViT-B too."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import masks_to_boxes

from .views import load_image


def mask_to_box(mask) -> tuple[float, float, float, float]:
    """The tight x1, y1, x2, y2 box (pixel edges, so a 1-px mask is 1 px wide) of a non-empty (H, W) mask."""
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    if mask.dim() != 2 or not mask.any():
        raise ValueError("the mask is empty (or not 2-D): there is no region to box")
    x1, y1, x2, y2 = masks_to_boxes(mask[None])[0].tolist()
    return x1, y1, x2 + 1.0, y2 + 1.0


class SamPointPrompt:
    """`prompt(image, (x, y))` -> the box of SAM's best mask (highest predicted IoU) for that point.

    `model`: a Hugging Face Hub id (e.g. `facebook/sam-vit-base`) or a folder holding a `SamModel` and its
    `SamProcessor`.
    """

    def __init__(self, model: str | Path, device: str | torch.device | None = None):
        from transformers import SamModel, SamProcessor

        from .runtime import choose_device

        self.device = choose_device(device)
        try:
            self.processor = SamProcessor.from_pretrained(str(model))
            self.model = SamModel.from_pretrained(str(model)).to(self.device).eval()
        except Exception as err:  # not found, offline, not a SAM folder
            raise ValueError(f"could not load SAM from {str(model)!r} ({type(err).__name__}: {err}); give a "
                             "Hugging Face Hub id such as facebook/sam-vit-base or a folder with a SamModel") from err

    @torch.inference_mode()
    def __call__(self, image, point: tuple[float, float]) -> tuple[float, float, float, float]:
        image = load_image(image)
        x, y = (float(v) for v in point)
        if not (0 <= x < image.width and 0 <= y < image.height):
            raise ValueError(f"point ({x:g}, {y:g}) lies outside the {image.width}x{image.height} image")
        inputs = self.processor(image, input_points=[[[x, y]]], return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0][0]
        ranked = torch.argsort(out.iou_scores[0, 0].float().cpu(), descending=True).tolist()
        for k in ranked:  # the best mask that is not empty
            if masks[k].any():
                return mask_to_box(masks[k])
        raise ValueError(f"SAM found no region at point ({x:g}, {y:g})")
