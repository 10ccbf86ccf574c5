"""Load any image the user hands us as an RGB ``PIL.Image`` (the image I of the paper).

Choices (documented because they change pixels, hence hashes h_t):
- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so boxes refer to the image as people see it.
- Transparency (RGBA, LA, PA, P with a transparent colour) is composited on WHITE: dropping alpha would expose
  whatever colour hides under transparent pixels (often black), which is not what anyone sees.
- 16-bit data (PIL ``I;16*`` / ``I`` modes, ``uint16`` arrays) keeps its top byte (``v >> 8``); PIL's own
  ``convert("L")`` clips instead, which turns most 16-bit photos white.
- Float data (PIL ``F`` mode, float arrays) is read as [0, 1] and rounded to 8 bit.
- Arrays are read as RGB (not OpenCV's BGR); HxW, HxWx1, HxWx3 and HxWx4 are accepted.
- Images above PIL's decompression-bomb limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, ~179 MP) are refused with
  ``ImageLoadError``; PIL's warning for 89-179 MP photos is silenced because those are real camera photos.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ImageSource = str | Path | bytes | Image.Image | np.ndarray


class ImageLoadError(ValueError):
    """The input could not be turned into an RGB image."""


def load_image(src: ImageSource) -> Image.Image:
    """Return ``src`` (path, encoded bytes, PIL image or array) as an RGB PIL image with EXIF orientation applied."""
    if isinstance(src, np.ndarray):
        return Image.fromarray(_array_to_rgb(src), "RGB")
    if isinstance(src, Image.Image):
        return _pil_to_rgb(_exif_upright(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, fp = "<bytes>", io.BytesIO(bytes(src))
    elif isinstance(src, (str, Path)):
        name, fp = str(src), src
    else:
        raise ImageLoadError(f"cannot load an image from a {type(src).__name__}: pass a path, bytes, a PIL image "
                             "or a numpy array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                im.load()
                im = _exif_upright(im)
                return _pil_to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: image is too large ({exc}); downscale it first or raise "
                             "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{name}: file not found, so it could not be read as an image") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL signals bad data with these
        raise ImageLoadError(f"{name}: could not be read as an image ({exc})") from exc


def _exif_upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not make a readable photo unreadable
        return im


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_array_to_rgb(np.asarray(im)), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 or arr.dtype.str.endswith("u2"):
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageLoadError("float image contains NaN or inf values: replace them before loading")
        return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):  # e.g. PIL "I" (int32): read as 16-bit data
        return (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    raise ImageLoadError(f"unsupported image array dtype {arr.dtype}: use uint8, uint16, bool or float in [0, 1]")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape[:2]:
        raise ImageLoadError(f"image array has shape {arr.shape}: expected HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)")
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] == 4:
        return np.asarray(_pil_to_rgb(Image.fromarray(np.ascontiguousarray(arr), "RGBA")))
    return np.ascontiguousarray(arr)
