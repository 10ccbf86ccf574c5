"""Regions/s of `dynrefer describe` (batched across images, views prepared ahead in threads) against a plain
loop calling `DynRefer.describe` once per image, in the same run, on generated scenes; outputs asserted equal.

    python bench/bench_describe.py [--images 170] [--batch-regions 32] [--workers 2] [--seed 777]

Prints a markdown table. Both paths use the same model, threads and regions; the plain loop is what a user
writes by hand (load, describe, json.dumps per region).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dynrefer_core import batch
from dynrefer_core.data.generate import generate
from dynrefer_core.modeling.dynrefer import DynRefer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mini"))
    ap.add_argument("--images", type=int, default=170, help="generated scenes (about 6 regions each)")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--batch-regions", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_describe_"))
    ann_path = generate(args.seed, args.images, work)
    ann = json.loads(ann_path.read_text())
    model = DynRefer.from_pretrained(args.checkpoint, device="cpu")
    n_regions = len(ann["annotations"])
    print(f"{args.images} images, {n_regions} regions; model {args.checkpoint}; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")

    # The plain loop: one describe() per image, its regions in annotation order.
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    start = time.perf_counter()
    plain = []
    for im in ann["images"]:
        regions = by_image.get(im["id"], [])
        results = model.describe(work / "images" / im["file_name"], [a["bbox"] for a in regions])
        plain += [json.dumps({"region_id": a["id"], **r.to_dict()}) for a, r in zip(regions, results)]
    t_plain = time.perf_counter() - start

    out = work / "out.jsonl"
    start = time.perf_counter()
    writer = batch.JsonlWriter(out)
    summary = batch.run_local(model, batch.read_tasks(ann_path), set(), writer,
                              batch.DescribeSettings(batch_regions=args.batch_regions), workers=args.workers,
                              progress=False)
    writer.close()
    t_batch = time.perf_counter() - start

    lines = [json.loads(s) for s in out.read_text().splitlines()]
    reference = [json.loads(s) for s in plain]
    assert summary.failed == 0 and len(lines) == len(reference) == n_regions
    for got, want in zip(lines, reference):
        assert got["region_id"] == want["region_id"] and got["caption"] == want["caption"], (got, want)
        assert [t["name"] for t in got["tags"]] == [t["name"] for t in want["tags"]]
        assert abs(got["caption_score"] - want["caption_score"]) < 1e-4
    print("\n| path | regions | seconds | regions/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain loop, DynRefer.describe per image | {n_regions} | {t_plain:.1f} | {n_regions / t_plain:.1f} | 1.00x |")
    print(f"| dynrefer describe (batch {args.batch_regions}, {args.workers} workers) | {n_regions} | {t_batch:.1f} | "
          f"{n_regions / t_batch:.1f} | {t_plain / t_batch:.2f}x |")
    print(f"\noutputs equal: {n_regions} captions, tags and scores (1e-4)")


if __name__ == "__main__":
    main()
