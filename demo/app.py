"""DynRefer demo: draw boxes, see which nested views the model picks and why, get captions, tags and similarity.

    python demo/app.py [--host 127.0.0.1] [--port 7860] [--checkpoint DIR_OR_HUB_ID] [--device cpu|cuda] [--share]

The app is a thin view over the library: `plan_views_batch` gives the ViewPlans (the nested views b_t, their
hashes h_t, Hamming distances and scores), `DynRefer.describe` gives RegionResults; this file renders them
(`ViewPlan.to_dict()`, `RegionResult.to_dict()`) and turns bad input into messages a person can act on (gr.Error).

API (documented in the README):
- `/describe` (image, boxes as JSON [[x1, y1, x2, y2], ...], phrases "a, b") -> {"model", "image_size", "regions"}
- `/plan_views` (image, boxes) -> {"image_size", "regions": [ViewPlan.to_dict(), ...]}, no model run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # Hugging Face ZeroGPU: GPU work runs in functions decorated with spaces.GPU; import it before torch
    import spaces

    gpu = spaces.GPU(duration=60)
except ImportError:

    def gpu(fn):
        return fn


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python demo/app.py` from a fresh clone or a Space, without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from gradio_image_annotation import image_annotator  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402  (Figure, not pyplot: no global figure registry)

from dynrefer_core.config import DynReferConfig  # noqa: E402
from dynrefer_core.modeling.dynrefer import DynRefer  # noqa: E402
from dynrefer_core.runtime import choose_device  # noqa: E402
from dynrefer_core.views import (BoxError, ImageLoadError, ViewOptions, ViewPlan, draw_views,  # noqa: E402
                                 load_image, plan_views_batch, view_tiles)
from dynrefer_core.views.drawing import SELECTED as CHOSEN  # noqa: E402  (one colour for chosen views everywhere)

DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "mini"
ASSETS = ROOT / "assets"
STRATEGIES = [("pHASH (the method)", "phash"), ("fixed t (task prior)", "fixed"),
              ("random (training sampler)", "random")]
HASHES = [("DCT 8x8 (the method's pHASH)", "dct"), ("imagehash phash", "phash"), ("imagehash dhash", "dhash"),
          ("imagehash whash", "whash"), ("imagehash average_hash", "average_hash")]
CSS = """
.region-card {min-width: 320px; max-width: 720px}
.model-views .grid-wrap {min-height: 0 !important}  /* the Gallery reserves 450 px; three crops need one row */
"""


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LoadedModel:
    """The model the app serves, or why there is none. Built once by `load_model`, before the app starts."""

    model: Any  # DynRefer | None
    source: str  # checkpoint folder / hub id, or a description of the fallback
    device: str
    random_weights: bool = False
    error: str | None = None
    bundled: bool = False  # the default checkpoints/mini

    def to_dict(self) -> dict:
        return {"checkpoint": self.source, "device": self.device, "random_weights": self.random_weights}

    def summary(self) -> str:
        config = self.model.config
        millions = sum(p.numel() for p in self.model.parameters()) / 1e6
        return f"{millions:.1f} M parameters, fuses n = {config.n_views} views of {config.image_size} px"

    def banner(self) -> str:
        """What the page says about the model, first thing under the title."""
        if self.error:
            return (f"⛔ **No model loaded.** {self.error}  \nThe views below still work; *Describe* fails until the "
                    "app is restarted with a valid `--checkpoint`.")
        if self.random_weights:
            return (f"⚠️ **Random weights.** No trained checkpoint was found at `{_short(DEFAULT_CHECKPOINT)}`, so "
                    f"this is a randomly initialised `DynReferConfig.tiny()` model on `{self.device}` "
                    f"({self.summary()}). The view selection is real; captions, tags and similarities are noise. "
                    "Start the app with `--checkpoint DIR_OR_HUB_ID` to load trained weights.")
        text = f"**Model:** `{self.source}` on `{self.device}` ({self.summary()})."
        if self.bundled:
            text += ("  \nThis is the bundled **DynRefer-mini**, trained here from scratch on generated scenes of 10 "
                     "shapes, 8 colours, 4 patterns and 3 sizes (its scores are in the README). It describes every "
                     "region in those words (of the neighbour each caption ends with, where it lies and its colour "
                     "are mostly right, its shape about two times in five): try the generated examples, and load the "
                     "released weights with `--checkpoint` for photos.")
        return text


def _short(path: Path | str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_model(checkpoint: str | None = None, device: str | None = None) -> LoadedModel:
    """Load `checkpoint` (default: the bundled checkpoints/mini); never raises, so the app always starts.

    Only the *default* checkpoint may be missing silently (a fresh clone before training): then a seeded random
    DynReferConfig.tiny() model stands in and the page says so. A checkpoint or device that cannot be used is
    reported on the page and by every Describe call.
    """
    source = checkpoint if checkpoint is not None else _short(DEFAULT_CHECKPOINT)
    try:
        dev = str(choose_device(device))
        if checkpoint is None and not DEFAULT_CHECKPOINT.exists():
            with torch.random.fork_rng():  # the same random weights every start, the global RNG untouched
                torch.manual_seed(0)
                model = DynRefer(DynReferConfig.tiny()).place(dev).eval()
            return LoadedModel(model, "DynReferConfig.tiny() (random weights)", dev, random_weights=True)
        model = DynRefer.from_pretrained(str(DEFAULT_CHECKPOINT) if checkpoint is None else checkpoint, device=dev)
    except Exception as exc:  # whatever is wrong with the checkpoint or the device: say so on the page, keep serving
        return LoadedModel(None, source, str(device or "auto"), error=(
            f"Could not load the checkpoint `{source}` on device `{device or 'auto'}`: {type(exc).__name__}: {exc}. "
            "Pass `--checkpoint` a folder written by `DynRefer.save_pretrained` (or a Hugging Face Hub id of one), "
            "or leave it out to use the bundled `checkpoints/mini`; `--device cpu` always works."))
    return LoadedModel(model, source, dev, bundled=checkpoint is None)


@gpu
def run_describe(model: Any, image: PIL.Image.Image, boxes: list, phrases: list[str], options: ViewOptions) -> list:
    """The one GPU-bound call (at module level so that spaces.GPU can wrap it)."""
    return model.describe(image, boxes, phrases, views=options)


# ---------------------------------------------------------------------------------------------- input


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """'[[x1, y1, x2, y2], ...]' (one box without the outer list is accepted too) -> list of 4-tuples."""
    example = "e.g. [[10, 20, 200, 180]] in pixels of the original image"
    if not text or not text.strip():
        raise gr.Error(f"No box given: pass boxes as a JSON list of [x1, y1, x2, y2], {example}.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise gr.Error(f"Boxes are not valid JSON ({exc.msg} at character {exc.pos}) in {text[:80]!r}; "
                       f"expected {example}.") from None
    if isinstance(data, list) and len(data) == 4 and all(isinstance(v, (int, float)) for v in data):
        data = [data]
    if not isinstance(data, list) or not data:
        raise gr.Error(f"No box given: expected a JSON list of [x1, y1, x2, y2], got {text[:80]!r}.")
    boxes = []
    for i, box in enumerate(data, 1):
        numbers = isinstance(box, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        if not numbers or len(box) != 4:
            raise gr.Error(f"Box {i} is {box!r}: each box must be four numbers [x1, y1, x2, y2].")
        boxes.append(tuple(float(v) for v in box))
    return boxes


def parse_phrases(text: str | None) -> list[str]:
    """'a red car, the sky' -> ['a red car', 'the sky'] (commas separate, blanks are dropped)."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def parse_ts(text: str | None) -> list[float] | None:
    """'0.3, 1.0' -> [0.3, 1.0]; empty -> None."""
    if not text or not text.strip():
        return None
    try:
        return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise gr.Error(f"Fixed t values must be numbers between 0 and 1 separated by commas, e.g. '0.3, 1.0'; "
                       f"got {text!r}.") from None


def view_options(n_views: float, strategy: str, ts_text: str | None, hash_name: str, alpha: float,
                 seed: float | None) -> ViewOptions:
    """The view controls as the ViewOptions of plan_views_batch and DynRefer.describe."""
    ts = parse_ts(ts_text) if strategy == "fixed" else None
    if strategy == "fixed" and not ts:
        raise gr.Error("The 'fixed t' strategy needs t values, e.g. '0.3, 1.0' (0 = the box, 1 = the whole image).")
    try:
        return ViewOptions(n_views=len(ts) + 1 if ts else int(n_views), strategy=strategy, ts=ts,
                           hash_name=hash_name, alpha=float(alpha), seed=None if seed is None else int(seed))
    except ValueError as exc:
        raise gr.Error(str(exc)) from None


def read_image(src: Any) -> PIL.Image.Image:
    """An upload (path, bytes, PIL, array) -> the full-resolution RGB image, or a gr.Error that says why not."""
    if src is None:
        raise gr.Error("No image: upload one (or pick an example), then draw a box on it.")
    try:
        return load_image(src)
    except ImageLoadError as exc:
        message = str(exc)
        if isinstance(src, (str, Path)):  # name the file, not the server's upload folder
            message = message.replace(str(Path(src).parent) + os.sep, "")
        raise gr.Error(f"Could not read the image: {message}") from None


def boxes_from_annotation(value: dict | None) -> tuple[Any, list[tuple[float, float, float, float]]]:
    """The annotator's value -> (image source, boxes in drawing order, in original-image pixels)."""
    if not value or value.get("image") is None:
        return None, []
    # The component lists the newest box first; number the boxes in the order the user drew them.
    boxes = [(float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"]))
             for b in reversed(value.get("boxes") or [])]
    return value["image"], boxes


def check_boxes(boxes: list, size: tuple[int, int], start: int = 1) -> None:
    """Boxes must lie in the *original* image: catches a display-scaled box (gradio_image_annotation #33)."""
    width, height = size
    for i, (x1, y1, x2, y2) in enumerate(boxes, start):
        if min(x1, y1, x2, y2) < -1 or max(x1, x2) > width + 1 or max(y1, y2) > height + 1:
            raise gr.Error(f"Box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image; "
                           "coordinates are pixels of the original image. Redraw it (or fix the numbers).")


def plan(image: PIL.Image.Image, boxes: list, options: ViewOptions, start: int = 1) -> list[ViewPlan]:
    """plan_views_batch, with its errors (e.g. a zero-area box) naming the box, numbered from `start`."""
    check_boxes(boxes, image.size, start)
    try:
        return plan_views_batch(image, boxes, options)
    except BoxError as exc:
        raise gr.Error(box_error_message(boxes, exc, start)) from None
    except ValueError as exc:
        raise gr.Error(str(exc)) from None


def box_error_message(boxes: list, exc: BoxError, start: int = 1) -> str:
    """The planner's complaint about one box, numbered as the page numbers boxes (from `start`)."""
    box = ", ".join(f"{v:g}" for v in boxes[exc.index])
    return f"Box {start + exc.index} ({box}): {exc.reason}"


# ---------------------------------------------------------------------------------------------- rendering


def score_plot(view_plan: ViewPlan) -> Figure:
    """score(t) = Hamming(h_0, h_t) / t^alpha of the ten candidates; the chosen ones highlighted."""
    fig = Figure(figsize=(6.4, 3.8), dpi=110)
    ax = fig.subplots()
    cands = view_plan.candidates
    ax.plot([c.t for c in cands], [c.score for c in cands], "-o", color="#777777", lw=1.5, ms=5, label="candidate")
    chosen = [c for c in cands if c.selected]
    ax.scatter([c.t for c in chosen], [c.score for c in chosen], s=140, color=[v / 255 for v in CHOSEN], zorder=3,
               label="chosen")
    for c in cands:
        ax.annotate(f"H={c.hamming}", (c.t, c.score), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=8)
    ax.set_xticks([c.t for c in cands])
    ax.set_xlabel("t   (0 = the box, 1 = the whole image)")
    ax.set_ylabel("score")
    ax.set_title(f"score = Hamming(h_0, h_t) / t^{view_plan.alpha:g}   ·   strategy {view_plan.strategy}, "
                 f"hash {view_plan.hash_name}", fontsize=9)
    ax.margins(y=0.2)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def similarity_plot(similarity: list[dict]) -> Figure:
    """The match probability of each phrase with the region as a ranked bar chart (best match on top)."""
    ranked = sorted(similarity, key=lambda s: s["score"], reverse=True)
    fig = Figure(figsize=(5, 0.45 * len(ranked) + 0.9), dpi=110)
    ax = fig.subplots()
    ax.barh(range(len(ranked)), [s["score"] for s in ranked], color=["#1f77b4"] + ["#9ecae1"] * (len(ranked) - 1))
    ax.set_yticks(range(len(ranked)), [s["phrase"] for s in ranked], fontsize=9)
    ax.invert_yaxis()
    for k, item in enumerate(ranked):  # the value beside each bar: tiny probabilities stay readable
        ax.text(item["score"] + 0.02, k, f"{item['score']:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("match probability σ(s·e^τ + b) from D_rtc", fontsize=9)
    fig.tight_layout()
    return fig


def region_choices(boxes: list) -> list[tuple[str, int]]:
    return [(f"Box {i + 1}: ({', '.join(f'{v:.0f}' for v in box)})", i) for i, box in enumerate(boxes)]


# ---------------------------------------------------------------------------------------------- handlers


def on_views(value: dict | None, pick: int | None, *controls) -> tuple:
    """As soon as a box exists: nested views, candidate gallery and score plot of one box (no model run).

    `pick` is the box to inspect (None: the newest). A box being drawn has zero area for a moment, so here a bad
    box is explained in the note instead of a pop-up; Describe and the API raise gr.Error.
    """
    src, boxes = boxes_from_annotation(value)
    if src is None:
        return gr.update(choices=[], value=None), None, [], None, "_Upload an image or pick an example, then drag " \
            "on it to draw a box._"
    image = read_image(src)  # an unreadable upload is reported right away, before any box
    if not boxes:
        return gr.update(choices=[], value=None), None, [], None, "_Drag on the image to draw a box._"
    index = pick if isinstance(pick, int) and 0 <= pick < len(boxes) else len(boxes) - 1
    choices = gr.update(choices=region_choices(boxes), value=index)
    try:
        view_plan = plan(image, [boxes[index]], view_options(*controls), start=index + 1)[0]
    except gr.Error as exc:
        return choices, None, [], None, f"⚠️ {exc.message}"
    chosen = ", ".join(f"{t:.1f}" for t in view_plan.selected_ts)
    note = (f"**Box {index + 1} of {len(boxes)}** in a {image.width}x{image.height} image: the model looks at "
            f"t = {chosen} (yellow). Each candidate view grows from the box (t = 0) to the whole image (t = 1).")
    return choices, draw_views(image, view_plan), view_tiles(image, view_plan), score_plot(view_plan), note


def describe_json(loaded: LoadedModel, image: PIL.Image.Image, boxes: list, phrases: list[str],
                  options: dict) -> tuple[dict, list]:
    """Run the model on every box: the JSON of the API (and the download) plus the RegionResults."""
    if loaded.model is None:
        raise gr.Error(loaded.error or "No model is loaded.")
    if not boxes:
        raise gr.Error("No box: draw at least one box on the image (or pass boxes as [[x1, y1, x2, y2]]).")
    check_boxes(boxes, image.size)
    try:  # the one planning and rendering of this call
        results = run_describe(loaded.model, image, boxes, phrases, options)
    except BoxError as exc:
        raise gr.Error(box_error_message(boxes, exc)) from None
    except ValueError as exc:  # e.g. an n_views the model was not built for
        raise gr.Error(str(exc)) from None
    payload = {"model": loaded.to_dict(), "image_size": list(image.size), "regions": [r.to_dict() for r in results]}
    return payload, results


DOWNLOAD_MAX_AGE_S = 3600  # as Gradio's own cache (`delete_cache` below): Gradio serves its copy of the file
DOWNLOAD_PREFIX = "dynrefer-"  # what `prune_downloads` may delete: the JSON downloads `on_describe` writes


def prune_downloads(workdir: Path, max_age_s: float = DOWNLOAD_MAX_AGE_S) -> None:
    """Delete JSON downloads older than `max_age_s`, so that a long-running Space does not fill its disk."""
    cutoff = time.time() - max_age_s
    for old in workdir.glob(f"{DOWNLOAD_PREFIX}*.json"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except FileNotFoundError:  # another call pruned it first
            pass


def on_describe(loaded: LoadedModel, workdir: Path, value: dict | None, phrases: str, *controls) -> tuple:
    """'Describe' in the page: region cards (via the cards state), the annotated image, the JSON download."""
    src, boxes = boxes_from_annotation(value)
    image = read_image(src)
    payload, results = describe_json(loaded, image, boxes, parse_phrases(phrases), view_options(*controls))
    cards = [{"index": i + 1, "region": region, "crops": results[i].crops, "ts": results[i].plan.selected_ts}
             for i, region in enumerate(payload["regions"])]
    annotations = [(tuple(int(round(v)) for v in box), f"{i}: {region['caption']}")
                   for i, (box, region) in enumerate(zip(boxes, payload["regions"]), 1)]
    prune_downloads(workdir)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=DOWNLOAD_PREFIX, dir=workdir, delete=False) as f:
        json.dump(payload, f, indent=2)
    return (cards, gr.update(value=(image, annotations), visible=True), gr.update(value=f.name, visible=True),
            payload)


def api_describe(loaded: LoadedModel, image: Any, boxes: str, phrases: str = "", n_views: float = 3,
                 strategy: str = "phash", ts: str = "", hash_name: str = "dct", alpha: float = 1.0,
                 seed: float = 0) -> dict:
    """Caption, tags and phrase similarity of each box, with the views the model chose.

    image: the picture, at full resolution; boxes: a JSON list of [x1, y1, x2, y2] in its pixels; phrases:
    comma-separated. Returns {"model", "image_size", "regions": [RegionResult.to_dict(), ...]}.
    """
    options = view_options(n_views, strategy, ts, hash_name, alpha, seed)
    return describe_json(loaded, read_image(image), parse_boxes(boxes), parse_phrases(phrases), options)[0]


def api_plan_views(image: Any, boxes: str, n_views: float = 3, strategy: str = "phash", ts: str = "",
                   hash_name: str = "dct", alpha: float = 1.0, seed: float = 0) -> dict:
    """The nested views of each box: hashes, Hamming distances, scores and the chosen ones (no model run).

    Returns {"image_size", "regions": [ViewPlan.to_dict(), ...]}.
    """
    image = read_image(image)
    plans = plan(image, parse_boxes(boxes), view_options(n_views, strategy, ts, hash_name, alpha, seed))
    return {"image_size": list(image.size), "regions": [p.to_dict() for p in plans]}


# ---------------------------------------------------------------------------------------------- layout


def _load_examples() -> tuple[list, list]:
    """assets/examples.json -> (generated scenes, real photos) as [annotator value, phrases] rows."""
    index = ASSETS / "examples.json"
    if not index.exists():
        return [], []
    scenes, photos = [], []
    for ex in json.loads(index.read_text()):
        boxes = [{"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]} for b in ex.get("boxes", [])]
        row = [{"image": str(ASSETS / ex["image"]), "boxes": boxes[::-1]}, ex.get("phrases", "")]  # newest first
        (photos if ex.get("kind") == "photo" else scenes).append(row)
    return scenes, photos


def _accept_any_file(annotator: image_annotator) -> None:
    """Hand the handlers the uploaded file itself instead of the component's RGB re-encoding of it.

    `load_image` then reads it at full resolution in any mode (16-bit, float, CMYK, EXIF rotation), and an
    unreadable upload becomes a gr.Error that says so instead of a crash inside the component. Patched on this
    instance only (a subclass would lose the component's frontend); the boxes are parsed as before.
    """

    def preprocess(payload):
        if payload is None:
            return None
        return {"image": payload.image.path, "boxes": annotator.preprocess_boxes(payload.boxes),
                "orientation": payload.orientation}

    annotator.preprocess = preprocess


def _region_card(item: dict) -> None:
    """One region's results, side by side with the others: caption, views, tags, phrase similarity, timings."""
    region, ts = item["region"], item["ts"]
    with gr.Column(min_width=320, variant="panel", elem_classes=["region-card"]):
        caption = f"“{region['caption']}”" if region["caption"].strip() else "(the model produced an empty caption)"
        box = ", ".join(f"{v:.0f}" for v in region["box"])
        views = ", ".join(f"{t:.1f}" for t in ts)
        gr.Markdown(f"### Region {item['index']}\n**{caption}**  \ncaption probability {region['caption_score']:.3f}"
                    f" · box ({box}) · views t = {views}", elem_classes=["region-caption"])
        crop = item["crops"][0]
        gr.Markdown(f"What the model saw: {len(ts)} views, each resized to {crop.width}x{crop.height} px")
        gr.Gallery([(c, f"t={t:.1f}") for c, t in zip(item["crops"], ts)], columns=len(ts), height="auto",
                   show_label=False, elem_classes=["model-views"])
        tags = region["tags"]
        if tags:
            label = f"Tags ({len(tags)} above the threshold{'; top 8' if len(tags) > 8 else ''})"
            gr.Label({t["name"]: t["score"] for t in tags}, num_top_classes=8, show_heading=False, label=label,
                     elem_classes=["region-tags"])
        else:
            gr.Markdown("_No tag above the threshold._", elem_classes=["region-tags"])
        if region["similarity"]:
            gr.Plot(similarity_plot(region["similarity"]), label="Phrase similarity (ranked)",
                    elem_classes=["region-sim"])
        timings = " · ".join(f"{k} {v:.0f} ms" for k, v in region["timings"].items())
        gr.Markdown(f"<small>Timings of the whole call (all boxes at once): {timings}</small>")


def build_app(loaded: LoadedModel) -> gr.Blocks:
    """All components and their wiring; the only state is `loaded` and a folder for the JSON downloads."""
    # Removed with the app, or at the latest when the process exits.
    downloads = tempfile.TemporaryDirectory(prefix="dynrefer-demo-", ignore_cleanup_errors=True)
    workdir = Path(downloads.name)
    scenes, photos = _load_examples()
    model_n = loaded.model.config.n_views if loaded.model is not None else 3
    with gr.Blocks(title="DynRefer demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# DynRefer: region captions, tags and phrase similarity from dynamically chosen views\n"
                    "Draw one or more boxes. DynRefer looks at each region through **nested views** between the box "
                    "(t = 0) and the whole image (t = 1), picks those whose perceptual hash differs most from the "
                    "region's, and describes the region from them. The views show up as soon as you draw; "
                    "*Describe* runs the model.")
        gr.Markdown(loaded.banner(), elem_id="model-banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown("**Drag on the image to draw a box.** To add another, press C or the box button under "
                            "the image first; a selected box can be moved, resized or removed. Boxes are in pixels "
                            "of the full-resolution image, whatever size it is shown at.")
                annotator = image_annotator(label="Image", image_type="filepath", disable_edit_boxes=True,
                                            box_min_size=4, sources=["upload", "clipboard"], show_remove_button=True,
                                            height=560, elem_id="annotator")
                _accept_any_file(annotator)
                phrases = gr.Textbox(label="Phrases", info="comma-separated; each is scored against every region",
                                     placeholder="a red circle, a dog, the sky", elem_id="phrases")
                describe_btn = gr.Button("Describe", variant="primary", elem_id="describe")
                with gr.Tabs():
                    if scenes:
                        with gr.Tab("Examples: generated scenes"):
                            gr.Examples(scenes, [annotator, phrases], label="Held-out scenes like the ones the bundled "
                                        "model was trained on")
                    if photos:
                        with gr.Tab("Examples: real photos"):
                            gr.Examples(photos, [annotator, phrases], label="scikit-image's sample photos: the views "
                                        "work on anything; meaningful captions need the released DynRefer weights")
            with gr.Column(scale=2):
                with gr.Accordion("View selection", open=True):
                    n_views = gr.Slider(1, 6, value=model_n, step=1, label=f"Views per region n: t=0 plus n-1 chosen "
                                        f"(this model fuses n = {model_n}; other values only preview)")
                    strategy = gr.Radio(STRATEGIES, value="phash", label="Strategy")
                    ts_text = gr.Textbox(label=f"t values for 'fixed t' ({model_n - 1} for this model), then Enter",
                                         placeholder="0.3, 1.0", visible=False)
                    hash_name = gr.Dropdown(HASHES, value="dct", label="Hash function")
                    alpha = gr.Slider(0.0, 3.0, value=1.0, step=0.1,
                                      label="Discount exponent α (score = Hamming / t^α; 1 = the paper)")
                    seed = gr.Number(value=0, precision=0, label="Seed (random strategy)")
                pick = gr.Dropdown([], label="Region to inspect", elem_id="pick")
                views_note = gr.Markdown("_Upload an image or pick an example, then drag on it to draw a box._",
                                         elem_id="views-note")
        controls = [n_views, strategy, ts_text, hash_name, alpha, seed]

        gr.Markdown("## Views of the inspected box (no model run)")
        with gr.Row(equal_height=True):
            views_image = gr.Image(label="Nested views b_t on the image (chosen in yellow, the box in red)",
                                   type="pil", interactive=False, height=420, elem_id="views-image")
            plot = gr.Plot(label="Score versus t", elem_id="score-plot")
        gr.Markdown("Each tile: t, score, Hamming distance of its 64-bit hash h_t to the box's own hash h_0, and h_t "
                    "in hex. Framed in yellow: the views the model uses.")
        gallery = gr.Gallery(show_label=False, columns=6, height="auto", object_fit="contain", elem_id="candidates")

        gr.Markdown("## Results")
        cards = gr.State([])
        annotated = gr.AnnotatedImage(label="Every box and its caption", height=520, visible=False,
                                      elem_id="annotated")

        @gr.render(inputs=cards)
        def region_cards(items: list) -> None:
            if not items:
                gr.Markdown("_Draw boxes and press **Describe**: each region gets a card here._")
                return
            with gr.Row(equal_height=False):
                for item in items:
                    _region_card(item)

        download = gr.DownloadButton("Download everything as JSON", visible=False, elem_id="download")
        with gr.Accordion("Raw JSON (what the /describe API returns)", open=False):
            raw = gr.JSON(elem_id="raw-json")

        # Wiring. The page's own events stay out of the API docs; the documented API is /describe and /plan_views.
        view_outputs = [pick, views_image, gallery, plot, views_note]
        annotator.change(lambda value, *c: on_views(value, None, *c), [annotator, *controls], view_outputs,
                         api_visibility="undocumented", concurrency_limit=4)  # a new or moved box: the newest
        gr.on([pick.input, n_views.release, strategy.change, ts_text.submit, hash_name.change, alpha.release,
               seed.submit], on_views, [annotator, pick, *controls], view_outputs, api_visibility="undocumented",
              concurrency_limit=4)
        strategy.change(lambda s: gr.update(visible=s == "fixed"), strategy, ts_text, api_visibility="undocumented",
                        queue=False)
        describe_btn.click(functools.partial(on_describe, loaded, workdir), [annotator, phrases, *controls],
                           [cards, annotated, download, raw], api_visibility="undocumented",
                           concurrency_id="model", concurrency_limit=1)

        with gr.Column(visible=False):  # the inputs of the two API endpoints; not part of the page
            api_image = gr.File(label="image", file_types=["image"])
            api_boxes = gr.Textbox(label="boxes", info="JSON list of [x1, y1, x2, y2] in original-image pixels")
            api_phrases = gr.Textbox(label="phrases", value="", info="comma-separated")
            api_controls = [gr.Number(value=model_n, precision=0, label="n_views"),
                            gr.Textbox(value="phash", label="strategy"), gr.Textbox(value="", label="ts"),
                            gr.Textbox(value="dct", label="hash_name"), gr.Number(value=1.0, label="alpha"),
                            gr.Number(value=0, precision=0, label="seed")]
            api_out = gr.JSON()
            api_describe_btn, api_plan_btn = gr.Button(), gr.Button()
        api_describe_btn.click(functools.partial(api_describe, loaded), [api_image, api_boxes, api_phrases,
                                                                         *api_controls],
                               api_out, api_name="describe", concurrency_id="model", concurrency_limit=1)
        api_plan_btn.click(api_plan_views, [api_image, api_boxes, *api_controls], api_out, api_name="plan_views",
                           concurrency_limit=4)
    demo.queue(max_size=32)  # the model runs one call at a time (concurrency_id "model"); the rest wait in line
    demo.downloads = downloads  # lives as long as the app; its finaliser removes the folder
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 0)) or None,
                        help="port (default: 7860, or the next free one)")
    parser.add_argument("--checkpoint", default=os.environ.get("DYNREFER_CHECKPOINT") or None,
                        help="model folder or Hugging Face Hub id (default: $DYNREFER_CHECKPOINT, else "
                             f"{_short(DEFAULT_CHECKPOINT)})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the best available)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    args = parser.parse_args(argv)
    loaded = load_model(args.checkpoint, args.device)
    print(loaded.banner(), flush=True)
    # Spaces and Docker stop the app with SIGTERM, which would skip the exit handlers: exit normally instead,
    # so that the downloads' folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    build_app(loaded).launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)


if __name__ == "__main__":
    main()
