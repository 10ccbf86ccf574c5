"""Regions/s of `dynrefer describe` (batched across images, views prepared ahead in threads) against a plain
loop calling `DynRefer.describe` once per image, in the same run, on generated scenes; outputs asserted equal.

    python bench/bench_describe.py [--images 170] [--rounds 3] [--batch-regions 32] [--workers N] [--seed 777]

Both paths use the same model, threads and regions; the plain loop is what a user writes by hand (load,
describe, json.dumps per region). They alternate over `--rounds` rounds (plain first, then the engine first,
...), after one untimed warm-up of each on a few images, so that a machine whose speed drifts slows both alike;
the speed-up is the median of the rounds' ratios. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dynrefer_core import batch
from dynrefer_core.data.generate import generate
from dynrefer_core.modeling.dynrefer import DynRefer

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(model: DynRefer, ann: dict, image_dir: Path) -> list[dict]:
    """One describe() per image, its regions in annotation order."""
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    lines = []
    for im in ann["images"]:
        regions = by_image.get(im["id"], [])
        results = model.describe(image_dir / im["file_name"], [a["bbox"] for a in regions])
        lines += [json.dumps({"region_id": a["id"], **r.to_dict()}) for a, r in zip(regions, results)]
    return [json.loads(s) for s in lines]


def engine(model: DynRefer, ann_path: Path, out: Path, batch_regions: int, workers: int) -> list[dict]:
    writer = batch.JsonlWriter(out)
    summary = batch.run_local(model, batch.read_tasks(ann_path), set(), writer,
                              batch.DescribeSettings(batch_regions=batch_regions), workers=workers, progress=False)
    writer.close()
    assert summary.failed == 0
    return [json.loads(s) for s in out.read_text().splitlines()]


def assert_same(lines: list[dict], reference: list[dict]) -> None:
    assert len(lines) == len(reference)
    for got, want in zip(lines, reference):
        assert got["region_id"] == want["region_id"] and got["caption"] == want["caption"], (got, want)
        assert [t["name"] for t in got["tags"]] == [t["name"] for t in want["tags"]]
        assert abs(got["caption_score"] - want["caption_score"]) < 1e-4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mini"))
    ap.add_argument("--images", type=int, default=170, help="generated scenes (about 6 regions each)")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--rounds", type=int, default=3, help="plain loop and engine alternated this many times")
    ap.add_argument("--batch-regions", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="preparing processes (default: dynrefer describe's)")
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
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; {args.rounds} rounds")

    workers = batch.default_workers() if args.workers is None else args.workers
    warm = {"images": ann["images"][:4], "annotations": [a for a in ann["annotations"]
                                                          if a["image_id"] in {im["id"] for im in ann["images"][:4]}]}
    (work / "warm.json").write_text(json.dumps({**ann, **warm}))
    plain_loop(model, warm, work / "images")
    engine(model, work / "warm.json", work / "warm.jsonl", args.batch_regions, workers)

    seconds: dict[str, list[float]] = {"plain": [], "engine": []}
    reference = None
    for r in range(args.rounds):
        order = ("plain", "engine") if r % 2 == 0 else ("engine", "plain")
        for path in order:
            start = time.perf_counter()
            if path == "plain":
                lines = plain_loop(model, ann, work / "images")
            else:
                lines = engine(model, ann_path, work / f"out{r}.jsonl", args.batch_regions, workers)
            seconds[path].append(time.perf_counter() - start)
            reference = reference or lines
            assert_same(lines, reference)
    ratios = [p / e for p, e in zip(seconds["plain"], seconds["engine"])]
    plain, fast = statistics.median(seconds["plain"]), statistics.median(seconds["engine"])
    print("\n| path | regions | seconds (median) | regions/s | speed-up (median of rounds) | rounds |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| plain loop, DynRefer.describe per image | {n_regions} | {plain:.1f} | {n_regions / plain:.1f} | 1.00x | "
          f"{' '.join(f'{s:.1f}' for s in seconds['plain'])} s |")
    print(f"| dynrefer describe (batch {args.batch_regions}, {workers} workers) | {n_regions} | {fast:.1f} | "
          f"{n_regions / fast:.1f} | {statistics.median(ratios):.2f}x | {' '.join(f'{x:.2f}x' for x in ratios)} |")
    print(f"\noutputs equal in every round: {n_regions} captions, tags and scores (1e-4)")


if __name__ == "__main__":
    main()
