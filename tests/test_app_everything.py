"""'Describe everything' and point prompts in the app (demo/everything.py), called as the page calls them."""
from __future__ import annotations


import gradio as gr
import numpy as np
import pytest
from PIL import Image

from demo_support import load_app, save_tiny_checkpoint
from dynrefer_core.prompts import SamPointPrompt

app = load_app()
everything = app.everything  # demo/everything.py, as the app imports it
handlers = app.handlers


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    return handlers.load_model(str(checkpoint), "cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(4)
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


def click(x: float, y: float) -> gr.SelectData:
    return gr.SelectData(None, {"index": [x, y], "value": None, "selected": True})


def test_a_click_boxes_the_region_under_it(tiny_sam, photo):
    sam = everything.LoadedSam(SamPointPrompt(tiny_sam, device="cpu"), str(tiny_sam))
    value = {"image": str(photo), "boxes": [{"xmin": 1, "ymin": 2, "xmax": 30, "ymax": 40, "label": "1"}]}
    after = everything.on_point(sam, value, click(50, 40))
    newest = after["boxes"][0]
    expected = sam.prompt(str(photo), (50, 40))
    assert (newest["xmin"], newest["ymin"], newest["xmax"], newest["ymax"]) == expected
    assert after["boxes"][1] == value["boxes"][0] and newest["label"] == "2"
    src, boxes = handlers.boxes_from_annotation(after)  # the page numbers it as the second box
    assert src == str(photo) and boxes[1] == expected
    with pytest.raises(gr.Error, match="outside the 160x120 image"):
        everything.on_point(sam, value, click(500, 40))
    with pytest.raises(gr.Error, match="upload one first"):
        everything.on_point(sam, {"image": None}, click(5, 5))


def test_without_sam_the_page_says_how_to_enable_it(tmp_path):
    off = everything.load_sam(None)
    assert off.prompt is None and "--sam facebook/sam-vit-base" in off.note()
    with pytest.raises(gr.Error, match="--sam"):
        everything.on_point(off, {"image": "x.png", "boxes": []}, click(1, 1))
    broken = everything.load_sam(str(tmp_path / "no-sam"))
    assert broken.prompt is None and "Point prompts are off" in broken.note()


def test_the_app_builds_with_sam_and_without_a_proposer(loaded, tiny_sam):
    sam = everything.LoadedSam(SamPointPrompt(tiny_sam, device="cpu"), str(tiny_sam))
    missing = everything.LoadedProposer(None, "nowhere", "could not load the proposer `nowhere`")
    demo = app.build_app(loaded, missing, sam)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"describe", "plan_views", "describe_all"} <= names
    with pytest.raises(gr.Error, match="could not load the proposer"):
        everything.api_describe_all(loaded, missing, str(tiny_sam / "config.json"))  # refused before reading


def test_the_box_rounding_can_be_overridden_per_call(loaded, photo):
    default = handlers.api_describe(loaded, str(photo), "[[13, 17, 41, 60]]")["regions"][0]
    assert default["box_rounding"] == loaded.model.config.box_rounding == "exact"
    forced = handlers.api_describe(loaded, str(photo), "[[13, 17, 41, 60]]", box_rounding="reference")["regions"][0]
    assert forced["box_rounding"] == "reference"
    assert handlers.view_options(3, "phash", "", "dct", 1.0, 0, handlers.MODEL_ROUNDING).box_rounding is None
    with pytest.raises(gr.Error, match="box_rounding='round'"):
        handlers.view_options(3, "phash", "", "dct", 1.0, 0, "round")
