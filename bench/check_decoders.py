"""The fast decoder against `generate`, through `describe`, on scenes the model has not seen.

For every image of an annotation file, `describe` runs with decoder="hf" and decoder="fast" (alternating which
goes first): once per ground-truth box alone (1 region a call) and once on 32 boxes (the image's boxes, then
varied boxes up to 32). It checks identical captions and caption scores within 1e-4 on every region, and
reports the caption stage's time (`RegionResult.timings["caption"]`) of both decoders, measured in the same run.

    python -m dynrefer_core.data.generate --seed 60606 --num-images 40 --out /tmp/unseen --split test
    OMP_NUM_THREADS=1 python bench/check_decoders.py --checkpoint checkpoints/mini \
        --annotations /tmp/unseen/annotations.json --out decoders.json

Exit status 1 when a caption differs or a score is off by more than the tolerance.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_model import boxes_for  # noqa: E402

from dynrefer_core import runtime  # noqa: E402
from dynrefer_core.data.annotations import load_annotations  # noqa: E402
from dynrefer_core.modeling.dynrefer import DynRefer  # noqa: E402
from dynrefer_core.views import load_image  # noqa: E402

DECODERS = ("hf", "fast")


def compare(model: DynRefer, image, boxes: list, flip: bool) -> dict:
    """Both decoders on the same boxes: caption ms of each, and every region's captions and scores."""
    order = DECODERS[::-1] if flip else DECODERS
    results = {d: model.describe(image, boxes, decoder=d) for d in order}
    hf, fast = results["hf"], results["fast"]
    return {"hf_ms": hf[0].timings["caption"], "fast_ms": fast[0].timings["caption"],
            "same": [a.caption == b.caption for a, b in zip(hf, fast)],
            "score_diff": [abs(a.caption_score - b.caption_score) for a, b in zip(hf, fast)],
            "examples": [(a.caption, b.caption) for a, b in zip(hf, fast)]}


def summarise(calls: list[dict], regions_per_call: int) -> dict:
    hf, fast = sum(c["hf_ms"] for c in calls), sum(c["fast_ms"] for c in calls)
    regions = sum(len(c["same"]) for c in calls)
    return {"regions_per_call": regions_per_call, "calls": len(calls), "regions": regions,
            "same_captions": sum(sum(c["same"]) for c in calls),
            "max_score_diff": max(max(c["score_diff"]) for c in calls),
            "hf_ms_per_region": hf / regions, "fast_ms_per_region": fast / regions, "speed_up": hf / fast,
            "speed_up_median_call": statistics.median(c["hf_ms"] / c["fast_ms"] for c in calls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/mini")
    parser.add_argument("--annotations", required=True, help="a generated or release-style annotation file")
    parser.add_argument("--split", default=None, help="only this split of the file")
    parser.add_argument("--images", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch", type=int, default=32, help="boxes of the batched call")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest caption-score difference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the summary and every differing caption as JSON")
    args = parser.parse_args(argv)

    device = runtime.choose_device(args.device)
    model = DynRefer.from_pretrained(args.checkpoint, device=device).eval()
    data = load_annotations(args.annotations).split(args.split)
    by_image = list(data.by_image().items())[:args.images]
    single, batched = [], []
    for i, (image_id, regions) in enumerate(by_image):
        record = data.images[image_id]
        image = load_image(record.path)
        if i == 0:  # warm-up (first calls build the static searches)
            compare(model, image, [regions[0].box], False)
            compare(model, image, [r.box for r in regions][:args.batch], False)
        for j, region in enumerate(regions):
            single.append(compare(model, image, [region.box], flip=(i + j) % 2 == 1))
        boxes = [r.box for r in regions][:args.batch]
        boxes += boxes_for(args.batch, record.width, record.height)[:args.batch - len(boxes)]
        batched.append(compare(model, image, boxes, flip=i % 2 == 1))
        print(f"\r{i + 1}/{len(by_image)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = [summarise(single, 1), summarise(batched, args.batch)]
    print(f"{args.checkpoint} on {device}, {torch.get_num_threads()} torch threads, {len(by_image)} images of "
          f"{args.annotations}\n")
    print("| regions a call | regions | same captions | max score diff | hf ms / region | fast ms / region "
          "| caption-stage speed-up (total) | median per call |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['regions_per_call']} | {r['regions']} | {r['same_captions']}/{r['regions']} | "
              f"{r['max_score_diff']:.1e} | {r['hf_ms_per_region']:.2f} | {r['fast_ms_per_region']:.2f} | "
              f"{r['speed_up']:.2f}x | {r['speed_up_median_call']:.2f}x |")
    differing = [pair for c in single + batched for pair, same in zip(c["examples"], c["same"]) if not same]
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "annotations": args.annotations,
                                              "images": len(by_image), "rows": rows, "differing": differing},
                                             indent=2))
    ok = not differing and all(r["max_score_diff"] <= args.tolerance for r in rows)
    print("\nidentical captions, scores within tolerance" if ok else
          f"\nFAILED: {len(differing)} captions differ or a score is off by more than {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
