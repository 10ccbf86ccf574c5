"""'Describe everything': the proposer the app serves, and the handler and API endpoint that describe every
proposed region of an image (`DynRefer.describe_all`), best first."""
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from demo.handlers import (ROOT, LoadedModel, gpu, parse_phrases, prune_downloads, read_image, short_path,
                           view_options, DOWNLOAD_PREFIX)
from dynrefer_core.views import ViewOptions

DEFAULT_PROPOSER = ROOT / "checkpoints" / "proposer"
MAX_REGIONS = 30


@dataclass(frozen=True)
class LoadedProposer:
    """The box proposer of 'Describe everything', or why there is none (the rest of the app works without)."""

    proposer: Any
    source: str
    error: str | None = None

    def note(self) -> str:
        if self.error:
            return f"⛔ *Describe everything* is off: {self.error}"
        return f"*Describe everything* proposes boxes with `{self.source}`."


def load_proposer(spec: str | None = None) -> LoadedProposer:
    """`spec`: a proposer folder, `sam:MODEL_ID_OR_DIR` or `file:PROPOSALS.json` (default: the bundled
    checkpoints/proposer). Never raises, so the app always starts."""
    source = spec or short_path(DEFAULT_PROPOSER)
    try:
        from dynrefer_core.proposals import load_proposer as build

        return LoadedProposer(build(spec or str(DEFAULT_PROPOSER)), source)
    except Exception as exc:  # a missing or broken proposer: say so on the page
        return LoadedProposer(None, source, f"could not load the proposer `{source}` ({type(exc).__name__}: {exc}); "
                                            "start the app with `--proposer DIR` or `--proposer sam:facebook/sam-vit-base`")


@gpu
def run_describe_all(model: Any, proposer: Any, source: Any, phrases: list[str], max_regions: int,
                     options: ViewOptions) -> list:
    """The GPU-bound call of 'Describe everything' (module level, so that spaces.GPU can wrap it). `source`: the
    upload as given (a file proposer looks its boxes up by the file's name)."""
    return model.describe_all(source, proposer, phrases, max_regions=max_regions, views=options)


def check_ready(loaded: LoadedModel, proposer: LoadedProposer) -> None:
    if loaded.model is None:
        raise gr.Error(loaded.error or "No model is loaded.")
    if proposer.proposer is None:
        raise gr.Error(proposer.error)


def describe_all_json(loaded: LoadedModel, proposer: LoadedProposer, source: Any, image: PIL.Image.Image,
                      phrases: list[str], max_regions: float, options: ViewOptions) -> tuple[dict, list]:
    """The JSON of /describe_all (the /describe schema plus each region's objectness and confidence); `image`
    is `source` read (`read_image`), so that an unreadable upload is reported before the model runs."""
    check_ready(loaded, proposer)
    count = int(max_regions) if max_regions is not None else MAX_REGIONS
    if not 1 <= count <= 100:
        raise gr.Error(f"max_regions={max_regions}: ask for 1 to 100 regions.")
    try:
        results = run_describe_all(loaded.model, proposer.proposer, source, phrases, count, options)
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    payload = {"model": loaded.to_dict(), "proposer": proposer.source, "image_size": list(image.size),
               "regions": [r.to_dict() for r in results]}
    return payload, results


def on_describe_all(loaded: LoadedModel, proposer: LoadedProposer, workdir: Path, value: dict | None, phrases: str,
                    max_regions: float, *controls) -> tuple:
    """The page's 'Describe everything': the proposed boxes become the image's boxes (so any of them can be
    inspected like a drawn one), with region cards, the captions on the image, a table and the JSON download."""
    check_ready(loaded, proposer)
    src = (value or {}).get("image")
    image = read_image(src)
    payload, results = describe_all_json(loaded, proposer, src, image, parse_phrases(phrases), max_regions,
                                         view_options(*controls, config=loaded.config))
    regions = payload["regions"]
    cards = [{"index": i + 1, "region": region, "crops": r.crops, "ts": r.plan.selected_ts}
             for i, (region, r) in enumerate(zip(regions, results))]
    annotations = [(tuple(int(round(v)) for v in region["box"]), f"{i}: {region['caption']}")
                   for i, region in enumerate(regions, 1)]
    table = [[i, region["caption"], round(region["confidence"], 3), round(region["objectness"], 3),
              round(region["caption_score"], 3), ", ".join(f"{v:.0f}" for v in region["box"])]
             for i, region in enumerate(regions, 1)]
    # The annotator lists the newest box first and the page numbers boxes in drawing order.
    boxes = [{"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3], "label": str(i)}
             for i, b in reversed(list(enumerate((r["box"] for r in regions), 1)))]
    prune_downloads(workdir)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=DOWNLOAD_PREFIX, dir=workdir, delete=False) as f:
        json.dump(payload, f, indent=2)
    return ({"image": src, "boxes": boxes}, cards, gr.update(value=(image, annotations), visible=True),
            gr.update(value=table, visible=True), gr.update(value=f.name, visible=True), payload)


def api_describe_all(loaded: LoadedModel, proposer: LoadedProposer, image: Any, phrases: str = "",
                     max_regions: float = MAX_REGIONS) -> dict:
    """Describe every region the proposer finds, best first (confidence = caption probability x objectness).

    Returns {"model", "proposer", "image_size", "regions": [RegionResult.to_dict() + objectness, confidence]}.
    """
    check_ready(loaded, proposer)  # before reading the upload
    return describe_all_json(loaded, proposer, image, read_image(image), parse_phrases(phrases), max_regions,
                             ViewOptions())[0]


# ---------------------------------------------------------------------------------------------- point prompts
@dataclass(frozen=True)
class LoadedSam:
    """SAM for point prompts (`--sam`), or why there is none."""

    prompt: Any
    source: str | None
    error: str | None = None

    def note(self) -> str:
        if self.prompt is None and self.source is None:
            return ("Point prompts are off: start the app with `--sam facebook/sam-vit-base` (or a folder holding a "
                    "SamModel) to box a region by clicking on it.")
        if self.error:
            return f"⛔ Point prompts are off: {self.error}"
        return f"Click on the image below: SAM (`{self.source}`) boxes the region under the point."


def load_sam(spec: str | None) -> LoadedSam:
    """SAM from a Hub id or folder; never raises, so the app always starts."""
    if not spec:
        return LoadedSam(None, None)
    from dynrefer_core.prompts import SamPointPrompt

    try:
        return LoadedSam(SamPointPrompt(spec), spec)
    except Exception as exc:
        return LoadedSam(None, spec, str(exc))


def on_point(sam: LoadedSam, value: dict | None, evt: gr.SelectData) -> dict:
    """A click on the point image: SAM's box for that point joins the image's boxes (as the newest)."""
    if sam.prompt is None:
        raise gr.Error(sam.note())
    if not value or value.get("image") is None:
        raise gr.Error("No image: upload one first.")
    x, y = evt.index
    try:
        box = sam.prompt(read_image(value["image"]), (x, y))
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    boxes = list(value.get("boxes") or [])
    new = {"xmin": box[0], "ymin": box[1], "xmax": box[2], "ymax": box[3], "label": str(len(boxes) + 1)}
    return {**value, "boxes": [new, *boxes]}  # the annotator lists the newest box first
