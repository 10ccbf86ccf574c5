"""load_image: every way a user may hand us a picture becomes an upright RGB PIL image."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from dynrefer_core.views import ImageLoadError, load_image, plan_views


def rgb_of(im):
    assert im.mode == "RGB"
    return np.asarray(im)


def test_path_bytes_pil_and_array_agree(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    for src in (path, str(path), path.read_bytes(), Image.open(path), arr):
        np.testing.assert_array_equal(rgb_of(load_image(src)), arr)


def test_exif_rotated_jpeg_is_made_upright():
    # Stored 40 wide x 20 high, with EXIF orientation 6 (rotate 90 degrees clockwise to view): 20 x 40 upright.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # red on the stored left edge -> top after rotating clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif, quality=95)
    im = load_image(buf.getvalue())
    assert im.size == (20, 40)
    top, bottom = np.asarray(im)[2].mean(0), np.asarray(im)[-3].mean(0)
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60


# How to turn stored pixels upright for each EXIF orientation (tag 0x0112; EXIF 2.32, 4.6.4 A), in numpy.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180 degrees
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # rotated 90 degrees clockwise to view
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # rotated 90 degrees counter-clockwise to view
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_every_exif_orientation_is_made_upright(orientation, tmp_path):
    stored = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    (tmp_path / "photo.jpg").write_bytes(data)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the stored pixels, as JPEG decodes them
    expected = UPRIGHT[orientation](decoded)
    np.testing.assert_array_equal(expected, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))
    for src in (data, tmp_path / "photo.jpg", Image.open(io.BytesIO(data))):
        np.testing.assert_array_equal(rgb_of(load_image(src)), expected)


def test_gray_and_hxwx1_arrays():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for src in (g, g[:, :, None], Image.fromarray(g, "L")):
        out = rgb_of(load_image(src))
        assert out.shape == (3, 4, 3) and (out == g[:, :, None]).all()


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red
    rgba[0, 1] = (0, 0, 0, 0)       # transparent (black underneath)
    rgba[1, 0] = (0, 0, 255, 128)   # half-transparent blue
    for src in (rgba, Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA")):
        out = rgb_of(load_image(src))
        assert out[0, 1].tolist() == [255, 255, 255]
    out = rgb_of(load_image(rgba))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[1, 0].tolist() in ([127, 127, 255], [126, 126, 255], [128, 128, 255])


def test_16bit_keeps_the_top_byte():
    a16 = np.array([[0, 255, 256, 65535], [4660, 32768, 51400, 1000]], np.uint16)
    expected = (a16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(rgb_of(load_image(a16))[:, :, 0], expected)
    pil16 = Image.fromarray(a16)  # mode I;16
    assert pil16.mode.startswith("I;16")
    np.testing.assert_array_equal(rgb_of(load_image(pil16))[:, :, 1], expected)
    buf = io.BytesIO()
    pil16.save(buf, "PNG")
    np.testing.assert_array_equal(rgb_of(load_image(buf.getvalue()))[:, :, 2], expected)
    rgb16 = np.stack([a16, a16 // 2, a16 // 4], -1)
    np.testing.assert_array_equal(rgb_of(load_image(rgb16))[:, :, 1], (a16 // 2 >> 8).astype(np.uint8))


def test_int32_float_and_bool_modes():
    a = np.array([[0, 65535, 70000, -5]], np.int32)
    assert rgb_of(load_image(Image.fromarray(a, "I")))[0, :, 0].tolist() == [0, 255, 255, 0]
    f = np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)
    assert rgb_of(load_image(Image.fromarray(f, "F")))[0, :, 0].tolist() == [0, 128, 255, 255]
    assert rgb_of(load_image(f.astype(np.float64)))[0, :, 2].tolist() == [0, 128, 255, 255]
    b = np.array([[True, False]])
    assert rgb_of(load_image(b))[0, :, 0].tolist() == [255, 0]
    assert rgb_of(load_image(Image.fromarray(b)))[0, :, 0].tolist() == [255, 0]  # mode "1"


def test_palette_cmyk_modes():
    p = Image.new("P", (3, 2))
    p.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    out = rgb_of(load_image(p))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 0]
    transparent = p.copy()
    transparent.info["transparency"] = 0
    assert rgb_of(load_image(transparent))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert rgb_of(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg: could not be read as an image"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match="<bytes>: could not be read as an image"):
        load_image(b"hello")
    with pytest.raises(ImageLoadError, match="nothing.png"):
        load_image(tmp_path / "nothing.png")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(good, "PNG")
    with pytest.raises(ImageLoadError, match="could not be read"):
        load_image(good.getvalue()[:60])  # truncated
    assert issubclass(ImageLoadError, ValueError)


def test_bad_arrays():
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ImageLoadError, match="cannot load an image from a list"):
        load_image([[1, 2]])


def test_decompression_bomb_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x1000 px limit: a 50x50 PNG is "too large"
    buf = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buf, "PNG")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")  # 1600 px: above the warning level, below the error level
    assert load_image(buf.getvalue()).size == (40, 40)


def test_planning_accepts_odd_inputs():
    rng = np.random.default_rng(0)
    for src in (rng.integers(0, 65536, (40, 50), dtype=np.uint16), rng.integers(0, 256, (40, 50, 4), dtype=np.uint8),
                Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), "L").convert("P")):
        plan = plan_views(src, (10, 10, 20, 30))
        assert plan.image_size == (50, 40) and len(set(plan.selected_ts)) == 3
