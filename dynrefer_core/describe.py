"""Inference: an image and boxes in, one `RegionResult` per box out (the "predictor" of DynRefer).

Per call: plan the nested views of every box (pHash image prior by default) and render them, encode all
regions in one batch, run D_tag (tags above a threshold), D_rtc (each typed phrase and the class names)
and D_llm (a caption steered by the control string of predicted tags), under `torch.inference_mode` and
the model's autocast (bf16 on CUDA, fp32 on CPU).

Scores:
- tags: sigma(tag logit), compared with `tag_threshold` (config default 0.7; the release's demo 0.76).
- similarity of a phrase: sigma(s * exp(t) + b), the D_rtc score s calibrated with the learned SigLIP
  scale and bias, i.e. the probability the model was trained to output for a matching region-text pair.
  (The release scores attributes with sigma(s), ignoring t and b; that ranks identically but its values
  sit near 0.5-0.7 for everything, which reads poorly as a similarity.)
- class_scores: the same calibrated probability for "the {class}"; category = the argmax (as released).
- caption_score: exp(beam sequences_scores), the caption's probability under length_penalty 0.
Controls: user controls first, then predicted tags by descending score, de-duplicated; the release uses
a Python set, whose order changes between processes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .modeling.language import control_string
from .views import ViewPlan, load_image, plan_views_batch, render_views


@dataclass
class RegionResult:
    """Everything the model says about one region. `timings` (ms) are for the whole call (all boxes
    are processed together), per stage: views, vision, heads, caption, total."""

    box: tuple[float, float, float, float]
    plan: ViewPlan
    caption: str
    caption_score: float
    tags: list[tuple[str, float]]
    similarity: list[tuple[str, float]]
    category: str | None = None
    class_scores: list[tuple[str, float]] = field(default_factory=list)
    control: str = "|"
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "box": [float(v) for v in self.box],
            # Every scored view (t = 0 and all candidates), flagged `selected`, so a client sees why the chosen
            # ones won; `selected_ts` gives the model's order of the n views.
            "views": [{"t": v.t, "crop_box": list(v.crop_box), "hash_hex": v.hash_hex, "hamming": v.hamming,
                       "score": v.score, "selected": v.selected} for v in self.plan.all_views],
            "selected_ts": list(self.plan.selected_ts),
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
        return out


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


def describe(model, image, boxes: Sequence[Sequence[float]], phrases: Sequence[str] = (), *,
             n_views: int | None = None, strategy: str = "phash", ts: Sequence[float] | None = None,
             alpha: float = 1.0, hash_name: str = "dct", tag_threshold: float | None = None,
             seed: int | None = None, controls: Sequence[str] = (), top_classes: int = 5,
             batch_size: int = 32, **generation) -> list[RegionResult]:
    """Describe each box (x1, y1, x2, y2, image pixels) of `image` (path, bytes, PIL or array).

    `phrases`: free texts scored against every region. `controls`: words prepended to every caption
    control. `generation`: overrides of the beam-search settings (num_beams, max_new_tokens, ...).
    """
    config = model.config
    n_views = config.n_views if n_views is None else n_views
    if n_views != config.n_views:
        raise ValueError(f"n_views={n_views}, but this model fuses exactly {config.n_views} views")
    threshold = config.tag_threshold if tag_threshold is None else float(tag_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"tag_threshold={threshold} must lie in [0, 1]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    phrases = [p.strip() for p in phrases if p and p.strip()]
    boxes = [tuple(float(v) for v in b) for b in boxes]
    if not boxes:
        return []

    was_training = model.training
    model.eval()
    clock = _Clock(model.device)
    try:
        image = load_image(image)
        plans = plan_views_batch(image, boxes, n_views, strategy, ts=ts, alpha=alpha, hash_name=hash_name,
                                 seed=seed)
        rendered = render_views(image, plans, size=config.image_size)
        clock.lap("views")
        results: list[RegionResult] = []
        with torch.inference_mode(), model.autocast():
            phrase_embeds = model.text_encoder.encode(phrases).to(model.device) if phrases else None
            clock.lap("heads")
            for start in range(0, len(boxes), batch_size):
                chunk = slice(start, start + batch_size)
                z = model.encode_regions(rendered.pixel_values[chunk], rendered.boxes[chunk])
                clock.lap("vision")
                tag_probs = model.tag_scores(z).cpu()
                sims = (torch.sigmoid(model.rtc_decoder.calibrated(model.rtc_decoder(z, phrase_embeds).float()))
                        .cpu() if phrases else None)
                class_probs = None
                if len(model.vocabulary.classes):
                    class_probs = torch.sigmoid(model.rtc_decoder.calibrated(model.classify(z))).cpu()
                clock.lap("heads")
                tags = []
                for row in tag_probs:
                    keep = torch.nonzero(row > threshold).flatten()
                    order = keep[torch.argsort(row[keep], descending=True)]
                    tags.append([(model.vocabulary.tags[i], float(row[i])) for i in order.tolist()])
                control = [control_string([*controls, *(name for name, _ in t)]) for t in tags]
                captions, scores = model.generate_captions(z, control, **generation)
                clock.lap("caption")
                for i in range(z.shape[0]):
                    k = start + i
                    category, class_scores = None, []
                    if class_probs is not None:
                        top = torch.argsort(class_probs[i], descending=True)[:top_classes].tolist()
                        class_scores = [(model.vocabulary.classes[j], float(class_probs[i, j])) for j in top]
                        category = class_scores[0][0]
                    results.append(RegionResult(
                        box=plans[k].box, plan=plans[k], caption=captions[i], caption_score=float(scores[i]),
                        tags=tags[i],
                        similarity=[(p, float(sims[i, j])) for j, p in enumerate(phrases)] if phrases else [],
                        category=category, class_scores=class_scores, control=control[i]))
    finally:
        model.train(was_training)
    timings = dict(clock.times)
    timings["total"] = sum(timings.values())
    for r in results:
        r.timings = dict(timings)
    return results
