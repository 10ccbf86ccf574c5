"""Nested view boxes b_t = b + t·(b_I − b) (spec §1.2) and their integer crop boxes.

All box math is float32, operation by operation, like the reference (numpy float32 array times a Python
float, which numpy evaluates as float32(t)). Crop boxes are clipped to [0, W]x[0, H] and truncated to int64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NUM_CANDIDATES = 10
# The reference builds t as Python floats k/10; numpy multiplies a float32 array by float32(k/10).
CANDIDATE_TS: tuple[float, ...] = tuple((k + 1) / NUM_CANDIDATES for k in range(NUM_CANDIDATES))


def region_box(box: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """Validate ``box`` = (x1, y1, x2, y2) and clip it to the image; returns float32 (4,).

    Raises ValueError for NaN/inf, inverted, zero-area (after clipping) or wholly-outside boxes.
    """
    W, H = image_size
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"box {box!r} on a {W}x{H} image must be 4 numbers (x1, y1, x2, y2) in pixels") from exc
    if len(values) != 4:
        raise ValueError(f"box {tuple(box)!r} on a {W}x{H} image must have 4 numbers (x1, y1, x2, y2), "
                         f"got {len(values)}")
    x1, y1, x2, y2 = values
    shown = f"box {tuple(values)} on a {W}x{H} image"
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{shown} has a NaN or infinite coordinate: give finite pixel coordinates")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{shown} is inverted: x2 must be >= x1 and y2 >= y1 (format is x1, y1, x2, y2)")
    b = np.clip(np.array(values, dtype=np.float32), 0, np.array([W, H, W, H], dtype=np.float32))
    if b[2] <= b[0] or b[3] <= b[1]:
        what = "lies outside the image" if (x1 >= W or y1 >= H or x2 <= 0 or y2 <= 0) else "has zero area"
        raise ValueError(f"{shown} {what} (after clipping to the image: {tuple(float(v) for v in b)}): "
                         "draw a box with positive width and height inside the image")
    return b


def view_boxes(box: np.ndarray, image_size: tuple[int, int], ts: Sequence[float]) -> np.ndarray:
    """b_t for each t, float32 (K, 4): ``b + (b_I - b) * float32(t)`` evaluated in float32 like the reference."""
    W, H = image_size
    b = np.asarray(box, dtype=np.float32)
    b_I = np.array([0, 0, W, H], dtype=np.float32)
    t = np.asarray(ts, dtype=np.float64).astype(np.float32)[:, None]
    return b[None, :] + (b_I - b)[None, :] * t


def crop_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Integer crop boxes (K, 4) int64 of views b_t given in increasing t: clip to [0,W]x[0,H], truncate.

    Differences from the reference, only where the reference would crash: a box narrower than a pixel (e.g.
    x1=10.2, x2=10.9) truncates to an empty crop, on which ``cv2.resize`` fails. Such a crop is widened to 1 px
    (to the right/bottom, or left/top at the image border), and each crop is then joined with the previous one
    so the views stay nested. For boxes of at least one pixel this changes nothing: truncation is monotonic,
    so those crops are already non-empty and nested.
    """
    W, H = image_size
    hi = np.array([W, H, W, H], dtype=np.float32)
    c = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0, hi).astype(np.int64)
    for lo_i, hi_i, size in ((0, 2, W), (1, 3, H)):
        empty = c[:, hi_i] <= c[:, lo_i]
        if empty.any():
            c[empty, hi_i] = np.minimum(c[empty, lo_i] + 1, size)
            c[empty, lo_i] = c[empty, hi_i] - 1
            c[:, lo_i] = np.minimum.accumulate(c[:, lo_i])
            c[:, hi_i] = np.maximum.accumulate(c[:, hi_i])
    return c


BOX_ROUNDINGS = ("exact", "reference")


def map_box_to_view(base_crop: np.ndarray, view_crop: np.ndarray, size: int, rounding: str = "exact") -> np.ndarray:
    """The base integer box (X1,Y1,X2,Y2) in the S-pixel coordinates of a view with crop (u1,v1,u2,v2) (spec §1.4).

    ``rounding="exact"``: ((X1-u1)·S/w, (Y1-v1)·S/h, ...) exactly, so view 0 is always [0, 0, S, S].
    ``rounding="reference"``: what the reference gets from torchvision's resize of an int64 box (times a float32
    ratio, truncated to int), e.g. 223 instead of 224 for a 23-pixel-wide crop.
    """
    base_crop = np.asarray(base_crop, dtype=np.int64)
    view_crop = np.asarray(view_crop, dtype=np.int64)
    u1, v1, u2, v2 = (int(v) for v in view_crop)
    w, h = u2 - u1, v2 - v1
    shifted = base_crop - np.array([u1, v1, u1, v1], dtype=np.int64)
    if rounding == "reference":
        if (w, h) == (size, size):
            return shifted.astype(np.float32)
        ratios = np.array([size / w, size / h, size / w, size / h], dtype=np.float32)
        return (shifted.astype(np.float32) * ratios).astype(np.int64).astype(np.float32)
    if rounding not in BOX_ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: use one of {BOX_ROUNDINGS}")
    scale = np.array([w, h, w, h], dtype=np.float64)
    return (shifted.astype(np.float64) * size / scale).astype(np.float32)


def box_in_view(box: Sequence[float], crop: Sequence[float], size: int) -> tuple[list[float], float]:
    """Any image box (x1, y1, x2, y2), e.g. another object's, in the ``size``-pixel coordinates of the view cropped
    at ``crop`` = (u1, v1, u2, v2): clipped to the crop and scaled like the view. Also the share of the box's
    area inside the crop (0 for a box wholly outside, whose clipped coordinates are then meaningless)."""
    u1, v1, u2, v2 = (float(v) for v in crop)
    x1, y1, x2, y2 = (float(v) for v in box)
    inside = max(0.0, min(u2, x2) - max(u1, x1)) * max(0.0, min(v2, y2) - max(v1, y1))
    sx, sy = size / (u2 - u1), size / (v2 - v1)
    clipped = [(max(x1, u1) - u1) * sx, (max(y1, v1) - v1) * sy, (min(x2, u2) - u1) * sx, (min(y2, v2) - v1) * sy]
    return clipped, inside / max(1e-6, (x2 - x1) * (y2 - y1))
