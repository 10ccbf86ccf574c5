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
worker threads while the model runs, and regions of several images share a batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .data.annotations import annotation_box
from .describe import describe_views, region_results
from .cli import add_view_arguments, view_options
from .views import RenderedViews, ViewOptions, load_image, prepare, region_box

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------- input
@dataclass
class ImageTask:
    """One image of the input and its regions. `error`: the input entry itself is unusable."""

    index: int
    image: str
    path: Path
    image_id: Any
    boxes: list
    region_ids: list
    phrases: tuple[str, ...] = ()
    error: str | None = None


def read_tasks(source: str | Path, boxes: Sequence[Sequence[float]] | None = None) -> Iterator[ImageTask]:
    """The images of `source` in input order (streamed for JSONL, images and folders)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--input {source} does not exist")
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        if boxes is None:
            raise ValueError(f"--input {source} is an image or a folder: give the boxes with --boxes '[[x1, y1, x2, y2]]'")
        return _image_tasks(source, [list(b) for b in boxes])
    if boxes is not None:
        raise ValueError("--boxes is for an image or a folder; a JSONL or COCO file brings its own boxes")
    if source.suffix.lower() == ".jsonl":
        return _jsonl_tasks(source)
    if source.suffix.lower() == ".json":
        return _coco_tasks(source)
    raise ValueError(f"--input {source}: expected a .jsonl file, a COCO-style .json file, an image or a folder")


def _jsonl_tasks(path: Path) -> Iterator[ImageTask]:
    seen: set[str] = set()
    index = 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path.name} line {number} is not valid JSON ({err.msg})") from None
                if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                    raise ValueError('each line must be an object with "image" (a path) and "boxes"')
                boxes = entry.get("boxes")
                if not isinstance(boxes, list):
                    raise ValueError('"boxes" must be a list of [x1, y1, x2, y2]')
                phrases = entry.get("phrases") or []
                if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
                    raise ValueError('"phrases" must be a list of strings')
                image_id = entry.get("id", entry["image"])
                if json.dumps(image_id) in seen:
                    raise ValueError(f"image id {image_id!r} appears twice: give each line its own \"id\"")
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                yield ImageTask(index, f"{path.name}:{number}", path, where, [None], [where], error=str(err))
                index += 1
                continue
            seen.add(json.dumps(image_id))
            image = Path(entry["image"])
            yield ImageTask(index, entry["image"], image if image.is_absolute() else path.parent / image, image_id,
                            boxes, [f"{image_id}:{k}" for k in range(len(boxes))], tuple(phrases))
            index += 1


def _coco_tasks(path: Path) -> Iterator[ImageTask]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, annotations = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a COCO-style annotation file with 'images' and 'annotations' ({err})") from err
    root = Path((data.get("dataset") or {}).get("image_root", "."))
    root = root if root.is_absolute() else path.parent / root
    by_image: dict[int, list[dict]] = {}
    for a in annotations:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    for index, im in enumerate(i for i in images if int(i["id"]) in by_image):
        regions = by_image[int(im["id"])]
        boxes = []
        for a in regions:
            try:
                boxes.append(list(annotation_box(a, path)))
            except ValueError:
                boxes.append(None)  # reported on this region's line
        yield ImageTask(index, im["file_name"], root / im["file_name"], int(im["id"]), boxes, [a["id"] for a in regions])


def _image_tasks(source: Path, boxes: list) -> Iterator[ImageTask]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        names = [p.relative_to(source).as_posix() for p in files]
    else:
        files, names = [source], [source.name]
    for index, (file, name) in enumerate(zip(files, names)):
        yield ImageTask(index, name, file, name, boxes, [f"{name}:{k}" for k in range(len(boxes))])


# ---------------------------------------------------------------------------------------------- output
def region_key(region_id: Any) -> str:
    return json.dumps(region_id)


def repair_tail(path: Path) -> None:
    """Cut a line that a killed run left half-written (the batch in flight is described again)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_records(path: Path) -> Iterator[dict]:
    """The complete lines of an output (a half-written last line is skipped)."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


class JsonlWriter:
    """Append-only JSONL: each `write` is one flushed, fsync'ed block of whole lines."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.file = path.open("a", encoding="utf-8")

    def write(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if text:
            self.file.write(text)
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def coco_results(records: Iterable[dict]) -> list[dict]:
    """The COCO captioning-results form of the described regions (failed ones left out), with each region's
    id, its box as COCO's [x, y, w, h] and the caption probability as the score."""
    out = []
    for r in records:
        if "error" in r:
            continue
        x1, y1, x2, y2 = r["box"]
        out.append({"image_id": r["image_id"], "id": r["region_id"], "caption": r["caption"],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": r["caption_score"]})
    return out


# ---------------------------------------------------------------------------------------------- model side
@dataclass(frozen=True)
class DescribeSettings:
    """What every region of a run is described with (the options of `describe`)."""

    views: ViewOptions = field(default_factory=ViewOptions)
    tag_threshold: float | None = None
    controls: tuple[str, ...] = ()
    batch_regions: int = 32
    generation: dict = field(default_factory=dict)


@dataclass
class PreparedImage:
    """An image's pending regions, rendered (`keep`: their box indices) or failed (`errors`)."""

    task: ImageTask
    keep: list[int]
    views: RenderedViews | None
    errors: dict[int, str]


def prepare_image(task: ImageTask, pending: Sequence[int], views: ViewOptions, size: int) -> PreparedImage:
    """The CPU side for one image (runs in a worker thread): every failure becomes its regions' error."""
    if task.error is not None:
        return PreparedImage(task, [], None, {k: task.error for k in pending})
    try:
        image = load_image(task.path)
    except Exception as err:  # unreadable, missing, corrupt: the run goes on
        return PreparedImage(task, [], None, {k: f"{type(err).__name__}: {err}" for k in pending})
    keep, errors = [], {}
    for k in pending:
        try:
            if task.boxes[k] is None:
                raise ValueError("the annotation has no usable box")
            region_box(task.boxes[k], image.size)
            keep.append(k)
        except (TypeError, ValueError) as err:
            errors[k] = str(err)
    rendered = prepare(image, [task.boxes[k] for k in keep], views, size) if keep else None
    return PreparedImage(task, keep, rendered, errors)


def describe_prepared(model, items: Sequence[PreparedImage], settings: DescribeSettings) -> list[list[dict]]:
    """The model on the regions of several images at once: per image, one record per region in box order."""
    rendered = [it for it in items if it.keep]
    phrases = list(dict.fromkeys(p.strip() for it in rendered for p in it.task.phrases if p.strip()))
    results: list = []
    if rendered:
        out = describe_views(model, torch.cat([it.views.pixel_values for it in rendered]),
                             torch.cat([it.views.boxes for it in rendered]), phrases=phrases,
                             controls=settings.controls, tag_threshold=settings.tag_threshold,
                             batch_size=settings.batch_regions, **settings.generation)
        plans = [p for it in rendered for p in it.views.plans]
        results = region_results(plans, out, phrases, box_rounding=rendered[0].views.box_rounding)
    records, position = [], 0
    for it in items:
        by_box = {}
        for k in it.keep:
            by_box[k] = _record(it.task, k, results[position])
            position += 1
        for k, message in it.errors.items():
            by_box[k] = {**_ids(it.task, k), "error": message}
        records.append([by_box[k] for k in sorted(by_box)])
    return records


def _ids(task: ImageTask, k: int) -> dict:
    box = task.boxes[k] if k < len(task.boxes) else None
    return {"image": task.image, "image_id": task.image_id, "region_id": task.region_ids[k],
            "box": box if isinstance(box, list) else None}


def _record(task: ImageTask, k: int, result) -> dict:
    own = set(task.phrases)
    d = result.to_dict()
    for key in ("views", "timings"):  # per region at dataset scale: the chosen ts say which views were used
        d.pop(key)
    d["similarity"] = [s for s in d["similarity"] if s["phrase"] in own]
    return {**_ids(task, k), **d}


# ---------------------------------------------------------------------------------------------- running
def prefetch(fn: Callable, items: Iterable, workers: int, depth: int) -> Iterator:
    """fn(item) for each item on `workers` threads, at most `depth` ahead, results in input order."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="describe-prepare") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class RunSummary:
    regions: int = 0
    failed: int = 0


def run_local(model, tasks: Iterable[ImageTask], done: set[str], writer: JsonlWriter, settings: DescribeSettings,
              *, workers: int = 2, total: int | None = None, progress: bool = True,
              with_index: bool = False) -> RunSummary:
    """Describe every pending region of `tasks` (those whose id is not in `done`), writing each batch's records
    as soon as it is done. `with_index`: tag records with their image's input position (for merging parts)."""
    views = settings.views.resolve(model.config)
    size = model.config.image_size
    work = ((t, [k for k, rid in enumerate(t.region_ids) if region_key(rid) not in done]) for t in tasks)
    summary = RunSummary()
    bar = tqdm(total=total, unit="region", desc="describe", disable=not progress, dynamic_ncols=True)
    batch: list[PreparedImage] = []

    def flush() -> None:
        per_image = describe_prepared(model, batch, settings)
        records = [{**r, "_index": it.task.index} if with_index else r
                   for it, recs in zip(batch, per_image) for r in recs]
        writer.write(records)
        summary.regions += len(records)
        summary.failed += sum("error" in r for r in records)
        bar.update(len(records))
        batch.clear()

    prepared = prefetch(lambda tp: prepare_image(tp[0], tp[1], views, size), (tp for tp in work if tp[1]),
                        workers, depth=2 * workers + 2)
    for item in prepared:
        batch.append(item)
        if sum(len(it.keep) for it in batch) >= settings.batch_regions:
            flush()
    if batch:
        flush()
    bar.close()
    return summary


# ---------------------------------------------------------------------------------------------- several processes
@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Rank":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def part_paths(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part-*"))


def merge_parts(out: Path) -> int:
    """Append the ranks' part files to `out` in input order (each part is in order already), then delete
    them; returns how many of the merged regions failed."""
    parts = part_paths(out)
    for part in parts:
        repair_tail(part)
    writer = JsonlWriter(out)
    failed, block = 0, []
    for record in heapq.merge(*(read_records(p) for p in parts), key=lambda r: r["_index"]):
        record.pop("_index")
        failed += "error" in record
        block.append(record)
        if len(block) >= 1000:
            writer.write(block)
            block = []
    writer.write(block)
    writer.close()
    for part in parts:
        part.unlink()
    return failed


# ---------------------------------------------------------------------------------------------- Ray Data
class RayDescriber:
    """A Ray Data actor: loads the model once, then describes batches of images (rows {"task": json})."""

    def __init__(self, checkpoint: str, device: str | None, settings: DescribeSettings, done: set[str]):
        from .modeling.dynrefer import DynRefer

        self.model = DynRefer.from_pretrained(checkpoint, device=device)
        self.settings, self.done = settings, done

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        views = self.settings.views.resolve(self.model.config)
        items = []
        for row in batch["task"]:
            task = _task_from_json(row)
            pending = [k for k, rid in enumerate(task.region_ids) if region_key(rid) not in self.done]
            if pending:
                items.append(prepare_image(task, pending, views, self.model.config.image_size))
        records = [r for recs in describe_prepared(self.model, items, self.settings) for r in recs]
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def _task_to_json(task: ImageTask) -> str:
    return json.dumps({**dataclasses.asdict(task), "path": str(task.path)})


def _task_from_json(text: str) -> ImageTask:
    d = json.loads(text)
    return ImageTask(**{**d, "path": Path(d["path"]), "phrases": tuple(d["phrases"])})


def run_ray(checkpoint: str, tasks: Iterable[ImageTask], done: set[str], writer: JsonlWriter,
            settings: DescribeSettings, *, num_workers: int = 1, gpus_per_worker: float = 0.0,
            address: str | None = None, device: str | None = None, images_per_batch: int = 8,
            progress: bool = True) -> RunSummary:
    """The same records through Ray Data: an actor pool of `num_workers` models, batches of images in, records
    out in input order, written by this (driver) process."""
    try:
        import ray
    except ImportError as err:
        raise SystemExit("--engine ray needs Ray Data: pip install '.[ray]' (or pip install 'ray[data]')") from err
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    rows = [{"task": _task_to_json(t)} for t in tasks
            if any(region_key(rid) not in done for rid in t.region_ids)]
    summary = RunSummary()
    if not rows:
        return summary
    dataset = ray.data.from_items(rows).map_batches(
        RayDescriber, fn_constructor_kwargs={"checkpoint": checkpoint, "device": device, "settings": settings,
                                             "done": done},
        batch_size=images_per_batch, concurrency=num_workers, num_gpus=gpus_per_worker or None, batch_format="numpy")
    bar = tqdm(unit="region", desc="describe (ray)", disable=not progress, dynamic_ncols=True)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        records = [json.loads(r) for r in batch["record"]]
        writer.write(records)
        summary.regions += len(records)
        summary.failed += sum("error" in r for r in records)
        bar.update(len(records))
    bar.close()
    return summary


# ---------------------------------------------------------------------------------------------- command
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
    ap.add_argument("--workers", type=int, default=2, help="threads decoding images and rendering views")
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
    return DescribeSettings(views, args.tag_threshold, controls, args.batch_regions)


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
        if next(read_tasks(args.input, boxes), None) is None:  # also fails early on a bad --input
            raise ValueError(f"{args.input} has no images to describe")
        if rank.rank == 0 and args.resume:
            repair_tail(out)
            merge_parts(out)
        rank.barrier()
        done = {region_key(r["region_id"]) for r in read_records(out)} if args.resume else set()
        total = sum(len(t.region_ids) for t in tasks() if t.index % rank.world == rank.rank) - (
            len(done) if rank.world == 1 else 0)
        if args.engine == "ray":
            writer = JsonlWriter(out)
            summary = run_ray(args.checkpoint, tasks(), done, writer, settings, num_workers=args.num_workers,
                              gpus_per_worker=args.gpus_per_worker, address=args.address, device=args.device,
                              progress=not args.no_progress)
        else:
            from .modeling.dynrefer import DynRefer

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
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if rank.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
