"""Unit tests of the demo (demo/handlers.py, demo/app.py), without a server: parsing, errors, what each view shows."""
from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from demo_support import load_app, running_app, save_tiny_checkpoint
from dynrefer_core.views import ViewOptions, plan_views

app = load_app()
handlers = app.handlers  # demo/handlers.py, as the app imports it
CONTROLS = (3, "phash", "", "dct", 1.0, 0)  # n_views, strategy, fixed ts, hash, alpha, seed: the UI defaults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    result = handlers.load_model(str(checkpoint), "cpu")
    assert result.error is None, result.error
    return result


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """640x480 with a red square at (100, 100)-(200, 200) on grey noise (so views differ)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(90, 160, size=(480, 640, 3), dtype=np.uint8)
    pixels[100:200, 100:200] = (220, 30, 30)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def annotation(path, *boxes):
    """The annotator's value: newest box first, as the component returns it."""
    boxes = [{"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3], "label": "", "color": (0, 0, 0)} for b in boxes]
    return {"image": str(path), "boxes": boxes[::-1]}


# ------------------------------------------------------------------------------------------ parsing


def test_parse_boxes_accepts_a_list_of_boxes_or_one_box():
    assert handlers.parse_boxes("[[10, 20, 110, 120.5], [0, 0, 5, 5]]") == [(10, 20, 110, 120.5), (0, 0, 5, 5)]
    assert handlers.parse_boxes("[1, 2, 3, 4]") == [(1, 2, 3, 4)]


@pytest.mark.parametrize("text, words", [
    ("", "No box"),
    ("[[1, 2, 3]", "not valid JSON"),
    ("[[1, 2, 3, 4], [1, 2, 3]]", "Box 2"),
    ('[["a", 2, 3, 4]]', "Box 1"),
    ("[]", "No box"),
])
def test_parse_boxes_explains_bad_input(text, words):
    with pytest.raises(gr.Error, match=words):
        handlers.parse_boxes(text)


def test_parse_phrases_splits_on_commas_and_drops_blanks():
    assert handlers.parse_phrases(" a red car, ,the sky ,, ") == ["a red car", "the sky"]
    assert handlers.parse_phrases(None) == []


def test_view_options_fixed_strategy_takes_n_from_the_ts():
    options = handlers.view_options(5, "fixed", "0.3, 1.0", "dct", 1.0, 0)
    assert options == ViewOptions(n_views=3, strategy="fixed", ts=(0.3, 1.0), hash_name="dct", alpha=1.0, seed=0)
    assert handlers.view_options(4, "phash", "0.3", "dhash", 2.0, None).ts is None  # ts only matter for "fixed"
    with pytest.raises(gr.Error, match="needs t values"):
        handlers.view_options(3, "fixed", "", "dct", 1.0, 0)
    with pytest.raises(gr.Error, match="numbers between 0 and 1"):
        handlers.view_options(3, "fixed", "0.3, far", "dct", 1.0, 0)


def test_boxes_come_out_in_drawing_order(photo):
    src, boxes = handlers.boxes_from_annotation(annotation(photo, (1, 2, 30, 40), (5, 6, 70, 80)))
    assert src == str(photo)
    assert boxes == [(1, 2, 30, 40), (5, 6, 70, 80)]
    assert handlers.boxes_from_annotation(None) == (None, [])


def test_boxes_outside_the_original_image_are_refused():
    handlers.check_boxes([(0, 0, 640, 480), (-0.5, 0, 640.5, 480)], (640, 480))  # within 1 px: rounding
    with pytest.raises(gr.Error, match=r"Box 2 \(0, 0, 700, 100\) lies outside the 640x480 image"):
        handlers.check_boxes([(0, 0, 10, 10), (0, 0, 700, 100)], (640, 480))


def test_the_annotator_hands_over_the_uploaded_file_and_unscaled_boxes(photo):
    """The display scales the image; boxes come back divided by the component's scaleFactor, in original pixels."""
    from gradio.data_classes import FileData
    from gradio_image_annotation.image_annotator import AnnotatedImageData

    with gr.Blocks():
        annotator = app.image_annotator(image_type="filepath")
    app._accept_any_file(annotator)
    payload = AnnotatedImageData(image=FileData(path=str(photo)),
                                 boxes=[{"xmin": 50, "ymin": 50, "xmax": 100, "ymax": 100, "scaleFactor": 0.5}])
    value = annotator.preprocess(payload)
    assert value["image"] == str(photo)
    assert (value["boxes"][0]["xmin"], value["boxes"][0]["xmax"]) == (100, 200)
    assert annotator.preprocess(None) is None


# ------------------------------------------------------------------------------------------ views (no model)


def test_views_appear_as_soon_as_a_box_exists(photo):
    pick, drawn, tiles, figure, note = handlers.on_views(annotation(photo, (100, 100, 200, 200)), None, *CONTROLS)
    expected = plan_views(Image.open(photo), (100, 100, 200, 200))
    assert pick["choices"] == [("Box 1: (100, 100, 200, 200)", 0)] and pick["value"] == 0
    assert drawn.size == (640, 480)  # drawn on the full-resolution image
    assert len(tiles) == 11  # t = 0 and the ten candidates
    assert figure.axes[0].get_xlabel().startswith("t")
    chosen = ", ".join(f"{t:.1f}" for t in expected.selected_ts)
    assert f"t = {chosen}" in note and "640x480" in note


def test_views_follow_the_picked_box_and_the_controls(photo):
    value = annotation(photo, (100, 100, 200, 200), (300, 200, 400, 300))
    pick, *_ , note = handlers.on_views(value, None, *CONTROLS)
    assert pick["value"] == 1 and note.startswith("**Box 2 of 2**")  # the newest box by default
    pick, *_ , note = handlers.on_views(value, 0, 4, "fixed", "0.5, 0.7, 1.0", "dct", 1.0, 0)
    assert pick["value"] == 0 and "t = 0.0, 0.5, 0.7, 1.0" in note


def test_a_box_being_drawn_is_explained_not_raised(photo):
    """Mid-drag the component reports a zero-area box: say so quietly instead of a pop-up error."""
    _, drawn, tiles, figure, note = handlers.on_views(annotation(photo, (100, 100, 100, 150)), None, *CONTROLS)
    assert drawn is None and tiles == [] and figure is None
    assert "Box 1 (100, 100, 100, 150)" in note and "zero" in note


def test_no_image_or_no_box_gives_a_hint_and_a_broken_upload_an_error(photo, tmp_path):
    assert "Upload an image" in handlers.on_views(None, None, *CONTROLS)[-1]
    assert "draw a box" in handlers.on_views(annotation(photo), None, *CONTROLS)[-1]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(gr.Error, match="Could not read the image"):
        handlers.on_views(annotation(broken), None, *CONTROLS)


# ------------------------------------------------------------------------------------------ describe


def test_describe_renders_every_region_and_writes_the_json(loaded, photo, tmp_path):
    boxes = [(100, 100, 200, 200), (300, 200, 400, 300)]
    cards, annotated, download, payload = handlers.on_describe(
        loaded, tmp_path, annotation(photo, *boxes), "a red square, grey noise, a dog", *CONTROLS)
    image, annotations = annotated["value"]
    assert annotated["visible"] and download["visible"]
    assert image.size == (640, 480)
    assert [a[0] for a in annotations] == boxes
    assert [a[1] for a in annotations] == [f"{i}: {r['caption']}" for i, r in enumerate(payload["regions"], 1)]
    assert payload["model"] == loaded.to_dict() and payload["image_size"] == [640, 480]
    assert [tuple(r["box"]) for r in payload["regions"]] == boxes
    for card, region in zip(cards, payload["regions"]):
        assert len(card["crops"]) == 3 and card["crops"][0].size == (112, 112)  # tiny's S
        assert card["ts"][0] == 0.0 and len(card["ts"]) == 3
        assert [s["phrase"] for s in region["similarity"]] == ["a red square", "grey noise", "a dog"]
        views = region["views"]  # t=0 and all ten candidates, the fused ones flagged, as /describe promises
        assert [v["t"] for v in views] == pytest.approx([k / 10 for k in range(11)])
        assert [v["t"] for v in views if v["selected"]] == sorted(card["ts"]) and region["selected_ts"] == card["ts"]
        assert region["caption"].strip()  # seeded tiny weights caption in words
        assert region["box_rounding"] == loaded.model.config.box_rounding
    with gr.Blocks() as page:  # the first card as the page renders it
        app._region_card(cards[0])
    text = " ".join(block.value for block in page.blocks.values() if isinstance(block, gr.Markdown))
    assert "views t = 0.0, " in text and f"box rounding: {loaded.model.config.box_rounding}" in text
    assert json.loads(open(download["value"]).read()) == payload
    # Downloads older than an hour are deleted at the next call, not left to fill a Space's disk.
    old, other = tmp_path / "dynrefer-old.json", tmp_path / "notes.txt"
    old.write_text("{}"), other.write_text("mine")
    os.utime(old, (time.time() - 2 * handlers.DOWNLOAD_MAX_AGE_S,) * 2)
    again = handlers.on_describe(loaded, tmp_path, annotation(photo, boxes[0]), "", *CONTROLS)[2]["value"]
    assert not old.exists() and other.exists() and Path(download["value"]).exists() and Path(again).exists()


def test_the_model_sees_the_full_resolution(loaded, tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), (30, 120, 200)).save(big)
    payload = handlers.on_describe(loaded, tmp_path, annotation(big, (1800, 1200, 2300, 1550)), "", *CONTROLS)[-1]
    assert payload["image_size"] == [2400, 1600]
    assert payload["regions"][0]["box"] == [1800, 1200, 2300, 1550]
    assert payload["regions"][0]["views"][0]["crop_box"] == [1800, 1200, 2300, 1550]


def test_describe_errors_name_the_problem(loaded, photo, tmp_path):
    with pytest.raises(gr.Error, match="No image"):
        handlers.on_describe(loaded, tmp_path, None, "", *CONTROLS)
    with pytest.raises(gr.Error, match="No box"):
        handlers.on_describe(loaded, tmp_path, annotation(photo), "", *CONTROLS)
    with pytest.raises(gr.Error, match=r"Box 2 \(50, 50, 50, 90\).*zero"):
        handlers.on_describe(loaded, tmp_path, annotation(photo, (10, 10, 60, 60), (50, 50, 50, 90)), "", *CONTROLS)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(gr.Error, match="Could not read the image"):
        handlers.on_describe(loaded, tmp_path, annotation(broken, (1, 1, 5, 5)), "", *CONTROLS)
    with pytest.raises(gr.Error, match="n_views=4"):  # the slider previews any n; the model fuses its own n
        handlers.on_describe(loaded, tmp_path, annotation(photo, (10, 10, 60, 60)), "", 4, "phash", "", "dct", 1.0, 0)


def test_a_bad_option_is_not_blamed_on_a_box(photo):
    with pytest.raises(gr.Error) as error:
        handlers.api_plan_views(str(photo), "[[100, 100, 200, 200]]", 3, "sideways")
    assert "strategy='sideways'" in error.value.message and "Box" not in error.value.message


def test_api_handlers_return_the_documented_json(loaded, photo):
    plans = handlers.api_plan_views(str(photo), "[[100, 100, 200, 200]]", *CONTROLS)
    assert plans["image_size"] == [640, 480]
    region = plans["regions"][0]
    assert len(region["candidates"]) == 10 and region["selected_ts"][0] == 0.0
    assert all(len(c["hash_hex"]) == 16 for c in region["candidates"])
    described = handlers.api_describe(loaded, str(photo), "[[100, 100, 200, 200]]", "a red square", *CONTROLS)
    assert set(described) == {"model", "image_size", "regions"}
    assert {"box", "views", "caption", "caption_score", "tags", "similarity", "timings"} <= set(described["regions"][0])


# ------------------------------------------------------------------------------------------ model loading and app


def test_a_missing_checkpoint_is_reported_not_fatal(tmp_path, photo):
    missing = handlers.load_model(str(tmp_path / "nowhere"), "cpu")
    assert missing.model is None and "nowhere" in missing.error and missing.banner().startswith("⛔")
    with pytest.raises(gr.Error, match="Could not load the checkpoint"):
        handlers.on_describe(missing, tmp_path, annotation(photo, (10, 10, 60, 60)), "", *CONTROLS)


def test_a_device_that_does_not_exist_is_reported_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(handlers, "DEFAULT_CHECKPOINT", tmp_path / "mini")
    for device in ("cuda:99", "no-such-device"):
        result = handlers.load_model(None, device)
        assert result.model is None and device in result.error and "--device cpu" in result.error


def test_without_the_bundled_checkpoint_random_weights_are_announced(monkeypatch, tmp_path):
    monkeypatch.setattr(handlers, "DEFAULT_CHECKPOINT", tmp_path / "mini")
    fallback = handlers.load_model(None, "cpu")
    assert fallback.random_weights and fallback.model is not None
    assert "Random weights" in fallback.banner() and "DynReferConfig.tiny()" in fallback.banner()


def test_the_app_exposes_describe_and_plan_views(loaded):
    demo = app.build_app(loaded)
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"describe", "plan_views"} <= names
    assert Path(demo.downloads.name).is_dir()


def test_the_downloads_folder_goes_when_the_app_stops(checkpoint):
    # It used to stay in /tmp, one per start of the app; Spaces and Docker stop the app with SIGTERM.
    pattern = str(Path(tempfile.gettempdir()) / "dynrefer-demo-*")
    before = set(glob.glob(pattern))
    with running_app("--checkpoint", str(checkpoint)):
        made = set(glob.glob(pattern)) - before
        assert len(made) == 1
    assert not Path(made.pop()).exists()


def test_main_never_shares_unless_asked(monkeypatch, loaded):
    launched = []
    monkeypatch.setattr(handlers, "load_model", lambda checkpoint, device: loaded)
    monkeypatch.setattr(app, "build_app", lambda *loaded_parts: types.SimpleNamespace(
        launch=lambda **kw: launched.append(kw)))
    app.main(["--port", "7999"])
    app.main(["--share", "--host", "0.0.0.0"])
    assert launched[0]["share"] is False and launched[0]["server_port"] == 7999
    assert launched[1]["share"] is True and launched[1]["server_name"] == "0.0.0.0"


def test_spaces_gpu_wraps_the_model_call_when_available(monkeypatch):
    wrapped = []

    def gpu(duration):
        return lambda fn: wrapped.append(fn.__name__) or fn

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    monkeypatch.delitem(sys.modules, "dynrefer_demo_app")
    for name in ("handlers", "everything"):  # imported anew by the app, as in a fresh process
        monkeypatch.delitem(sys.modules, f"demo.{name}")
        monkeypatch.delattr(sys.modules["demo"], name)
    load_app()
    assert wrapped == ["run_describe", "run_describe_all"]


def test_the_bundled_model_is_named_as_such(monkeypatch, checkpoint):
    monkeypatch.setattr(handlers, "DEFAULT_CHECKPOINT", checkpoint)
    bundled = handlers.load_model(None, "cpu")
    assert bundled.bundled and not bundled.random_weights and "DynRefer-mini" in bundled.banner()
    chosen = handlers.load_model(str(checkpoint), "cpu")
    assert not chosen.bundled and "DynRefer-mini" not in chosen.banner()
