"""Describe regions at dataset scale: many images, many boxes, one JSON line per region.

    dynrefer describe --checkpoint checkpoints/mini --input regions.jsonl --out out.jsonl [--resume]
    dynrefer describe --checkpoint DIR --input annotations.json --out out.jsonl --coco-results res.json
    dynrefer describe --checkpoint DIR --input photos/ --boxes '[[10, 20, 200, 180]]' --out out.jsonl
    torchrun --nproc_per_node 4 -m dynrefer_core.batch --checkpoint DIR --input FILE --out out.jsonl
    dynrefer describe ... --engine ray --num-workers 8 --gpus-per-worker 1 [--address ray://head:10001]

Input: a JSONL file, one image a line, `{"image": "a.jpg", "boxes": [[x1, y1, x2, y2], ...], "phrases": [...],
"id": ...}` (`phrases` and `id` optional, relative paths against the file's folder); a COCO-style annotation
file (ours or the release's: every annotation's box); or an image file or folder with `--boxes`.

Output: one line per region with `image`, `image_id`, `region_id` (the annotation id, else "<image id>:<box
index>"), `box`, `caption`, `caption_score`, `tags`, `similarity`, `category`, `class_scores`, `selected_ts`,
`control`, `box_rounding`; a region that fails gets a line with the same ids and an `error` instead.
Lines are appended and flushed per batch, so a killed run loses at most the batch in flight; `--resume`
skips the region ids already in the output. Images are decoded and their views planned and rendered in
worker processes while the model runs, and regions of several images share a batch.
"""
from .command import main
from .engine import DescribeSettings, Rank, RunSummary, default_workers, describe_prepared, prepare_image, run_local
from .inputs import ImageTask, read_tasks
from .records import JsonlWriter, coco_results, merge_parts, read_records, region_key, repair_tail

__all__ = ["DescribeSettings", "ImageTask", "JsonlWriter", "Rank", "RunSummary", "coco_results", "default_workers",
           "describe_prepared", "main", "merge_parts", "prepare_image", "read_records", "read_tasks", "region_key",
           "repair_tail", "run_local"]
