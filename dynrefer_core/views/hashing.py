"""Perceptual hashes h_t of view crops (spec §2.1).

``"dct"`` is the method's hash: RGB -> ``cv2.cvtColor(RGB2GRAY)`` on uint8, then float32; crop the integer view
box; ``cv2.resize`` to 224x224 (bilinear); ``cv2.dct``; the top-left 8x8 block including DC; bit = coefficient >
mean of the 64. The names ``"phash"``, ``"dhash"``, ``"whash"``, ``"average_hash"`` are imagehash's functions on
the RGB crop: for exploration only, they are NOT the method's hash (imagehash's phash resizes to 32x32 and
thresholds on the median).

Speed without changing a bit: only 64 of the 224x224 DCT coefficients are needed, so ``DctHasher`` computes
them as D8·X·D8ᵀ in float64 and falls back to the literal ``cv2.dct`` path whenever any coefficient lies within
a safety margin of the block mean (where float32 rounding in OpenCV could flip a bit). Identical crop boxes are
hashed once per image, and ``DctHasher.many`` hashes the new ones on a few threads (cv2.resize and the BLAS
product release the GIL).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import imagehash
import numpy as np
from PIL import Image

HASH_SIZE = 8
RESIZE = 224
HASH_NAMES = ("dct", "phash", "dhash", "whash", "average_hash")
MAX_WORKERS = 8
MIN_HASHES_FOR_THREADS = 16  # ~0.1 ms each: fewer are done before a pool has started

# OpenCV's float32 DCT is off from the exact transform by at most ~1e-6 x ||X||_2 (FFT rounding: eps32 x
# log2(224*224) ~ 9e-7; measured worst 3e-7 on noise, flat and smooth crops). Gray values lie in [0, 255], so
# ||X||_2 <= 255 x 224, and a bit computed in float64 is trusted only when its coefficient is farther than
# 1e-5 x 255 x 224 = 0.57 from the block mean (>10x the bound); closer calls go through cv2.dct itself.
_MARGIN = 1e-5 * 255 * RESIZE


def gray_float32(rgb: np.ndarray) -> np.ndarray:
    """The reference's hash input: OpenCV RGB->gray on uint8 (rounded), then cast to float32."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)


def dct_hash(gray: np.ndarray, crop_box) -> np.ndarray:
    """h_t for one integer crop box (u1, v1, u2, v2), literally as the reference computes it: (8, 8) bool."""
    u1, v1, u2, v2 = (int(v) for v in crop_box)
    block = cv2.dct(cv2.resize(gray[v1:v2, u1:u2], (RESIZE, RESIZE)))[0:HASH_SIZE, 0:HASH_SIZE]
    return block > block.mean()


def _dct_rows(n: int, k: int) -> np.ndarray:
    """First k rows of OpenCV's orthonormal DCT-II matrix of size n, float64."""
    i = np.arange(n)[None, :]
    u = np.arange(k)[:, None]
    d = np.cos(np.pi * (2 * i + 1) * u / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_D8 = _dct_rows(RESIZE, HASH_SIZE)


class DctHasher:
    """Hashes many crop boxes of one image: converts the image to gray once and caches by crop box."""

    def __init__(self, rgb: np.ndarray):
        self.gray = gray_float32(rgb)
        self._cache: dict[tuple[int, int, int, int], np.ndarray] = {}

    def __call__(self, crop_box) -> np.ndarray:
        key = tuple(int(v) for v in crop_box)
        bits = self._cache.get(key)
        if bits is None:
            bits = self._cache[key] = self._compute(key)
        return bits

    def many(self, crop_boxes: np.ndarray, workers: int | None = None) -> np.ndarray:
        """Hashes (K, 8, 8) of K crop boxes; the new distinct ones on ``workers`` threads (default min(8, cpus)).

        One crop at a time per thread: a K x 224 x 224 float64 stack would only thrash the cache.
        """
        keys = [tuple(int(v) for v in c) for c in np.asarray(crop_boxes).reshape(-1, 4)]
        new = [k for k in dict.fromkeys(keys) if k not in self._cache]
        n_workers = min(MAX_WORKERS, os.cpu_count() or 1) if workers is None else workers
        if min(n_workers, len(new)) <= 1 or len(new) < MIN_HASHES_FOR_THREADS:
            self._cache.update((k, self._compute(k)) for k in new)
        else:
            with ThreadPoolExecutor(min(n_workers, len(new)), thread_name_prefix="dct_hash") as pool:
                self._cache.update(zip(new, pool.map(self._compute, new)))
        return np.stack([self._cache[k] for k in keys])

    def _compute(self, key: tuple[int, int, int, int]) -> np.ndarray:
        u1, v1, u2, v2 = key
        x = cv2.resize(self.gray[v1:v2, u1:u2], (RESIZE, RESIZE))
        # Only the 64 coefficients h_t uses: D8·X·D8ᵀ (a short-and-wide GEMM first, which BLAS does fast).
        return self._threshold(key, (_D8 @ x.astype(np.float64)) @ _D8.T)

    def _threshold(self, key: tuple[int, int, int, int], block: np.ndarray) -> np.ndarray:
        mean = block.mean()
        if np.abs(block - mean).min() <= _MARGIN:
            return dct_hash(self.gray, key)  # too close to call: use OpenCV's exact float32 path
        return block > mean


class ImagehashHasher:
    """imagehash's hash functions on RGB crops (exploration only; not the method's hash)."""

    def __init__(self, rgb: np.ndarray, name: str):
        fn: Callable = getattr(imagehash, name)
        self.rgb = rgb
        self._fn = fn
        self._cache: dict[tuple[int, int, int, int], np.ndarray] = {}

    def __call__(self, crop_box) -> np.ndarray:
        key = tuple(int(v) for v in crop_box)
        if key not in self._cache:
            u1, v1, u2, v2 = key
            crop = Image.fromarray(np.ascontiguousarray(self.rgb[v1:v2, u1:u2]), "RGB")
            self._cache[key] = np.asarray(self._fn(crop, hash_size=HASH_SIZE).hash, dtype=bool)
        return self._cache[key]

    def many(self, crop_boxes: np.ndarray, workers: int | None = None) -> np.ndarray:
        """Hashes (K, 8, 8) of K crop boxes, in this thread (`workers` is accepted for DctHasher's signature)."""
        return np.stack([self(c) for c in np.asarray(crop_boxes).reshape(-1, 4)])


def make_hasher(rgb: np.ndarray, hash_name: str = "dct") -> DctHasher | ImagehashHasher:
    """A hasher for the image ``rgb`` (HxWx3 uint8): ``hasher(crop_box)`` -> (8, 8) bool, ``hasher.many(boxes)``."""
    if hash_name == "dct":
        return DctHasher(rgb)
    if hash_name in HASH_NAMES:
        return ImagehashHasher(rgb, hash_name)
    raise ValueError(f"hash_name={hash_name!r} is not known: use one of {HASH_NAMES}")


def hash_hex(bits: np.ndarray) -> str:
    """16 hex digits of an 8x8 hash (row-major, MSB first), as imagehash writes it (str(ImageHash(bits)))."""
    # packbits is MSB first, like imagehash's bit string, at a fraction of its per-bit Python loop's cost.
    return np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes().hex()
