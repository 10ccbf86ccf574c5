"""Inference: an image and boxes in, one `RegionResult` per box out (the "predictor" of DynRefer).

Two halves, as segment-anything splits `predict` from `predict_torch`:
- `prepare` (views/rendering.py): the CPU side, plans the nested views of every box and renders them;
- `describe_views`: the tensor side, for any batch of regions from one image or many: z = encode_regions,
  D_tag (tags above a threshold), D_rtc (phrases and class prompts) and D_llm (a caption steered by the
  control string of the predicted tags), under `torch.inference_mode` and the model's autocast.
`describe` chains the two; `evaluate`, the trainer's tag calibration and batch tools call `describe_views`.

Scores:
- tags: sigma(tag logit), kept above `tag_threshold` (config default 0.7; the release's demo 0.76).
- similarity of a phrase: sigma(s * exp(t) + b), the D_rtc score s calibrated with the learned SigLIP scale
  and bias, i.e. the probability the model was trained to output for a matching region-text pair. (The
  release scores attributes with sigma(s), ignoring t and b; that ranks identically but its values sit near
  0.5-0.7 for everything, which reads poorly as a similarity.)
- class_scores: the same calibrated probability for "the {class}"; category = the argmax (as released).
- caption_score: exp(beam sequences_scores), the caption's probability under length_penalty 0.
Controls: user controls first, then predicted tags by descending score, de-duplicated; the release uses a
Python set, whose order changes between processes.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from .modeling.language import control_string
from .views import ViewOptions, ViewPlan, load_image, prepare
from .vocab import class_prompt


@dataclass
class RegionResult:
    """Everything the model says about one region. `timings` (ms) are for the whole call (all boxes
    are processed together), per stage: views, vision, heads, caption, total. `crops` are the S x S
    views the model saw (not part of `to_dict`)."""

    box: tuple[float, float, float, float]
    plan: ViewPlan
    caption: str
    caption_score: float
    tags: list[tuple[str, float]]
    similarity: list[tuple[str, float]]
    category: str | None = None
    class_scores: list[tuple[str, float]] = field(default_factory=list)
    control: str = "|"
    box_rounding: str = "exact"
    timings: dict[str, float] = field(default_factory=dict)
    crops: list[Image.Image] = field(default_factory=list, repr=False)
    objectness: float | None = None  # describe_all: the proposer's score of the box
    confidence: float | None = None  # describe_all: how sure the whole answer is (see automatic.py)

    def to_dict(self) -> dict:
        out = {
            "box": [float(v) for v in self.box],
            # Every scored view (t = 0 and all candidates), flagged `selected`, so a client sees why the chosen
            # ones won; `selected_ts` gives the model's order of the n views.
            "views": [v.to_dict() for v in self.plan.all_views],
            "selected_ts": list(self.plan.selected_ts),
            "box_rounding": self.box_rounding,
            "caption": self.caption,
            "caption_score": float(self.caption_score),
            "tags": [{"name": n, "score": float(s)} for n, s in self.tags],
            "similarity": [{"phrase": p, "score": float(s)} for p, s in self.similarity],
            "control": self.control,
            "timings": {k: float(v) for k, v in self.timings.items()},
        }
        if self.category is not None:
            out["category"] = self.category
            out["class_scores"] = [{"name": n, "score": float(s)} for n, s in self.class_scores]
        for key in ("objectness", "confidence"):
            if getattr(self, key) is not None:
                out[key] = float(getattr(self, key))
        return out


@dataclass
class RegionOutputs:
    """What the model says about N regions (`describe_views`), in region order.

    tags: per region (name, sigma) above the threshold, by descending score. similarity (N, P), class_scores
    (N, C): calibrated probabilities sigma(s e^t + b) of the phrases and of the class prompts "the {class}";
    attribute_scores (N, A): the release's max-over-prompts sigma(s). Captions are empty when not asked for.
    """

    tag_probs: torch.Tensor
    tags: list[list[tuple[str, float]]]
    controls: list[str]
    captions: list[str]
    caption_scores: list[float]
    similarity: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    class_scores: torch.Tensor | None = None
    attribute_scores: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tags)


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.times = {"views": 0.0, "vision": 0.0, "heads": 0.0, "caption": 0.0}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self.last) * 1000.0
        self.last = now


def threshold_tags(probs: torch.Tensor, names: Sequence[str], threshold: float) -> list[list[tuple[str, float]]]:
    """Per row of (N, V) tag probabilities: the (name, score) pairs above `threshold`, best first."""
    out = []
    for row in probs.float().cpu():
        keep = torch.nonzero(row > threshold).flatten()
        order = keep[torch.argsort(row[keep], descending=True, stable=True)]
        out.append([(names[i], float(row[i])) for i in order.tolist()])
    return out


def check_tag_threshold(model, tag_threshold: float | None) -> float:
    threshold = model.config.tag_threshold if tag_threshold is None else float(tag_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"tag_threshold={threshold} must lie in [0, 1]")
    return threshold


def describe_views(model, pixel_values: torch.Tensor, boxes: torch.Tensor, *, phrases: Sequence[str] = (),
                   controls: Sequence[str] = (), tag_threshold: float | None = None,
                   classes: Sequence[str] | None = None, attributes: bool = False, captions: bool = True,
                   batch_size: int = 32, decoder: str = "fast", **generation) -> RegionOutputs:
    """The model-side step for N regions: views (N, n, 3, S, S) and per-view boxes (N, n, 4) (`prepare`).

    `phrases`: free texts scored against every region. `controls`: words put before the predicted tags in
    every caption control. `classes`: the names to recognise (default: the vocabulary's, whose prompts are
    embedded already). `attributes`: also score the vocabulary's attributes. `captions=False` skips D_llm.
    `generation`: overrides of the beam-search settings (num_beams, max_new_tokens, ...). `decoder`: "fast"
    (our static-cache beam search, CUDA graphs on CUDA) or "hf" (transformers' `generate`); same captions.
    """
    threshold = check_tag_threshold(model, tag_threshold)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    phrases = [p.strip() for p in phrases if p and p.strip()]
    names = model.vocabulary.tags
    class_names = list(model.vocabulary.classes if classes is None else classes)
    clock = _Clock(model.device)
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("probs", "sims", "cls", "attr", "captions", "scores")}
    try:
        with torch.inference_mode(), model.autocast():
            phrase_embeds = model.text_encoder.encode(phrases).to(model.device) if phrases else None
            class_embeds = model.class_embeds if classes is None else (
                model.text_encoder.encode([class_prompt(c) for c in class_names]).to(model.device))
            clock.lap("heads")
            tags, control = [], []
            for start in range(0, pixel_values.shape[0], batch_size):
                z = model.encode_regions(pixel_values[start:start + batch_size], boxes[start:start + batch_size])
                clock.lap("vision")
                probs = model.tag_scores(z).float().cpu()
                parts["probs"].append(probs)
                if phrase_embeds is not None:
                    parts["sims"].append(model.match_probabilities(z, phrase_embeds).cpu())
                if class_names:
                    parts["cls"].append(model.match_probabilities(z, class_embeds).cpu())
                if attributes:
                    parts["attr"].append(model.attribute_scores(z).float().cpu())
                chunk_tags = threshold_tags(probs, names, threshold)
                chunk_control = [control_string([*controls, *(n for n, _ in t)]) for t in chunk_tags]
                tags += chunk_tags
                control += chunk_control
                clock.lap("heads")
                if captions:
                    texts, scores = model.generate_captions(z, chunk_control, decoder=decoder, **generation)
                    parts["captions"] += texts
                    parts["scores"] += [float(s) for s in scores]
                    clock.lap("caption")
    finally:
        model.train(was_training)

    def cat(key: str) -> torch.Tensor | None:
        return torch.cat(parts[key]) if parts[key] else None

    n = pixel_values.shape[0]
    return RegionOutputs(
        tag_probs=cat("probs") if n else torch.zeros(0, len(names)), tags=tags, controls=control,
        captions=parts["captions"], caption_scores=parts["scores"], similarity=cat("sims"), classes=class_names,
        class_scores=cat("cls"), attribute_scores=cat("attr"), timings=dict(clock.times))


def describe(model, image, boxes: Sequence[Sequence[float]], phrases: Sequence[str] = (), *,
             views: ViewOptions | None = None, strategy: str | None = None, task: str | None = None,
             tag_threshold: float | None = None, controls: Sequence[str] = (), top_classes: int = 5,
             batch_size: int = 32, decoder: str = "fast", **generation) -> list[RegionResult]:
    """Describe each box (x1, y1, x2, y2, image pixels) of `image` (path, bytes, PIL or array).

    `views`: how the views are chosen and rendered (default: pHASH, the model's n and box rounding).
    `strategy`, `task`: shortcuts that override those of `views`; `strategy="task", task="attributes"` uses
    the views the model's view study measured best for that task (docs/view-study.md).
    See `describe_views` for the other arguments.
    """
    config = model.config
    views = views or ViewOptions()
    if strategy is not None or task is not None:
        views = dataclasses.replace(views, strategy=strategy or views.strategy, task=task,
                                    ts=None if (strategy or views.strategy) == "task" else views.ts)
    views = views.resolve(config)
    if views.n_views != config.n_views:
        raise ValueError(f"n_views={views.n_views}, but this model fuses exactly {config.n_views} views")
    check_tag_threshold(model, tag_threshold)
    if not boxes:
        return []
    start = time.perf_counter()
    rendered = prepare(load_image(image), boxes, views, config.image_size)
    views_ms = (time.perf_counter() - start) * 1000.0
    out = describe_views(model, rendered.pixel_values, rendered.boxes, phrases=phrases, controls=controls,
                         tag_threshold=tag_threshold, batch_size=batch_size, decoder=decoder, **generation)
    timings = {"views": views_ms, **{k: v for k, v in out.timings.items() if k != "views"}}
    timings["total"] = sum(timings.values())
    return region_results(rendered.plans, out, phrases, box_rounding=rendered.box_rounding, top_classes=top_classes,
                          crops=rendered.crops, timings=timings)


def region_results(plans: Sequence[ViewPlan], out: RegionOutputs, phrases: Sequence[str] = (), *,
                   box_rounding: str, top_classes: int = 5, crops: Sequence[list[Image.Image]] | None = None,
                   timings: dict[str, float] | None = None) -> list[RegionResult]:
    """One RegionResult per region of `describe_views`'s answer. `out.similarity` columns are `phrases` (the
    cleaned list describe_views scored); `crops`, `timings`: what describe measured, if anything."""
    phrases = [p.strip() for p in phrases if p and p.strip()]
    results = []
    for i, plan in enumerate(plans):
        category, class_scores = None, []
        if out.class_scores is not None:
            top = torch.argsort(out.class_scores[i], descending=True)[:top_classes].tolist()
            class_scores = [(out.classes[j], float(out.class_scores[i, j])) for j in top]
            category = class_scores[0][0]
        similarity = [(p, float(s)) for p, s in zip(phrases, out.similarity[i])] if out.similarity is not None else []
        results.append(RegionResult(
            box=plan.box, plan=plan, caption=out.captions[i], caption_score=out.caption_scores[i], tags=out.tags[i],
            similarity=similarity, category=category, class_scores=class_scores, control=out.controls[i],
            box_rounding=box_rounding, timings=dict(timings or {}), crops=list(crops[i]) if crops else []))
    return results
