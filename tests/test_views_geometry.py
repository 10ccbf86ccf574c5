"""Nested view boxes b_t and crop boxes, checked against hand-computed values."""
import numpy as np
import pytest

from dynrefer_core.views import CANDIDATE_TS, box_in_view, crop_boxes, region_box, view_boxes
from dynrefer_core.views.geometry import map_box_to_view


def test_candidate_ts_are_tenths():
    assert CANDIDATE_TS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_hand_computed_boxes_100x80():
    # b = (10, 20, 30, 40), b_I = (0, 0, 100, 80): b_t = (10-10t, 20-20t, 30+70t, 40+40t)
    b = region_box((10, 20, 30, 40), (100, 80))
    boxes = view_boxes(b, (100, 80), [0.0, 0.1, 0.5, 1.0])
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 40], [9, 18, 37, 44], [5, 10, 65, 60], [0, 0, 100, 80]])
    crops = crop_boxes(boxes, (100, 80))
    assert crops.dtype == np.int64
    assert crops.tolist() == [[10, 20, 30, 40], [9, 18, 37, 44], [5, 10, 65, 60], [0, 0, 100, 80]]


def test_float32_math_changes_the_truncated_crop():
    # 105 + (0 - 105) * float32(0.6) = 41.999996 in float32 (42.0 in float64): the crop starts at 41.
    boxes = view_boxes(np.array([105, 0, 106, 10], np.float32), (640, 480), [0.6])
    assert boxes[0, 0] == np.float32(41.999996)
    assert crop_boxes(boxes, (640, 480))[0, 0] == 41


def test_fractional_box_is_truncated_not_rounded():
    boxes = view_boxes(region_box((10.7, 20.9, 30.2, 40.99), (100, 80)), (100, 80), [0.0])
    assert crop_boxes(boxes, (100, 80)).tolist() == [[10, 20, 30, 40]]


def test_box_partly_outside_is_clipped():
    b = region_box((-20, -5, 130, 50), (100, 80))
    assert b.tolist() == [0, 0, 100, 50]


@pytest.mark.parametrize("box, words", [
    ((10, 10, 10, 50), "zero area"),
    ((30, 10, 20, 50), "inverted"),
    ((10, 50, 20, 40), "inverted"),
    ((120, 10, 150, 50), "outside the image"),
    ((-50, -50, -10, -10), "outside the image"),
    ((float("nan"), 0, 10, 10), "NaN or infinite"),
    ((0, 0, float("inf"), 10), "NaN or infinite"),
    ((1, 2, 3), "4 numbers"),
])
def test_bad_boxes_are_refused_with_a_clear_message(box, words):
    with pytest.raises(ValueError) as err:
        region_box(box, (100, 80))
    assert words in str(err.value) and "100x80" in str(err.value)


def test_sub_pixel_box_gets_a_one_pixel_nested_crop():
    # 10.2..10.9 truncates to 10..10 (empty in the reference); we widen it to 10..11.
    b = region_box((10.2, 20.1, 10.9, 20.6), (100, 80))
    crops = crop_boxes(view_boxes(b, (100, 80), [0.0, *CANDIDATE_TS]), (100, 80))
    assert crops[0].tolist() == [10, 20, 11, 21]
    assert (crops[1:, :2] <= crops[:-1, :2]).all() and (crops[1:, 2:] >= crops[:-1, 2:]).all()


def test_sub_pixel_box_at_the_border_grows_inwards():
    crops = crop_boxes(view_boxes(region_box((99.5, 79.2, 100, 80), (100, 80)), (100, 80), [0.0]), (100, 80))
    assert crops.tolist() == [[99, 79, 100, 80]]


def test_box_mapping_exact_and_reference_rounding():
    base = np.array([10, 20, 30, 40])
    view = np.array([0, 0, 46, 80])  # 46 px wide: 224/46 in float32 times 46 truncates to 223 in the reference
    exact = map_box_to_view(base, view, 224)
    np.testing.assert_allclose(exact, [10 * 224 / 46, 20 * 224 / 80, 30 * 224 / 46, 40 * 224 / 80], rtol=1e-6)
    assert map_box_to_view(base, base, 224).tolist() == [0, 0, 224, 224]
    assert map_box_to_view(np.array([0, 0, 46, 80]), view, 224, "reference").tolist() == [0, 0, 223, 224]


def test_reference_rounding_matches_torchvision_box_resize():
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    for _ in range(50):
        u1, v1 = rng.integers(0, 50, 2)
        w, h = rng.integers(1, 400, 2)
        view = np.array([u1, v1, u1 + w, v1 + h])
        x1, y1 = u1 + rng.integers(0, w), v1 + rng.integers(0, h)
        base = np.array([x1, y1, x1 + rng.integers(1, u1 + w - x1 + 1), y1 + rng.integers(1, v1 + h - y1 + 1)])
        shifted = torch.from_numpy(base - np.array([u1, v1, u1, v1]))
        tv = tv_tensors.BoundingBoxes(shifted[None], format="XYXY", canvas_size=(int(h), int(w)))
        expected = TF.resize(tv, [224, 224]).data.to(torch.float32)[0].numpy()
        np.testing.assert_array_equal(map_box_to_view(base, view, 224, "reference"), expected)


def test_box_in_view_maps_to_view_pixels_and_measures_the_share():
    box, share = box_in_view((20, 30, 40, 50), (10, 10, 110, 60), 112)  # crop 100 x 50 px -> 112 x 112
    assert share == 1.0 and box == pytest.approx([11.2, 44.8, 33.6, 89.6])
    box, share = box_in_view((100, 20, 120, 40), (10, 10, 110, 60), 112)  # half of it right of the crop
    assert share == 0.5 and box == pytest.approx([100.8, 22.4, 112.0, 67.2])
    assert box_in_view((0, 0, 5, 5), (10, 10, 20, 20), 112)[1] == 0.0  # wholly outside
