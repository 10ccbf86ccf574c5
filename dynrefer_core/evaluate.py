"""Evaluate a DynRefer checkpoint on region annotations (spec §8, per region id).

    python -m dynrefer_core.evaluate --checkpoint checkpoints/mini --annotations data/mini/annotations.json \
        --split test --out eval.json [--n-views 3 --strategy phash|fixed|random --ts 0.2 0.6]
    ... --sweep-t 0,0.1,...,1.0 --out sweep.json    # the view study (view_study.py, docs/view-study.md)

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

DENSECAP_PROTOCOLS = {"gt": "ground-truth boxes, caption probability: the paper's protocol",
                      "proposals": "proposed boxes, caption probability x objectness: end to end"}
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
    densecap_protocol: str | None = None  # "gt" (the paper's: GT boxes) or "proposals" (end to end)
    densecap_map: float = math.nan
    densecap_det_map: float = math.nan
    proposal_recall: float = math.nan  # GT boxes with a proposal at IoU >= 0.5 ("proposals" only)
    proposals_per_image: float = math.nan
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)
    attribute_arrays: tuple | None = field(default=None, repr=False)  # (scores, labels) per region; not saved

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(dataclasses.replace(self, attribute_arrays=None))  # the arrays are not saved (nor copied)
        d.pop("attribute_arrays")
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
        if self.densecap_protocol:
            how = DENSECAP_PROTOCOLS[self.densecap_protocol]
            rows.append(f"| DenseCap mAP ({how}) | {self.densecap_map:.4f} |")
            rows.append(f"| DenseCap detection mAP ({how}) | {self.densecap_det_map:.4f} |")
            if not math.isnan(self.proposal_recall):
                rows.append(f"| proposal recall at IoU 0.5 ({self.proposals_per_image:.1f} per image) | "
                            f"{self.proposal_recall:.4f} |")
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
                   max_regions: int | None = None, batch_regions: int = 64, progress: bool = True,
                   decoder: str = "fast") -> EvalResult:
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
                             batch_size=batch_regions, decoder=decoder)
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
    res.attribute_arrays = attributes
    res.settings = {"decoder": decoder, "n_views": views.n_views, "strategy": views.strategy,
                    "ts": list(views.ts) if views.ts else None, "task": views.task, "alpha": views.alpha,
                    "hash_name": views.hash_name, "seed": views.seed, "box_rounding": views.box_rounding}
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


def densecap_on_gt_boxes(preds: list[dict]) -> metrics.DenseCapResult:
    """The paper's dense-captioning protocol (spec 8.1): every ground-truth box is described and ranked by its
    caption probability; `preds` are `evaluate_model`'s prediction dicts."""
    return metrics.densecap_map(*densecap_inputs(preds))


def densecap_inputs(preds: list[dict]) -> tuple[dict, dict]:
    """`evaluate_model`'s predictions as the DenseCap evaluator's per-image detections and GT regions."""
    predictions: dict = {}
    ground_truth: dict = {}
    for p in preds:
        predictions.setdefault(p["image_id"], []).append(metrics.Detection(p["box"], p["caption"], p["caption_score"]))
        ground_truth.setdefault(p["image_id"], []).append(metrics.GTRegion(p["box"], p["reference"]))
    return predictions, ground_truth


def densecap_on_proposals(model, annotations: RegionAnnotations, proposer, *, views: ViewOptions | None = None,
                          max_proposals: int = 30, progress: bool = True
                          ) -> tuple[metrics.DenseCapResult, float, float]:
    """End-to-end dense captioning: each image's proposals (at most `max_proposals`) described and ranked by
    caption probability x objectness (`AutomaticRegionDescriber`). Returns the DenseCap result, the share of
    ground-truth boxes with a proposal at IoU >= 0.5, and the mean number of proposals per image."""
    from .automatic import AutomaticRegionDescriber

    describer = AutomaticRegionDescriber(model, proposer, max_regions=max_proposals, views=views)
    predictions: dict = {}
    ground_truth: dict = {}
    found, n_proposals = [], []
    by_image = annotations.by_image()
    for image_id, regions in tqdm(by_image.items(), desc="densecap proposals", unit="image", disable=not progress):
        path = annotations.images[image_id].path
        proposals = proposer(path)
        order = np.argsort(-np.asarray(proposals.scores, float), kind="stable")[:max_proposals]
        boxes = np.asarray(proposals.boxes, float).reshape(-1, 4)[order]
        n_proposals.append(len(boxes))
        gt = np.array([r.box for r in regions], float)
        iou = metrics.box_iou(gt, boxes) if len(boxes) else np.zeros((len(gt), 0))
        found += list((iou >= 0.5).any(axis=1)) if len(boxes) else [False] * len(gt)
        results = describer.generate(path, proposals=proposals)
        predictions[image_id] = [metrics.Detection(r.box, r.caption, r.confidence) for r in results]
        ground_truth[image_id] = [metrics.GTRegion(r.box, r.caption) for r in regions]
    return (metrics.densecap_map(predictions, ground_truth), float(np.mean(found)) if found else math.nan,
            float(np.mean(n_proposals)) if n_proposals else math.nan)


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
    ap.add_argument("--densecap", choices=sorted(DENSECAP_PROTOCOLS),
                    help="also dense captioning: 'gt' describes the ground-truth boxes (the paper's protocol), "
                         "'proposals' the boxes of --proposer or --proposals (end to end); needs Java (METEOR)")
    ap.add_argument("--proposer", help="--densecap proposals: a proposer folder (checkpoints/proposer) or sam:MODEL")
    ap.add_argument("--proposals", help="--densecap proposals: boxes from a file (GRiT format or {file_name: [[x1, y1, "
                                        "x2, y2, score], ...]})")
    ap.add_argument("--max-proposals", type=int, default=30, help="--densecap proposals: boxes per image")
    ap.add_argument("--decoder", choices=["fast", "hf"], default="fast",
                    help="caption decoding: our static-cache beam search, or transformers' generate (the same captions)")
    study = ap.add_argument_group("view study (docs/view-study.md)")
    study.add_argument("--sweep-t", metavar="T,T,...",
                       help="evaluate every task with view two fixed at each t (e.g. 0,0.1,...,1.0) and with pHASH; "
                            "writes --out (JSON) and a plot next to it (.png)")
    study.add_argument("--bootstrap", type=int, default=1000, help="--sweep-t: bootstrap resamples of the images")
    study.add_argument("--save-priors", action="store_true",
                       help="--sweep-t: store each task's best t's in the checkpoint's config.json as its task "
                            "priors (describe --strategy task); a val split only, never test")
    args = ap.parse_args(argv)
    from .modeling.dynrefer import DynRefer

    if args.threads:
        torch.set_num_threads(args.threads)
    views = view_options(args, ap)
    if args.densecap == "proposals" and bool(args.proposer) == bool(args.proposals):
        ap.error("--densecap proposals needs exactly one of --proposer DIR and --proposals FILE")
    sweep_ts = None
    if args.sweep_t is not None:
        from .view_study import parse_ts

        try:
            sweep_ts = parse_ts(args.sweep_t)
        except ValueError as err:
            ap.error(str(err))
        if args.densecap == "proposals":
            ap.error("--sweep-t scores dense captioning on the ground-truth boxes; leave out --densecap proposals")
        if args.bootstrap < 1:
            ap.error("--bootstrap needs at least 1 resample")
        if args.strategy != "phash" or args.ts or args.n_views or args.task:
            ap.error("--sweep-t chooses the views itself (t = 0 and each t, then pHASH); leave out --strategy, "
                     "--ts, --n-views and --task")
    if args.save_priors and (sweep_ts is None or args.split in ("test", "all")):
        ap.error("--save-priors stores the best views of a --sweep-t on a val split: choosing views is model "
                 "selection, so never on test (use --split val)")
    try:
        ann = load_annotations(args.annotations, tag_list=args.tag_list, image_root=args.image_root).split(args.split)
        model = DynRefer.from_pretrained(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as err:  # a wrong path, file or model id: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 1
    if sweep_ts is not None:
        return run_view_study(model, ann, sweep_ts, args)
    res = evaluate_model(model, ann, views=views, tag_threshold=args.tag_threshold, meteor=not args.no_meteor,
                         caption_metrics=False if args.no_caption_metrics else None, max_regions=args.max_regions,
                         batch_regions=args.batch_regions, decoder=args.decoder)
    res.settings.update({"checkpoint": str(args.checkpoint), "annotations": str(args.annotations),
                         "split": args.split})
    if args.densecap:
        if not metrics.caption_metrics_available():
            print("error: --densecap scores captions with METEOR, which needs Java (apt-get install "
                  "default-jre-headless)", file=sys.stderr)
            return 1
        res.densecap_protocol = args.densecap
        if args.densecap == "gt":
            dense = densecap_on_gt_boxes(res.predictions)
        else:
            from .proposals import load_proposer

            proposer = load_proposer(args.proposer or f"file:{args.proposals}")
            if args.max_regions is not None:
                ann = dataclasses.replace(ann, regions=ann.regions[:args.max_regions])
            dense, res.proposal_recall, res.proposals_per_image = densecap_on_proposals(
                model, ann, proposer, views=views, max_proposals=args.max_proposals)
            res.settings.update({"proposer": args.proposer, "proposals": args.proposals,
                                 "max_proposals": args.max_proposals})
        res.densecap_map, res.densecap_det_map = dense.map, dense.det_map
    out = res.to_dict(with_predictions=args.save_predictions)
    print(res.table())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def run_view_study(model, ann: RegionAnnotations, ts: list[float], args: argparse.Namespace) -> int:
    """`--sweep-t`: the sweep, its table and plot, and with `--save-priors` the task priors."""
    from . import view_study
    from .checkpoint import update_config

    caption_metrics = not args.no_caption_metrics and metrics.caption_metrics_available()
    if not caption_metrics:
        print("note: no Java (or pycocoevalcap): captioning and dense captioning are left out of the sweep",
              file=sys.stderr)
    try:
        sweep = view_study.run_sweep(model, ann, ts, resamples=args.bootstrap, seed=args.seed or 0,
                                     caption_metrics=caption_metrics, max_regions=args.max_regions,
                                     batch_regions=args.batch_regions, decoder=args.decoder)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sweep["settings"] = {"checkpoint": str(args.checkpoint), "annotations": str(args.annotations),
                         "split": args.split, "decoder": args.decoder, "box_rounding": model.config.box_rounding,
                         "max_regions": args.max_regions}
    print(view_study.sweep_table(sweep))
    print("best t per metric:", ", ".join(f"{m} {t:g}" for m, t in sweep["best"].items()))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(sweep, indent=2) + "\n")
        plot = view_study.save_sweep_plot(sweep, out.with_suffix(".png"),
                                          title=f"{Path(args.checkpoint).name}: view two at t, {args.split} split")
        print(f"wrote {out} and {plot}")
    if args.save_priors:
        folder = Path(args.checkpoint)
        if not (folder / "config.json").is_file():
            print(f"error: --save-priors writes into a checkpoint folder's config.json; {folder} has none",
                  file=sys.stderr)
            return 1
        config = update_config(folder, task_priors=sweep["task_priors"],
                               task_priors_source=view_study.priors_source(sweep))
        print(f"task priors saved in {folder / 'config.json'}: {config.task_priors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
