"""`dynrefer describe`, `python -m dynrefer_core.batch`, `torchrun -m dynrefer_core.batch` (see the package docstring)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..cli import add_view_arguments, view_options
from .engine import DescribeSettings, Rank, RunSummary, WorkerError, run_local
from .inputs import ImageTask, read_tasks
from .records import JsonlWriter, coco_results, merge_parts, part_paths, read_records, region_key, repair_tail

def build_parser(prog: str = "dynrefer describe") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/mini", help="model folder or Hugging Face Hub id")
    ap.add_argument("--input", required=True, help="JSONL, COCO-style .json, an image or a folder of images")
    ap.add_argument("--out", required=True, help="output JSONL, one line per region")
    ap.add_argument("--boxes", help="with an image or folder: the boxes of every image, '[[x1, y1, x2, y2], ...]'")
    ap.add_argument("--phrases", default="", help="with an image or folder: comma-separated phrases to score")
    ap.add_argument("--resume", action="store_true", help="continue --out, skipping the region ids it has")
    ap.add_argument("--coco-results", help="also write the COCO captioning-results form here")
    add_view_arguments(ap)
    ap.add_argument("--tag-threshold", type=float, default=None)
    ap.add_argument("--controls", default="", help="comma-separated words put before every caption control")
    ap.add_argument("--batch-regions", type=int, default=32, help="regions per model batch (across images)")
    ap.add_argument("--decoder", choices=["fast", "hf"], default="fast",
                    help="caption decoding: our static-cache beam search, or transformers' generate (the same captions)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes decoding images and planning and rendering views (default: the cores but one, "
                         "at most 8; 0: in the main process)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: runtime's choice)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--engine", choices=["local", "ray"], default="local")
    ap.add_argument("--num-workers", type=int, default=1, help="--engine ray: model actors")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="--engine ray: GPUs per actor")
    ap.add_argument("--address", default=None, help="--engine ray: cluster address (default: local or RAY_ADDRESS)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _settings(args, ap) -> DescribeSettings:
    if args.batch_regions < 1:
        ap.error("--batch-regions must be >= 1")
    views = view_options(args, ap)
    controls = tuple(c.strip() for c in args.controls.split(",") if c.strip())
    return DescribeSettings(views, args.tag_threshold, controls, args.batch_regions, {"decoder": args.decoder})


def _input_boxes(args, ap) -> list | None:
    if args.boxes is None:
        return None
    try:
        boxes = json.loads(args.boxes)
    except json.JSONDecodeError as err:
        ap.error(f"--boxes is not JSON ({err.msg}): give '[[x1, y1, x2, y2], ...]'")
    if isinstance(boxes, list) and len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]
    if not isinstance(boxes, list) or not boxes or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
        ap.error("--boxes must be a JSON list of [x1, y1, x2, y2]")
    return boxes


def main(argv: list[str] | None = None) -> int:
    ap = build_parser("python -m dynrefer_core.batch" if argv is None else "dynrefer describe")
    args = ap.parse_args(argv)
    settings = _settings(args, ap)
    boxes = _input_boxes(args, ap)
    phrases = tuple(p.strip() for p in args.phrases.split(",") if p.strip())
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = Rank.from_env()
    if rank.world > 1 and args.engine == "ray":
        ap.error("--engine ray runs its own workers: start it once, not under torchrun")
    if rank.world > 1:
        torch.distributed.init_process_group("gloo")

    def tasks() -> Iterator[ImageTask]:
        for t in read_tasks(args.input, boxes):
            yield dataclasses.replace(t, phrases=phrases) if phrases and boxes is not None else t

    try:
        # Every rank checks (so that all stop alike); only rank 0 repairs and merges what a killed run left.
        if out.exists() and out.stat().st_size and not args.resume:
            raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
        if part_paths(out) and not args.resume:
            raise FileExistsError(f"{out}.part-* exist from a killed torchrun run: pass --resume, or delete them")
        images = total = 0  # one pass over the input: fails early on a bad --input, sizes the progress bar
        for t in tasks():
            images += 1
            total += len(t.region_ids) if t.index % rank.world == rank.rank else 0
        if not images:
            raise ValueError(f"{args.input} has no images to describe")
        if rank.rank == 0 and args.resume:
            repair_tail(out)
            merge_parts(out)
        rank.barrier()
        done = {region_key(r["region_id"]) for r in read_records(out)} if args.resume else set()
        if rank.world == 1:
            total -= len(done)
        if args.engine == "ray":
            writer = JsonlWriter(out)
            from .ray_engine import run_ray  # Ray is an optional extra

            summary = run_ray(args.checkpoint, tasks(), done, writer, settings, num_workers=args.num_workers,
                              gpus_per_worker=args.gpus_per_worker, address=args.address, device=args.device,
                              progress=not args.no_progress)
        else:
            from ..modeling.dynrefer import DynRefer

            device = args.device
            if device is None and rank.world > 1 and torch.cuda.is_available():
                device = f"cuda:{rank.local_rank}"
            model = DynRefer.from_pretrained(args.checkpoint, device=device)
            mine = (t for t in tasks() if t.index % rank.world == rank.rank)
            writer = JsonlWriter(out if rank.world == 1 else out.with_name(f"{out.name}.part-{rank.rank}"))
            summary = run_local(model, mine, done, writer, settings, workers=args.workers, total=max(total, 0),
                                progress=not args.no_progress and rank.rank == 0, with_index=rank.world > 1)
        writer.close()
        rank.barrier()
        failed = summary.failed
        if rank.world > 1:
            counts = torch.tensor([summary.regions, summary.failed])
            torch.distributed.all_reduce(counts)
            summary = RunSummary(int(counts[0]), int(counts[1]))
            if rank.rank == 0:
                merge_parts(out)
        if rank.rank == 0:
            if args.coco_results:
                Path(args.coco_results).write_text(json.dumps(coco_results(read_records(out))) + "\n")
            print(f"described {summary.regions - summary.failed} regions, {summary.failed} failed"
                  + (f" (their lines in {out} say why)" if summary.failed else "") + f"; output: {out}")
        return 1 if failed else 0
    except (FileNotFoundError, FileExistsError, ValueError, WorkerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if rank.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


