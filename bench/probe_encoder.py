"""What each stage of a DynRefer-mini encoder carries: linear probes on frozen features (the README's probe table).

    .venv/bin/python bench/probe_encoder.py --checkpoint checkpoints/mini --annotations data/mini/annotations.json \
        --max-images 400 --out bench/results/mini_probes.md

(The README's tables use the first 400 val images, the whole val split of the earlier 4000-image benchmark, so
that they compare with the earlier models' numbers.)

For every region of the split (views planned with pHASH, as the evaluate command does), the frozen model gives
its features at each stage (context RoI maps X_k before and after alignment, the context views' CLS tokens, the
reference map X_0, the fused tokens, z); a logistic regression per caption slot (size, colour, pattern,
category, relation, the neighbour's colour and category) is fitted on the first `--fit-fraction` of the
regions and scored on the rest. Chance: size 0.33, colours 0.125, pattern 0.25, categories 0.10, relation 0.25.

A second table asks where the neighbour's shape is lost: in the context views where the neighbour lies at
least 80 % inside, the same ViT maps are RoI-aligned at the neighbour's own box instead of the region's, and
probed for the neighbour's and the region's category. High there but at chance from the region's box means the
ViT sees the neighbour's shape and does not carry it into the region's tokens; low there means it does not
recognise it at that scale in the first place.

Needs DynRefer-mini annotations (`python -m dynrefer_core.data.generate`): the slots come from their
`extra_info` (attributes, category, relation and neighbour id).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.modeling.dynrefer import DynRefer
from dynrefer_core.views import ViewOptions, box_in_view, prepare
from dynrefer_core.views.imageio import load_image

SLOTS = ("size", "colour", "pattern", "category", "relation", "neighbour colour", "neighbour category")
INSIDE = 0.8  # share of the neighbour's box inside a context view for the neighbour-place probe


def slot_labels(record: dict, by_id: dict[int, dict]) -> list[str]:
    """The seven caption slots of one DynRefer-mini annotation."""
    info = record["extra_info"]
    neighbour = by_id[info["relation"]["neighbour_id"]]["extra_info"]
    a = info["attributes"]
    return [a["size"], a["colour"], a["pattern"], info["coco_result"]["category"], info["relation"]["relation"],
            neighbour["attributes"]["colour"], neighbour["coco_result"]["category"]]


@torch.no_grad()
def collect(model: DynRefer, annotations_file: str, split: str, max_images: int | None):
    """Features per stage (name -> (N, F)), slot labels (N, 7), and the neighbour-place features."""
    ann = load_annotations(annotations_file).split(split)
    raw = json.loads(Path(annotations_file).read_text())["annotations"]
    by_id = {r["id"]: r for r in raw}
    c = model.config
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "context RoI maps X_k, before alignment (mean)", "aligned context maps Y_k (mean)",
        "context views' CLS tokens", "reference map X_0 (mean)", "fused tokens, before the Q-Former (mean)",
        "z (query tokens, flattened)")}
    labels: list[list[str]] = []
    place: dict[str, list] = {"neighbour's box": [], "region's box, same views": [], "labels": []}
    images = list(ann.by_image().items())[:max_images]
    for image_id, regions in tqdm(images, desc="probe features", unit="image"):
        image = load_image(ann.images[image_id].path)
        views = prepare(image, [r.box for r in regions], ViewOptions().resolve(c), c.image_size)
        plans = views.plans
        cls, rois, grid = model.embed_views(views.pixel_values, views.boxes, return_grid=True)
        n, v = cls.shape[:2]
        maps = model.align_views(rois)
        aligned = maps[:, 1:]
        fused = model.fusion(cls, maps)
        for name, f in zip(feats, (rois[:, 1:].mean((1, 3, 4)), aligned.mean((1, 3, 4)), cls[:, 1:].mean(1),
                                   rois[:, 0].mean((2, 3)), fused.mean(1), model.qformer(fused).flatten(1))):
            feats[name].append(f.float().cpu())
        # The same token maps RoI-aligned at the neighbour's box (view 0, the tight crop, never shows it).
        kept: list[tuple[int, int, list[float]]] = []
        image_labels = [slot_labels(by_id[r.id], by_id) for r in regions]
        labels += image_labels
        for i, (region, plan) in enumerate(zip(regions, plans)):
            neighbour = by_id[by_id[region.id]["extra_info"]["relation"]["neighbour_id"]]["bbox"]
            for k, view in enumerate(plan.views[1:], start=1):
                box, share = box_in_view(neighbour, view.crop_box, c.image_size)
                if share >= INSIDE:
                    kept.append((i, k, box))
        if kept:
            index = torch.tensor([[i * v + k, *box] for i, k, box in kept])
            at_neighbour = model.vision.roi_align(grid.flatten(0, 1), index)
            for (i, k, _), m in zip(kept, at_neighbour):
                place["neighbour's box"].append(m.mean((1, 2)).float().cpu())
                place["region's box, same views"].append(rois[i, k].mean((1, 2)).float().cpu())
                place["labels"].append([image_labels[i][3], image_labels[i][6]])
    return {k: torch.cat(f).numpy() for k, f in feats.items()}, np.array(labels), place


def probe(x: np.ndarray, y: np.ndarray, fit_fraction: float) -> float:
    """Held-out accuracy of a logistic regression fitted on the first `fit_fraction` of the rows; NaN where
    those rows hold fewer than two classes (too few regions to fit a probe)."""
    cut = int(len(x) * fit_fraction)
    if cut >= len(x) or len(np.unique(y[:cut])) < 2:
        return float("nan")
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    clf = LogisticRegression(max_iter=500, C=0.1).fit((x[:cut] - mean) / std, y[:cut])
    return float(clf.score((x[cut:] - mean) / std, y[cut:]))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/mini")
    p.add_argument("--annotations", default="data/mini/annotations.json")
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--fit-fraction", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = DynRefer.from_pretrained(args.checkpoint)
    model.eval()
    feats, labels, place = collect(model, args.annotations, args.split, args.max_images)
    lines = [f"Linear probes on frozen features: {args.checkpoint}, {len(labels)} {args.split} regions "
             f"(fit on {args.fit_fraction:.0%}, scored on the rest)", "",
             "| features | " + " | ".join(SLOTS) + " |", "|---|" + "---:|" * len(SLOTS)]
    for name, x in feats.items():
        accs = [probe(x, labels[:, k], args.fit_fraction) for k in range(len(SLOTS))]
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    place_labels = np.array(place["labels"])
    lines += ["", f"Where the neighbour is at least {INSIDE:.0%} inside a context view ({len(place_labels)} views):",
              "", "| RoI-aligned at | region's category | neighbour's category |", "|---|---:|---:|"]
    for name in ("neighbour's box", "region's box, same views"):
        x = torch.stack(place[name]).numpy()
        lines.append(f"| {name} | {probe(x, place_labels[:, 0], args.fit_fraction):.2f} | "
                     f"{probe(x, place_labels[:, 1], args.fit_fraction):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
