"""The local engine of `dynrefer describe`: views prepared in threads ahead of the model, regions of several
images per model batch, records written per batch; a torchrun rank runs the same on its shard."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..describe import describe_views, region_results
from ..views import RenderedViews, ViewOptions, load_image, prepare, region_box
from .inputs import ImageTask
from .records import JsonlWriter, region_key

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
    # One thread per image: the engine already prepares several images at once.
    rendered = prepare(image, [task.boxes[k] for k in keep], views, size, workers=1) if keep else None
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
