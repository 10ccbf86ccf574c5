"""Point and mask prompts become boxes: mask_to_box, and SamPointPrompt on a tiny random SAM saved here."""
import numpy as np
import pytest
import torch
from PIL import Image

from dynrefer_core.prompts import SamPointPrompt, mask_to_box


def test_mask_to_box_covers_the_mask_pixels():
    mask = np.zeros((40, 60), bool)
    mask[10:21, 5:9] = True  # rows 10..20, columns 5..8
    assert mask_to_box(mask) == (5.0, 10.0, 9.0, 21.0)
    single = np.zeros((5, 5), bool)
    single[2, 3] = True
    assert mask_to_box(single) == (3.0, 2.0, 4.0, 3.0)  # a one-pixel mask is a 1 x 1 box
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((5, 5), bool))


def test_sam_point_prompt_gives_the_box_of_its_best_mask(tiny_sam):
    from transformers import SamModel, SamProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    prompt = SamPointPrompt(tiny_sam, device="cpu")
    box = prompt(image, (50, 40))
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
    # The same computation written out: SAM's masks for the point, the one with the highest predicted IoU.
    model, processor = SamModel.from_pretrained(tiny_sam).eval(), SamProcessor.from_pretrained(tiny_sam)
    inputs = processor(image, input_points=[[[50.0, 40.0]]], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    masks = processor.image_processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                                         inputs["reshaped_input_sizes"])[0][0]
    best = masks[int(out.iou_scores[0, 0].argmax())].numpy()
    ys, xs = np.nonzero(best)
    assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    with pytest.raises(ValueError, match="outside the 160x120 image"):
        prompt(image, (200, 10))


def test_sam_that_cannot_be_loaded_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="facebook/sam-vit-base"):
        SamPointPrompt(tmp_path / "nothing-here", device="cpu")
