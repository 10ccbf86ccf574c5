"""Evaluate a DynRefer checkpoint on region annotations (spec §8, per region id).

    python -m dynrefer_core.evaluate --checkpoint checkpoints/mini --annotations data/mini/annotations.json \
        --split test --out eval.json [--n-views 3 --strategy phash|fixed|random --ts 0.2 0.6]

Per region: views from the planner, z = encode_regions, tags = D_tag > threshold, caption = D_llm with the
predicted tags as control (spec §4.3), class = argmax of D_rtc scores of "the {class}" prompts (§4.2),
attribute scores = D_rtc scores of the attribute prompts. The release's RefCOCOg / VG files need
`--tag-list ram_tag_list.txt` (their tags are RAM indices) and `--image-root`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import metrics
from .data.annotations import RegionAnnotations, load_annotations
from .data.dataset import iter_image_batches
from .describe import check_tag_threshold, describe_views, threshold_tags
from .cli import add_view_arguments, view_options
from .views import ViewOptions

HEADLINE = ("recognition_top1", "tag_f1", "CIDEr", "METEOR", "BLEU-4", "ROUGE-L", "attribute_mAP",
            "relation_accuracy")


@dataclass
class EvalResult:
    """All numbers are fractions (CIDEr as pycocoevalcap gives it); NaN where the labels are missing."""

    num_regions: int
    recognition_top1: float = math.nan
    tag_precision: float = math.nan
    tag_recall: float = math.nan
    tag_f1: float = math.nan
    tag_threshold: float = math.nan
    captions: dict[str, float] = field(default_factory=dict)
    attribute_mAP: float = math.nan
    relation_accuracy: float = math.nan
    subject_accuracy: float = math.nan  # caption words before the relation exactly right
    neighbour_accuracy: float = math.nan  # caption words after the relation exactly right
    tiny_subject_accuracy: float = math.nan  # the same, on regions whose reference says "tiny"
    word_accuracy: dict[str, float] = field(default_factory=dict)  # DynRefer-mini: per attribute word
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        caps = d.pop("captions")
        d.update({k: math.nan for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")})
        d.update(caps)  # BLEU-1..4, METEOR, ROUGE-L, CIDEr at top level (None when not computed)
        if not with_predictions:
            d.pop("predictions")
        d["table"] = self.table()
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    def value(self, name: str) -> float:
        return self.captions.get(name, getattr(self, name, math.nan))

    def table(self) -> str:
        rows = ["| metric | value |", "|---|---|"]
        for name in (*HEADLINE, "tag_precision", "tag_recall", "subject_accuracy", "neighbour_accuracy",
                     "tiny_subject_accuracy"):
            v = self.value(name)
            if not math.isnan(v):
                rows.append(f"| {name} | {v:.4f} |")
        for name, v in self.word_accuracy.items():
            rows.append(f"| word accuracy: {name} | {v:.4f} |")
        rows.append(f"| regions | {self.num_regions} |")
        return "\n".join(rows)


def _split_caption(caption: str) -> tuple[str, str | None, str]:
    rel = metrics.relation_of(caption)
    if rel is None:
        return caption.strip(), None, ""
    head, _, tail = f" {caption} ".partition(f" {rel} ")
    return head.strip(), rel, tail.strip()


def evaluate_model(model, annotations: RegionAnnotations, *, views: ViewOptions | None = None,
                   tag_threshold: float | None = None, meteor: bool = True, caption_metrics: bool | None = None,
                   max_regions: int | None = None, batch_regions: int = 64, progress: bool = True) -> EvalResult:
    """Run every head of `model` on the regions of `annotations` (`describe_views`) and score them."""
    start = time.perf_counter()
    views = (views or ViewOptions()).resolve(model.config)
    if views.n_views > model.config.n_views:
        raise ValueError(f"n_views={views.n_views} is more than the {model.config.n_views} views this model fuses")
    thr = check_tag_threshold(model, tag_threshold)
    vocab = model.vocabulary
    classes = list(annotations.categories) or list(vocab.classes)
    attr_index = attribute_columns(annotations, [a.synonyms for a in vocab.attributes])
    if max_regions is not None:
        annotations = dataclasses.replace(annotations, regions=annotations.regions[:max_regions])
    preds: list[dict] = []
    attr_scores: list[np.ndarray] = []
    attr_labels: list[list[int]] = []
    bar = tqdm(total=len(annotations.regions), desc=f"eval {views.strategy} n={views.n_views}", unit="region",
               disable=not progress)
    for batch in iter_image_batches(annotations, vocab.tags, image_size=model.config.image_size, views=views,
                                    max_regions=batch_regions):
        batch = pad_views(batch, model.config.n_views)
        out = describe_views(model, batch.pixel_values, batch.boxes, tag_threshold=thr,
                             classes=None if classes == vocab.classes else classes, attributes=attr_index is not None,
                             batch_size=batch_regions)
        for i, r in enumerate(batch.regions):
            p = {"id": r.id, "image_id": r.image_id, "box": list(r.box), "views": batch.selected_ts[i],
                 "caption": out.captions[i], "caption_score": out.caption_scores[i], "reference": r.caption,
                 "tags": [name for name, _ in out.tags[i]], "gt_tags": r.tags, "category": r.category,
                 "relation": r.relation}
            if out.class_scores is not None:
                p["predicted_category"] = out.classes[int(out.class_scores[i].argmax())]
            preds.append(p)
        if attr_index is not None:
            cols, width = attr_index
            attr_scores.append(out.attribute_scores[:, cols].numpy())
            attr_labels.extend([r.att_vec[c] for c in range(width)] if r.att_vec is not None and len(r.att_vec) == width
                               else [-1] * width for r in batch.regions)
        bar.update(len(batch))
    bar.close()
    attributes = (np.concatenate(attr_scores), np.array(attr_labels)) if attr_scores else None
    res = score_predictions(preds, vocab.tags, thr, attributes=attributes, meteor=meteor,
                            caption_metrics=caption_metrics)
    res.settings = {"n_views": views.n_views, "strategy": views.strategy, "ts": list(views.ts) if views.ts else None,
                    "alpha": views.alpha, "hash_name": views.hash_name, "seed": views.seed,
                    "box_rounding": views.box_rounding}
    res.seconds = time.perf_counter() - start
    return res


def score_predictions(preds: list[dict], tag_names: list[str], tag_threshold: float, *,
                      attributes: tuple[np.ndarray, np.ndarray] | None = None, meteor: bool = True,
                      caption_metrics: bool | None = None) -> EvalResult:
    """The metrics of per-region predictions (the dicts `evaluate_model` makes: caption, reference, tags,
    gt_tags, category, predicted_category, relation) and optional attribute (scores, labels) arrays."""
    if not preds:
        raise ValueError("no regions to evaluate")
    res = EvalResult(num_regions=len(preds), tag_threshold=tag_threshold, predictions=preds)
    labelled = [p for p in preds if p["category"] is not None and "predicted_category" in p]
    if labelled:
        res.recognition_top1 = metrics.top1_accuracy([p["predicted_category"] for p in labelled],
                                                     [p["category"] for p in labelled])
    with_tags = [p for p in preds if p["gt_tags"]]
    if with_tags:
        known = set(tag_names)
        t = metrics.tag_prf([p["tags"] for p in with_tags], [[g for g in p["gt_tags"] if g in known] for p in with_tags],
                            tag_threshold)
        res.tag_precision, res.tag_recall, res.tag_f1 = t.precision, t.recall, t.f1
    if caption_metrics is None:  # auto: pycocoevalcap's tokenizer and METEOR need Java
        caption_metrics = metrics.caption_metrics_available()
    if caption_metrics:
        res.captions = metrics.caption_metrics({p["id"]: p["caption"] for p in preds},
                                               {p["id"]: [p["reference"]] for p in preds}, meteor=meteor)
    if attributes is not None:
        res.attribute_mAP = metrics.attribute_map(*attributes)[0]
    rel = [p for p in preds if p["relation"]]
    if rel:
        res.relation_accuracy = metrics.relation_accuracy([p["caption"] for p in rel], [p["relation"] for p in rel])
        parts = [(_split_caption(p["caption"]), _split_caption(p["reference"])) for p in rel]
        res.subject_accuracy = float(np.mean([a[0] == b[0] for a, b in parts]))
        res.neighbour_accuracy = float(np.mean([a[2] == b[2] for a, b in parts]))
        tiny = [(a, b) for a, b in parts if " tiny " in f" {b[0]} "]
        if tiny:
            res.tiny_subject_accuracy = float(np.mean([a[0] == b[0] for a, b in tiny]))
        res.word_accuracy = word_accuracy(rel)
    return res


def calibrate_tag_threshold(model, annotations: RegionAnnotations, max_regions: int | None = None
                            ) -> tuple[float, float]:
    """The global D_tag threshold in {0.10, 0.15, ..., 0.95} with the best tag F1 on these (val) regions,
    and that F1. Model selection on val only: never call it on test."""
    ann = dataclasses.replace(annotations, regions=annotations.regions[:max_regions])
    names = list(model.vocabulary.tags)
    probs, truth = [], []
    views = ViewOptions().resolve(model.config)
    for batch in iter_image_batches(ann, names, image_size=model.config.image_size, views=views):
        probs.append(describe_views(model, batch.pixel_values, batch.boxes, captions=False).tag_probs)
        truth += [set(r.tags) for r in batch.regions]
    p = torch.cat(probs)
    best = (-1.0, model.config.tag_threshold)
    for thr in [round(0.05 * k, 2) for k in range(2, 20)]:
        pred = [{name for name, _ in row} for row in threshold_tags(p, names, thr)]
        best = max(best, (metrics.tag_prf(pred, truth).f1, thr))
    return best[1], best[0]


def word_accuracy(preds: list[dict]) -> dict[str, float]:
    """DynRefer-mini captions ("a {size} {colour} {pattern} {category} {relation} a {colour} {category}"):
    how often each word of the reference is the word the prediction has in the same slot. Which words need
    which view: the pattern of a tiny object needs the tight view, size/relation/neighbour need context."""
    from .data import scenes

    slots = {"size": 1, "colour": 2, "pattern": 3, "category": 4}
    out: dict[str, list[bool]] = {k: [] for k in (*slots, "relation", "neighbour colour", "neighbour category",
                                                   "pattern (tiny objects)", "category (tiny objects)")}
    for p in preds:
        ref, hyp = p["reference"].split(), p["caption"].split()
        if len(ref) < 8 or ref[1] not in scenes.SIZES:
            continue  # not a DynRefer-mini caption
        for name, i in slots.items():
            out[name].append(len(hyp) > i and hyp[i] == ref[i])
        out["relation"].append(metrics.relation_of(p["caption"]) == p["relation"])
        h_tail, r_tail = _split_caption(p["caption"])[2].split(), _split_caption(p["reference"])[2].split()
        out["neighbour colour"].append(h_tail[1:2] == r_tail[1:2])
        out["neighbour category"].append(h_tail[2:3] == r_tail[2:3])
        if ref[1] == "tiny":
            out["pattern (tiny objects)"].append(len(hyp) > 3 and hyp[3] == ref[3])
            out["category (tiny objects)"].append(len(hyp) > 4 and hyp[4] == ref[4])
    return {k: float(np.mean(v)) for k, v in out.items() if v}


def pad_views(batch, n_model: int):
    """Fewer views than the model fuses (the 1-view ablation): fill the missing slots with copies of view 0
    (t = 0), so the model gets no context and keeps its input layout."""
    n = batch.pixel_values.shape[1]
    if n == n_model:
        return batch
    idx = list(range(n)) + [0] * (n_model - n)
    return dataclasses.replace(batch, pixel_values=batch.pixel_values[:, idx], boxes=batch.boxes[:, idx])


def attribute_columns(annotations: RegionAnnotations, synonyms: list[tuple[str, ...]]
                      ) -> tuple[list[int], int] | None:
    """Which of the model's attributes score each labelled attribute (att_vec entry).

    Files that name their attributes (ours) are matched by name against each attribute's synonyms; files
    that do not (the release's OVAD file) are matched by position when the lengths agree. None: no
    attribute evaluation possible."""
    if not synonyms:
        return None
    if annotations.attributes:
        cols = []
        for name in annotations.attributes:
            hit = [i for i, syn in enumerate(synonyms) if name in syn]
            if not hit:
                return None
            cols.append(hit[0])
        return cols, len(cols)
    widths = {len(r.att_vec) for r in annotations.regions if r.att_vec is not None}
    if widths == {len(synonyms)}:
        return list(range(len(synonyms))), len(synonyms)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a folder written by save_pretrained (e.g. checkpoints/mini)")
    ap.add_argument("--annotations", required=True, help="COCO-style region annotations (spec §5.3)")
    ap.add_argument("--split", default="test", help="images of this split (files without splits: all); 'all' = every image")
    ap.add_argument("--out", help="write the JSON result here (the markdown table is also printed)")
    add_view_arguments(ap, seed=0)
    ap.add_argument("--tag-threshold", type=float, default=None)
    ap.add_argument("--tag-list", help="tag list for files that store tag indices (the release: ram_tag_list.txt)")
    ap.add_argument("--image-root", help="override dataset.image_root")
    ap.add_argument("--max-regions", type=int, default=None)
    ap.add_argument("--batch-regions", type=int, default=64)
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    ap.add_argument("--no-caption-metrics", action="store_true",
                    help="skip BLEU/METEOR/ROUGE-L/CIDEr (machines without Java or pycocoevalcap)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--save-predictions", action="store_true", help="also store every region's prediction in --out")
    args = ap.parse_args(argv)
    from .modeling.dynrefer import DynRefer

    if args.threads:
        torch.set_num_threads(args.threads)
    views = view_options(args, ap)
    try:
        ann = load_annotations(args.annotations, tag_list=args.tag_list, image_root=args.image_root).split(args.split)
        model = DynRefer.from_pretrained(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as err:  # a wrong path, file or model id: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 1
    res = evaluate_model(model, ann, views=views, tag_threshold=args.tag_threshold, meteor=not args.no_meteor,
                         caption_metrics=False if args.no_caption_metrics else None, max_regions=args.max_regions,
                         batch_regions=args.batch_regions)
    res.settings.update({"checkpoint": str(args.checkpoint), "annotations": str(args.annotations),
                         "split": args.split})
    out = res.to_dict(with_predictions=args.save_predictions)
    print(res.table())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
