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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import metrics
from .data.annotations import RegionAnnotations, load_annotations
from .data.dataset import iter_image_batches

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


@torch.no_grad()
def evaluate_model(model, annotations: RegionAnnotations, *, n_views: int | None = None, strategy: str = "phash",
                   ts: list[float] | None = None, alpha: float = 1.0, tag_threshold: float | None = None,
                   meteor: bool = True, caption_metrics: bool | None = None, max_regions: int | None = None,
                   batch_regions: int = 64, seed: int = 0, progress: bool = True) -> EvalResult:
    """Run every head of `model` on the regions of `annotations` and score them."""
    start = time.perf_counter()
    model.eval()
    cfg = model.config
    n_views = n_views or cfg.n_views
    if n_views > cfg.n_views:
        raise ValueError(f"n_views={n_views} is more than the {cfg.n_views} views this model fuses")
    thr = cfg.tag_threshold if tag_threshold is None else tag_threshold
    vocab = model.vocabulary
    tag_names = list(vocab.tags)
    classes = list(annotations.categories) or list(vocab.classes)
    attr_index = attribute_columns(annotations, [a.synonyms for a in vocab.attributes])
    device = model.device
    if max_regions is not None:
        annotations = RegionAnnotations(annotations.images, annotations.regions[:max_regions],
                                        annotations.tag_list, annotations.categories, annotations.attributes,
                                        annotations.info)
    total = len(annotations.regions)
    preds: list[dict] = []
    attr_scores: list[np.ndarray] = []
    attr_labels: list[list[int]] = []
    bar = tqdm(total=total, desc=f"eval {strategy} n={n_views}", unit="region", disable=not progress)
    batches = iter_image_batches(annotations, tag_names, image_size=cfg.image_size, n_views=n_views,
                                 strategy=strategy, ts=ts, alpha=alpha, seed=seed, max_regions=batch_regions)
    for batch in batches:
        batch = pad_views(batch, cfg.n_views).to(device)
        with model.autocast():
            z = model.encode_regions(batch.pixel_values, batch.boxes)
            probs = model.tag_scores(z).float()
            tags = [[tag_names[j] for j in torch.nonzero(row > thr).flatten().tolist()] for row in probs]
            controls = [",".join(t) + "|" for t in tags]  # spec 4.3: predicted tags are the control
            captions, cap_scores = model.generate_captions(z, controls)
            cls_scores = model.classify(z, classes).float() if classes else None
            att = model.attribute_scores(z).float() if attr_index is not None else None
        for i, r in enumerate(batch.regions):
            p = {"id": r.id, "image_id": r.image_id, "box": list(r.box), "views": batch.selected_ts[i],
                 "caption": captions[i], "caption_score": float(cap_scores[i]), "reference": r.caption,
                 "tags": tags[i], "gt_tags": r.tags, "category": r.category, "relation": r.relation}
            if cls_scores is not None:
                p["predicted_category"] = classes[int(cls_scores[i].argmax())]
            preds.append(p)
        if att is not None:
            cols, width = attr_index
            attr_scores.append(att[:, cols].cpu().numpy())
            attr_labels.extend([r.att_vec[c] for c in range(width)] if r.att_vec is not None and len(r.att_vec) == width
                               else [-1] * width for r in batch.regions)
        bar.update(len(batch))
    bar.close()
    res = EvalResult(num_regions=len(preds), tag_threshold=thr, predictions=preds)
    res.settings = {"n_views": n_views, "strategy": strategy, "ts": ts, "alpha": alpha, "seed": seed}
    if not preds:
        raise ValueError("no regions to evaluate")
    labelled = [p for p in preds if p["category"] is not None and "predicted_category" in p]
    if labelled:
        res.recognition_top1 = metrics.top1_accuracy([p["predicted_category"] for p in labelled],
                                                     [p["category"] for p in labelled])
    with_tags = [p for p in preds if p["gt_tags"]]
    if with_tags:
        known = set(tag_names)
        t = metrics.tag_prf([p["tags"] for p in with_tags], [[g for g in p["gt_tags"] if g in known] for p in with_tags],
                            thr)
        res.tag_precision, res.tag_recall, res.tag_f1 = t.precision, t.recall, t.f1
    if caption_metrics is None:  # auto: pycocoevalcap's tokenizer and METEOR need Java
        caption_metrics = metrics.caption_metrics_available()
    if caption_metrics:
        res.captions = metrics.caption_metrics({p["id"]: p["caption"] for p in preds},
                                               {p["id"]: [p["reference"]] for p in preds}, meteor=meteor)
    if attr_scores:
        res.attribute_mAP = metrics.attribute_map(np.concatenate(attr_scores), np.array(attr_labels))[0]
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
    res.seconds = time.perf_counter() - start
    return res


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a folder written by save_pretrained (e.g. checkpoints/mini)")
    ap.add_argument("--annotations", required=True, help="COCO-style region annotations (spec §5.3)")
    ap.add_argument("--split", default="test", help="images of this split (files without splits: all); 'all' = every image")
    ap.add_argument("--out", help="write the JSON result here (the markdown table is also printed)")
    ap.add_argument("--n-views", type=int, default=None, help="default: the model's n_views")
    ap.add_argument("--strategy", default="phash", choices=["phash", "fixed", "random"])
    ap.add_argument("--ts", type=float, nargs="*", default=None, help="the n-1 context ts for --strategy fixed")
    ap.add_argument("--alpha", type=float, default=1.0)
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
    ap.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    ap.add_argument("--save-predictions", action="store_true", help="also store every region's prediction in --out")
    args = ap.parse_args(argv)
    from .modeling.dynrefer import DynRefer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.strategy == "fixed" and not args.ts:
        ap.error("--strategy fixed needs --ts (n-1 values in (0, 1])")
    ann = load_annotations(args.annotations, tag_list=args.tag_list, image_root=args.image_root).split(args.split)
    model = DynRefer.from_pretrained(args.checkpoint, device=args.device)
    res = evaluate_model(model, ann, n_views=args.n_views, strategy=args.strategy, ts=args.ts, alpha=args.alpha,
                         tag_threshold=args.tag_threshold, meteor=not args.no_meteor,
                         caption_metrics=False if args.no_caption_metrics else None, max_regions=args.max_regions,
                         batch_regions=args.batch_regions, seed=args.seed)
    res.settings.update({"checkpoint": str(args.checkpoint), "annotations": str(args.annotations),
                         "split": args.split})
    out = res.to_dict(with_predictions=args.save_predictions)
    print(res.table())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
