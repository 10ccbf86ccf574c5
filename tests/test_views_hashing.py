"""The method's DCT hash against a straightforward computation written here, and the exploration hashes."""
import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image

from dynrefer_core.views import dct_hash, gray_float32, hash_hex
from dynrefer_core.views.hashing import DctHasher, make_hasher


def straightforward_hash(rgb: np.ndarray, box) -> np.ndarray:
    """Spec §2.1 in plain steps: gray (uint8) -> float32, crop, 224x224 bilinear, DCT, 8x8 > its mean."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    x1, y1, x2, y2 = box
    coeffs = cv2.dct(cv2.resize(gray[y1:y2, x1:x2], (224, 224), interpolation=cv2.INTER_LINEAR))[:8, :8]
    mean = float(np.mean(coeffs, dtype=np.float32))
    return np.array([[c > mean for c in row] for row in coeffs.tolist()])


def images():
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    smooth = cv2.GaussianBlur(noise, (0, 0), 6)
    yy, xx = np.mgrid[0:60, 0:80]
    stripes = np.repeat(((np.sin(xx / 3.0) + 1) * 127).astype(np.uint8)[:, :, None], 3, axis=2)
    flat = np.full((60, 80, 3), 128, np.uint8)
    black = np.zeros((60, 80, 3), np.uint8)
    ramp = np.stack([xx * 3, yy * 4, xx + yy], -1).astype(np.uint8)
    return {"noise": noise, "smooth": smooth, "stripes": stripes, "flat": flat, "black": black, "ramp": ramp}


@pytest.mark.parametrize("name", list(images()))
def test_dct_hash_matches_straightforward_computation(name):
    rgb = images()[name]
    hasher = DctHasher(rgb)
    rng = np.random.default_rng(1)
    for _ in range(40):
        x1, x2 = sorted(rng.choice(81, 2, replace=False))
        y1, y2 = sorted(rng.choice(61, 2, replace=False))
        expected = straightforward_hash(rgb, (x1, y1, x2, y2))
        np.testing.assert_array_equal(dct_hash(gray_float32(rgb), (x1, y1, x2, y2)), expected)
        np.testing.assert_array_equal(hasher((x1, y1, x2, y2)), expected)  # the fast path


def test_known_hash_values():
    # A flat crop: every AC coefficient is ~0 and the mean is DC/64, so only the DC bit is set.
    bits = dct_hash(gray_float32(images()["flat"]), (0, 0, 80, 60))
    assert bits.sum() == 1 and bits[0, 0]
    assert hash_hex(bits) == "8000000000000000"
    # All black: every coefficient is 0 and none is > 0.
    assert not dct_hash(gray_float32(images()["black"]), (5, 5, 20, 20)).any()


def test_hex_is_imagehash_hex():
    rng = np.random.default_rng(0)
    for _ in range(20):
        bits = rng.random((8, 8)) > 0.5
        assert hash_hex(bits) == str(imagehash.ImageHash(bits))
        assert len(hash_hex(bits)) == 16


def test_gray_is_rounded_uint8_then_float32():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]], np.uint8)
    gray = gray_float32(rgb)
    assert gray.dtype == np.float32
    # OpenCV's fixed-point 0.299 R + 0.587 G + 0.114 B, rounded to integers
    assert gray.tolist() == [[76.0, 150.0, 18.0]]  # 18.15 -> 18


@pytest.mark.parametrize("name", ["phash", "dhash", "whash", "average_hash"])
def test_exploration_hashes_are_imagehash_on_the_rgb_crop(name):
    rgb = images()["smooth"]
    bits = make_hasher(rgb, name)((10, 5, 70, 50))
    expected = getattr(imagehash, name)(Image.fromarray(rgb[5:50, 10:70]), hash_size=8).hash
    assert bits.shape == (8, 8)
    np.testing.assert_array_equal(bits, expected)


def test_unknown_hash_name():
    with pytest.raises(ValueError, match="hash_name='md5'"):
        make_hasher(images()["flat"], "md5")
