"""render_views: shapes, crops, box mapping and normalisation."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from dynrefer_core.views import ViewOptions, plan_views, plan_views_batch, render_views

# Spec 1.4, written out rather than taken from the code under test.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def picture(w=90, h=70):
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_shapes_and_base_box():
    img = picture()
    plans = plan_views_batch(img, [(10, 20, 30, 40), (40.5, 5.5, 88, 60)], ViewOptions(n_views=3))
    out = render_views(img, plans, size=32)
    assert out.pixel_values.shape == (2, 3, 3, 32, 32) and out.pixel_values.dtype == torch.float32
    assert out.boxes.shape == (2, 3, 4)
    assert out.boxes[:, 0].tolist() == [[0, 0, 32, 32]] * 2
    assert [[c.size for c in row] for row in out.crops] == [[(32, 32)] * 3] * 2
    single = render_views(img, plans[0], size=32)
    assert single.pixel_values.shape == (1, 3, 3, 32, 32)
    torch.testing.assert_close(single.pixel_values[0], out.pixel_values[0], rtol=0, atol=0)


def test_pixels_follow_the_reference_transform():
    img = picture()
    plan = plan_views(img, (10, 20, 30, 40), n_views=3)
    out = render_views(img, plan)
    transform = v2.Compose([v2.Resize((224, 224), interpolation=InterpolationMode.BICUBIC), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])
    for k, view in enumerate(plan.views):
        u1, v1, u2, v2_ = view.crop_box
        expected = transform(Image.fromarray(img[v1:v2_, u1:u2]))
        torch.testing.assert_close(out.pixel_values[0, k], expected, rtol=0, atol=0)


def test_normalisation_of_a_flat_image():
    img = np.full((40, 40, 3), (255, 0, 128), np.uint8)
    out = render_views(img, plan_views(img, (5, 5, 20, 20)), size=16)
    for c, value in enumerate((255, 0, 128)):
        expected = (value / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(out.pixel_values[0, :, c], torch.full((3, 16, 16), expected), rtol=0, atol=1e-5)


def test_box_mapping_hand_computed():
    img = picture(100, 80)
    plan = plan_views(img, (10, 20, 30, 40), strategy="fixed", ts=(0.5, 1.0))
    out = render_views(img, plan, size=224)
    # t=0.5 crop (5, 10, 65, 60): (10-5)*224/60, (20-10)*224/50, (30-5)*224/60, (40-10)*224/50
    torch.testing.assert_close(out.boxes[0, 1], torch.tensor([5 * 224 / 60, 10 * 224 / 50, 25 * 224 / 60,
                                                              30 * 224 / 50]))
    torch.testing.assert_close(out.boxes[0, 2], torch.tensor([10 * 2.24, 20 * 2.8, 30 * 2.24, 40 * 2.8]))
    ref = render_views(img, plan, size=224, box_rounding="reference")
    assert ref.boxes[0, 1].tolist() == [18, 44, 93, 134]


def test_plan_for_another_image_is_refused():
    plan = plan_views(picture(90, 70), (10, 20, 30, 40))
    with pytest.raises(ValueError, match="90x70 image but this image is 60x70"):
        render_views(picture(60, 70), plan)


def test_threaded_and_cached_rendering_equals_each_plan_alone():
    img = picture(90, 70)
    boxes = [(10, 20, 30, 40), (40.5, 5.5, 88, 60), (10, 20, 30, 40), (0, 0, 90, 70), (3, 3, 9, 9),
             (60, 50, 89, 69), (0, 0, 90, 70), (30, 10, 31, 60)]
    # The batch hashes 8 x 11 crop boxes on threads; one box at a time stays below the threading threshold.
    plans = plan_views_batch(img, boxes, ViewOptions(n_views=3, strategy="fixed", ts=(0.5, 1.0)))
    alone = [plan_views(img, b, n_views=3, strategy="fixed", ts=(0.5, 1.0)) for b in boxes]
    assert [[v.hash_hex for v in [p.base, *p.candidates]] for p in plans] == \
        [[v.hash_hex for v in [p.base, *p.candidates]] for p in alone]
    out = render_views(img, plans, size=32, workers=3)
    assert out.pixel_values.shape == (8, 3, 3, 32, 32)
    # Every region's t=1 view is the whole image, and regions 0/2 and 3/6 repeat: each crop is rendered once.
    assert len({id(c) for row in out.crops for c in row}) == len({v.crop_box for p in plans for v in p.views})
    assert out.crops[0][2] is out.crops[5][2] and out.crops[0][1] is out.crops[2][1]
    for i, plan in enumerate(alone):
        one = render_views(img, plan, size=32, workers=1)
        assert torch.equal(out.pixel_values[i], one.pixel_values[0])
        assert torch.equal(out.boxes[i], one.boxes[0])
        assert [c.tobytes() for c in out.crops[i]] == [c.tobytes() for c in one.crops[0]]


def test_mixed_view_counts_and_bad_workers_are_refused():
    img = picture()
    plans = [plan_views(img, (10, 20, 30, 40), n_views=2), plan_views(img, (10, 20, 30, 40), n_views=3)]
    with pytest.raises(ValueError, match=r"plans have \[2, 3\] views"):
        render_views(img, plans, size=16)
    with pytest.raises(ValueError, match="workers=0 must be >= 1"):
        render_views(img, plans[0], size=16, workers=0)
