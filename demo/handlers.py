"""What the demo does behind its page: the model it serves, reading the user's input, and one function per event
and API endpoint.

Each function takes plain values (the components' values) and returns plain values or raises gr.Error with a
message a person can act on, so that tests/test_app.py calls them without a server.
"""
from __future__ import annotations

import json
import os
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


import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from demo.figures import score_plot  # noqa: E402
from dynrefer_core.config import DynReferConfig  # noqa: E402
from dynrefer_core.modeling.dynrefer import DynRefer  # noqa: E402
from dynrefer_core.runtime import choose_device  # noqa: E402
from dynrefer_core.view_study import load_view_study, sweep_figure  # noqa: E402
from dynrefer_core.views import (BoxError, ImageLoadError, ViewOptions, ViewPlan, draw_views,  # noqa: E402
                                 load_image, plan_views_batch, view_tiles)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "mini"


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

    @property
    def config(self) -> Any:
        """The model's DynReferConfig (None without a model)."""
        return None if self.model is None else self.model.config

    def view_study(self) -> dict | None:
        """The view-study sweep the checkpoint folder carries (`view_study.load_view_study`), if any."""
        folder = DEFAULT_CHECKPOINT if self.bundled else Path(self.source)
        return load_view_study(folder) if self.model is not None and folder.is_dir() else None

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
            return (f"⚠️ **Random weights.** No trained checkpoint was found at "
                    f"`{short_path(DEFAULT_CHECKPOINT)}`, so this is a randomly initialised `DynReferConfig.tiny()` "
                    f"model on `{self.device}` ({self.summary()}). The view selection is real; captions, tags and "
                    "similarities are noise. Start the app with `--checkpoint DIR_OR_HUB_ID` to load trained weights.")
        text = f"**Model:** `{self.source}` on `{self.device}` ({self.summary()})."
        if self.bundled:
            text += ("  \nThis is the bundled **DynRefer-mini**, trained here from scratch on generated scenes of 10 "
                     "shapes, 8 colours, 4 patterns and 3 sizes (its scores are in the README). It describes every "
                     "region in those words (of the neighbour each caption ends with, where it lies and its colour "
                     "are mostly right, its shape about two times in five): try the generated examples, and load the "
                     "released weights with `--checkpoint` for photos.")
        return text


def short_path(path: Path | str) -> str:
    """`path` relative to the repository if it lies inside it: what the page and --help show."""
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
    source = checkpoint if checkpoint is not None else short_path(DEFAULT_CHECKPOINT)
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


MODEL_ROUNDING = "model's setting"


def view_options(n_views: float, strategy: str, ts_text: str | None, hash_name: str, alpha: float,
                 seed: float | None, box_rounding: str | None = None, task: str | None = None,
                 config: Any = None) -> ViewOptions:
    """The view controls as the ViewOptions of plan_views_batch and DynRefer.describe (`box_rounding`: "exact",
    "reference", or empty / MODEL_ROUNDING for the loaded model's setting). A task prior (`strategy` "task"
    with `task`, or the page's "task:captioning") is resolved with `config`, the loaded model's."""
    if strategy.startswith("task:"):
        strategy, task = "task", strategy.split(":", 1)[1]
    ts = parse_ts(ts_text) if strategy == "fixed" else None
    if strategy == "fixed" and not ts:
        raise gr.Error("The 'fixed t' strategy needs t values, e.g. '0.3, 1.0' (0 = the box, 1 = the whole image).")
    rounding = None if box_rounding in (None, "", MODEL_ROUNDING) else box_rounding
    try:
        if strategy == "task":
            if config is None:
                raise ValueError("task priors come from the loaded model, and no model is loaded")
            return ViewOptions(strategy="task", task=task or None, hash_name=hash_name, alpha=float(alpha),
                               box_rounding=rounding).resolve(config)
        return ViewOptions(n_views=len(ts) + 1 if ts else int(n_views), strategy=strategy, ts=ts,
                           hash_name=hash_name, alpha=float(alpha), seed=None if seed is None else int(seed),
                           box_rounding=rounding)
    except ValueError as exc:
        raise gr.Error(str(exc)) from None


def task_prior_choices(config: Any) -> list[tuple[str, str]]:
    """The Strategy choices of the loaded model's task priors: ("task prior: captioning (t = 0, 0.3)", ...)."""
    priors = getattr(config, "task_priors", None) or {}
    return [(f"task prior: {task} (" + ("pHASH: no fixed view measured better" if ts == "phash" else
                                        f"t = 0, {', '.join(f'{t:g}' for t in ts)}") + ")", f"task:{task}")
            for task, ts in priors.items()]


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


# ---------------------------------------------------------------------------------------------- handlers


def inspected_index(pick: int | None, boxes: list) -> int:
    """The box to inspect: the picked one if it exists, else the newest."""
    return pick if isinstance(pick, int) and 0 <= pick < len(boxes) else len(boxes) - 1


def region_choices(boxes: list) -> list[tuple[str, int]]:
    """The "Region to inspect" choices: (label, index) per box, numbered from 1 as on the page."""
    return [(f"Box {i + 1}: ({', '.join(f'{v:.0f}' for v in box)})", i) for i, box in enumerate(boxes)]


def on_views(value: dict | None, pick: int | None, *controls, config: Any = None) -> tuple:
    """As soon as a box exists: nested views, candidate gallery and score plot of one box (no model run).

    `pick` is the box to inspect (None: the newest). A box being drawn has zero area for a moment, so here a bad
    box is explained in the note instead of a pop-up; Describe and the API raise gr.Error. `config`: the loaded
    model's, for its task priors.
    """
    src, boxes = boxes_from_annotation(value)
    if src is None:
        return gr.update(choices=[], value=None), None, [], None, "_Upload an image or pick an example, then drag " \
            "on it to draw a box._"
    image = read_image(src)  # an unreadable upload is reported right away, before any box
    if not boxes:
        return gr.update(choices=[], value=None), None, [], None, "_Drag on the image to draw a box._"
    index = inspected_index(pick, boxes)
    choices = gr.update(choices=region_choices(boxes), value=index)
    try:
        view_plan = plan(image, [boxes[index]], view_options(*controls, config=config), start=index + 1)[0]
    except gr.Error as exc:
        return choices, None, [], None, f"⚠️ {exc.message}"
    chosen = ", ".join(f"{t:.1f}" for t in view_plan.selected_ts)
    note = (f"**Box {index + 1} of {len(boxes)}** in a {image.width}x{image.height} image: the model looks at "
            f"t = {chosen} (yellow). Each candidate view grows from the box (t = 0) to the whole image (t = 1).")
    return choices, draw_views(image, view_plan), view_tiles(image, view_plan), score_plot(view_plan), note


def on_study(study: dict, value: dict | None, pick: int | None, *controls, config: Any = None):
    """The model's view study (one panel per task: metric vs t of view two, pHASH dashed), with the views
    chosen for the inspected box as dotted lines: where they fall on each task's curve."""
    marks: list[float] = []
    src, boxes = boxes_from_annotation(value)
    if src is not None and boxes:
        index = inspected_index(pick, boxes)
        try:
            marks = plan(read_image(src), [boxes[index]], view_options(*controls, config=config))[0].selected_ts[1:]
        except gr.Error:
            marks = []  # on_views explains the problem in its note
    where = f"{study.get('settings', {}).get('split', '?')} split, {study.get('n_regions', '?')} regions"
    return sweep_figure(study, marks=marks, title=f"View study of this model ({where}): view two fixed at t; dotted: "
                                                  "the views chosen for the inspected box")


def describe_json(loaded: LoadedModel, image: PIL.Image.Image, boxes: list, phrases: list[str],
                  options: ViewOptions) -> tuple[dict, list]:
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


DOWNLOAD_MAX_AGE_S = 3600  # as Gradio's own cache (build_app's `delete_cache`): Gradio serves its copy
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
    payload, results = describe_json(loaded, image, boxes, parse_phrases(phrases),
                                     view_options(*controls, config=loaded.config))
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
                 seed: float = 0, box_rounding: str = "", task: str = "") -> dict:
    """Caption, tags and phrase similarity of each box, with the views the model chose.

    image: the picture, at full resolution; boxes: a JSON list of [x1, y1, x2, y2] in its pixels; phrases:
    comma-separated; strategy: "phash", "fixed" (with ts), "random" or "task" (with task: "captioning",
    "dense", "attributes" or "recognition", the model's task prior); box_rounding: "exact" or "reference"
    (default: the model's setting). Returns {"model", "image_size", "regions": [RegionResult.to_dict(), ...]}.
    """
    options = view_options(n_views, strategy, ts, hash_name, alpha, seed, box_rounding, task or None, loaded.config)
    return describe_json(loaded, read_image(image), parse_boxes(boxes), parse_phrases(phrases), options)[0]


def api_plan_views(image: Any, boxes: str, n_views: float = 3, strategy: str = "phash", ts: str = "",
                   hash_name: str = "dct", alpha: float = 1.0, seed: float = 0) -> dict:
    """The nested views of each box: hashes, Hamming distances, scores and the chosen ones (no model run).

    Returns {"image_size", "regions": [ViewPlan.to_dict(), ...]}.
    """
    image = read_image(image)
    plans = plan(image, parse_boxes(boxes), view_options(n_views, strategy, ts, hash_name, alpha, seed))
    return {"image_size": list(image.size), "regions": [p.to_dict() for p in plans]}
