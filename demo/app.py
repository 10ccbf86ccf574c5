"""DynRefer demo: draw boxes, see which nested views the model picks and why, get captions, tags and similarity.

    python demo/app.py [--host 127.0.0.1] [--port 7860] [--checkpoint DIR_OR_HUB_ID] [--device cpu|cuda]
                       [--proposer DIR | sam:MODEL | file:JSON] [--sam MODEL_ID_OR_DIR] [--share]

The app is a thin view over the library: `plan_views_batch` gives the ViewPlans (the nested views b_t, their
hashes h_t, Hamming distances and scores), `DynRefer.describe` gives RegionResults. This file is the page (layout,
wiring, launch); demo/handlers.py turns input into those results or into messages a person can act on
(gr.Error), demo/everything.py does the same for 'Describe everything', and demo/figures.py plots them.

API (documented in the README):
- `/describe` (image, boxes as JSON [[x1, y1, x2, y2], ...], phrases "a, b") -> {"model", "image_size", "regions"}
- `/plan_views` (image, boxes) -> {"image_size", "regions": [ViewPlan.to_dict(), ...]}, no model run.
- `/describe_all` (image, phrases, max_regions) -> the /describe JSON of every proposed region, best first, each
  with its `objectness` and `confidence`.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python demo/app.py` from a fresh clone or a Space, without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402
from gradio_image_annotation import image_annotator  # noqa: E402

from demo import handlers  # noqa: E402  (before anything that imports torch: it imports ZeroGPU's `spaces`)
from demo import everything  # noqa: E402
from demo.figures import similarity_plot  # noqa: E402

ASSETS = ROOT / "assets"
STRATEGIES = [("pHASH (the method, image prior)", "phash"), ("fixed t", "fixed"),
              ("random (training sampler)", "random")]  # then the loaded model's task priors, if it has any
HASHES = [("DCT 8x8 (the method's pHASH)", "dct"), ("imagehash phash", "phash"), ("imagehash dhash", "dhash"),
          ("imagehash whash", "whash"), ("imagehash average_hash", "average_hash")]
CSS = """
.region-card {min-width: 320px; max-width: 720px}
.model-views .grid-wrap {min-height: 0 !important}  /* the Gallery reserves 450 px; three crops need one row */
"""


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
    """One region's results, side by side with the others: caption, views (and how the box was rounded into
    them), tags, phrase similarity, timings."""
    region, ts = item["region"], item["ts"]
    with gr.Column(min_width=320, variant="panel", elem_classes=["region-card"]):
        caption = f"“{region['caption']}”" if region["caption"].strip() else "(the model produced an empty caption)"
        box = ", ".join(f"{v:.0f}" for v in region["box"])
        views = ", ".join(f"{t:.1f}" for t in ts)
        gr.Markdown(f"### Region {item['index']}\n**{caption}**  \ncaption probability {region['caption_score']:.3f}"
                    f" · box ({box}) · views t = {views} · box rounding: {region['box_rounding']}",
                    elem_classes=["region-caption"])
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


def build_app(loaded: handlers.LoadedModel, proposer: everything.LoadedProposer | None = None,
              sam: everything.LoadedSam | None = None) -> gr.Blocks:
    """All components and their wiring; the only state is `loaded`, `proposer` (for 'Describe everything'),
    `sam` (point prompts) and a folder for the JSON downloads."""
    proposer = proposer or everything.LoadedProposer(None, "none", "no proposer was given")
    sam = sam or everything.LoadedSam(None, None)
    # Removed with the app, or at the latest when the process exits.
    downloads = tempfile.TemporaryDirectory(prefix="dynrefer-demo-", ignore_cleanup_errors=True)
    workdir = Path(downloads.name)
    scenes, photos = _load_examples()
    model_n = loaded.model.config.n_views if loaded.model is not None else 3
    config = loaded.config
    study = loaded.view_study()
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
                with gr.Row():
                    describe_btn = gr.Button("Describe", variant="primary", elem_id="describe")
                    everything_btn = gr.Button("Describe everything", elem_id="describe-all",
                                               interactive=proposer.proposer is not None)
                    max_regions = gr.Slider(1, 100, value=everything.MAX_REGIONS, step=1, label="At most (regions)",
                                            elem_id="max-regions")
                gr.Markdown(f"<small>{proposer.note()} Its boxes replace yours; pick any of them below to inspect "
                            "its views.</small>")
                with gr.Accordion("Point prompts (SAM)", open=sam.prompt is not None):
                    gr.Markdown(f"<small>{sam.note()}</small>", elem_id="sam-note")
                    point_image = gr.Image(label="Click a point", type="filepath", interactive=False, height=300,
                                           visible=sam.prompt is not None, elem_id="point-image")
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
                    priors = handlers.task_prior_choices(config)
                    strategy = gr.Radio(STRATEGIES + priors, value="phash", label="Strategy", elem_id="strategy",
                                        info=("task priors: the views this model's view study measured best for "
                                              "each task (docs/view-study.md)") if priors else None)
                    ts_text = gr.Textbox(label=f"t values for 'fixed t' ({model_n - 1} for this model), then Enter",
                                         placeholder="0.3, 1.0", visible=False)
                    hash_name = gr.Dropdown(HASHES, value="dct", label="Hash function")
                    alpha = gr.Slider(0.0, 3.0, value=1.0, step=0.1,
                                      label="Discount exponent α (score = Hamming / t^α; 1 = the paper)")
                    seed = gr.Number(value=0, precision=0, label="Seed (random strategy)")
                    rounding = gr.Radio([handlers.MODEL_ROUNDING, "exact", "reference"], value=handlers.MODEL_ROUNDING,
                                        label="Box inside each view (for Describe): the model's setting, the exact "
                                              "formula, or the release's integer truncation", elem_id="box-rounding")
                pick = gr.Dropdown([], label="Region to inspect", elem_id="pick")
                views_note = gr.Markdown("_Upload an image or pick an example, then drag on it to draw a box._",
                                         elem_id="views-note")
        controls = [n_views, strategy, ts_text, hash_name, alpha, seed, rounding]

        gr.Markdown("## Views of the inspected box (no model run)")
        with gr.Row(equal_height=True):
            views_image = gr.Image(label="Nested views b_t on the image (chosen in yellow, the box in red)",
                                   type="pil", interactive=False, height=420, elem_id="views-image")
            plot = gr.Plot(label="Score versus t", elem_id="score-plot")
        if study is not None:
            study_plot = gr.Plot(label="View study of this model (from its folder): each task's metric vs t of view "
                                       "two, 95% intervals; pHASH dashed", show_label=False, elem_id="study-plot",
                                 value=handlers.on_study(study, None, None))  # the figure's title says it all
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

        table = gr.Dataframe(headers=["#", "caption", "confidence", "objectness", "caption probability", "box"],
                             label="Every proposed region, by confidence (caption probability x objectness)",
                             visible=False, interactive=False, wrap=True, elem_id="regions-table")
        download = gr.DownloadButton("Download everything as JSON", visible=False, elem_id="download")
        with gr.Accordion("Raw JSON (what the /describe API returns)", open=False):
            raw = gr.JSON(elem_id="raw-json")

        # Wiring. The page's own events stay out of the API docs; the documented API is /describe and /plan_views.
        view_outputs = [pick, views_image, gallery, plot, views_note]
        new_box = annotator.change(lambda value, *c: handlers.on_views(value, None, *c, config=config),
                                   [annotator, *controls], view_outputs, api_visibility="undocumented",
                                   concurrency_limit=4)  # a new or moved box: the newest
        view_events = [pick.input, n_views.release, strategy.change, ts_text.submit, hash_name.change, alpha.release,
                       seed.submit]
        new_views = gr.on(view_events, lambda value, pick, *c: handlers.on_views(value, pick, *c, config=config),
                          [annotator, pick, *controls], view_outputs, api_visibility="undocumented", concurrency_limit=4)
        if study is not None:  # after the views (which matter first), not competing with them for the CPU
            for event in (new_box, new_views):
                event.then(lambda value, pick, *c: handlers.on_study(study, value, pick, *c, config=config),
                           [annotator, pick, *controls], study_plot, api_visibility="undocumented")
        strategy.change(lambda s: gr.update(visible=s == "fixed"), strategy, ts_text, api_visibility="undocumented",
                        queue=False)
        describe_btn.click(functools.partial(handlers.on_describe, loaded, workdir), [annotator, phrases, *controls],
                           [cards, annotated, download, raw], api_visibility="undocumented",
                           concurrency_id="model", concurrency_limit=1)
        if sam.prompt is not None:
            annotator.change(lambda value: (value or {}).get("image"), annotator, point_image,
                             api_visibility="undocumented", queue=False)
            def on_point(value: dict | None, evt: gr.SelectData) -> dict:  # Gradio sees the event in the signature
                return everything.on_point(sam, value, evt)

            point_image.select(on_point, annotator, annotator, api_visibility="undocumented",
                               concurrency_id="model", concurrency_limit=1)
        everything_btn.click(functools.partial(everything.on_describe_all, loaded, proposer, workdir),
                             [annotator, phrases, max_regions, *controls],
                             [annotator, cards, annotated, table, download, raw], api_visibility="undocumented",
                             concurrency_id="model", concurrency_limit=1)

        with gr.Column(visible=False):  # the inputs of the two API endpoints; not part of the page
            api_image = gr.File(label="image", file_types=["image"])
            api_boxes = gr.Textbox(label="boxes", info="JSON list of [x1, y1, x2, y2] in original-image pixels")
            api_phrases = gr.Textbox(label="phrases", value="", info="comma-separated")
            api_controls = [gr.Number(value=model_n, precision=0, label="n_views"),
                            gr.Textbox(value="phash", label="strategy"), gr.Textbox(value="", label="ts"),
                            gr.Textbox(value="dct", label="hash_name"), gr.Number(value=1.0, label="alpha"),
                            gr.Number(value=0, precision=0, label="seed")]
            api_rounding = gr.Textbox(value="", label="box_rounding")
            api_task = gr.Textbox(value="", label="task")
            api_max_regions = gr.Number(value=everything.MAX_REGIONS, precision=0, label="max_regions")
            api_out = gr.JSON()
            api_describe_btn, api_plan_btn, api_all_btn = gr.Button(), gr.Button(), gr.Button()
        api_describe_btn.click(functools.partial(handlers.api_describe, loaded),
                               [api_image, api_boxes, api_phrases, *api_controls, api_rounding, api_task], api_out,
                               api_name="describe", concurrency_id="model", concurrency_limit=1)
        api_plan_btn.click(handlers.api_plan_views, [api_image, api_boxes, *api_controls], api_out,
                           api_name="plan_views", concurrency_limit=4)
        api_all_btn.click(functools.partial(everything.api_describe_all, loaded, proposer),
                          [api_image, api_phrases, api_max_regions], api_out, api_name="describe_all",
                          concurrency_id="model", concurrency_limit=1)
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
                             f"{handlers.short_path(handlers.DEFAULT_CHECKPOINT)})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the best available)")
    parser.add_argument("--proposer", default=os.environ.get("DYNREFER_PROPOSER") or None,
                        help="boxes for 'Describe everything': a proposer folder, sam:MODEL_ID_OR_DIR or file:JSON "
                             f"(default: $DYNREFER_PROPOSER, else {handlers.short_path(everything.DEFAULT_PROPOSER)})")
    parser.add_argument("--sam", default=os.environ.get("DYNREFER_SAM") or None,
                        help="point prompts: a SAM Hub id (facebook/sam-vit-base) or folder (default: $DYNREFER_SAM; off)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    args = parser.parse_args(argv)
    loaded = handlers.load_model(args.checkpoint, args.device)
    proposer = everything.load_proposer(args.proposer)
    sam = everything.load_sam(args.sam)
    print(loaded.banner(), proposer.note(), sam.note(), sep="\n", flush=True)
    # Spaces and Docker stop the app with SIGTERM, which would skip the exit handlers: exit normally instead,
    # so that the downloads' folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    build_app(loaded, proposer, sam).launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)


if __name__ == "__main__":
    main()
