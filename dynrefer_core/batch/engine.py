"""The local engine of `dynrefer describe`: views prepared in worker processes ahead of the model, regions of
several images per model batch, records written per batch; a torchrun rank runs the same on its shard."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..describe import describe_views, region_results
from ..views import RenderedViews, ViewOptions, load_image, prepare, region_box
from .inputs import ImageTask
from .records import JsonlWriter, region_key


def default_workers() -> int:
    """Processes preparing images: every core but one (the model's main thread), at most 8, at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


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
    """The CPU side for one image (runs in a worker process): every failure becomes its regions' error."""
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


def call_size(regions: int, batch_regions: int) -> int:
    """Regions per model call for a batch of `regions`: equal calls of about `batch_regions`.

    A batch ends on an image boundary, so it holds a few regions more than batch_regions; 37 regions make one
    call, not 32 + 5, where the 5 would pay a whole call's overhead (over images of about 6 regions that split
    made 18 calls of 10 batches; removing it took bench_describe from 1.46x to 1.68x)."""
    calls = max(1, round(regions / batch_regions))
    return -(-regions // calls)


def describe_prepared(model, items: Sequence[PreparedImage], settings: DescribeSettings) -> list[list[dict]]:
    """The model on the regions of several images at once: per image, one record per region in box order."""
    rendered = [it for it in items if it.keep]
    phrases = list(dict.fromkeys(p.strip() for it in rendered for p in it.task.phrases if p.strip()))
    results: list = []
    if rendered:
        pixel_values = torch.cat([it.views.pixel_values for it in rendered])
        out = describe_views(model, pixel_values, torch.cat([it.views.boxes for it in rendered]), phrases=phrases,
                             controls=settings.controls, tag_threshold=settings.tag_threshold,
                             batch_size=call_size(len(pixel_values), settings.batch_regions), **settings.generation)
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


class WorkerError(RuntimeError):
    """A process preparing images died (killed, out of memory, a crash in an image library)."""


class Preparer:
    """Prepares images ahead of the model in `workers` processes (0: in this process), in input order, keeping
    about `ahead` regions in flight (two model batches: the next batch is ready when the model wants it).

    Processes, not threads: measured on our 2 cores, a thread preparing images next to the model slows the
    model by 35 % (both want the GIL: planning and rendering hold it between their C calls), a process by 5 %.
    The workers are forked (on Linux; spawned elsewhere) when the preparer is made, before any other thread of
    the run starts; they use one torch thread each, leave Ctrl-C to the main process and exit when it dies
    (even by SIGKILL). Arrays come back by value (cheaper for the receiving process than torch's shared-memory
    handles, measured); the PIL crops, which no record shows, do not come back.
    """

    def __init__(self, views: ViewOptions, size: int, workers: int, ahead: int = 64):
        self.views, self.size, self.workers, self.ahead = views, size, workers, ahead
        self.pool = None
        if workers > 0:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                            initargs=(os.getpid(),))
            self.pool.submit(int).result()  # start the workers now, while this is the only thread

    def map(self, work: Iterable[tuple[ImageTask, list[int]]]) -> Iterator[PreparedImage]:
        if self.pool is None:
            for task, pending in work:
                yield prepare_image(task, pending, self.views, self.size)
            return
        in_flight: deque = deque()  # (image, future, its pending regions)
        regions = 0
        try:
            for task, pending in work:
                future = self.pool.submit(_prepare_for_transfer, task, pending, self.views, self.size)
                in_flight.append((task.image, future, len(pending)))
                regions += len(pending)
                while len(in_flight) > self.workers and regions >= self.ahead:
                    _, future, n = in_flight.popleft()
                    regions -= n
                    yield _received(future.result())
            for _, future, _ in in_flight:
                yield _received(future.result())
        except BrokenProcessPool as err:
            images = ", ".join(image for image, _, _ in list(in_flight)[:3])
            raise WorkerError(f"a process preparing images died (out of memory, killed, or a crash reading one "
                              f"of {images} ...); the lines written so far are kept: run again with --resume, "
                              f"or with --workers 0 to see the failing image's error") from err

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Preparer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _init_worker(parent: int) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker's watch: a run killed with SIGKILL cannot shut its pool down, and a forked worker holds the
    write end of its own task pipe, so it would wait for work forever; it leaves once it is orphaned."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _prepare_for_transfer(task: ImageTask, pending: list[int], views: ViewOptions, size: int) -> PreparedImage:
    item = prepare_image(task, pending, views, size)
    if item.views is not None:
        item.views = dataclasses.replace(item.views, crops=[], pixel_values=item.views.pixel_values.numpy(),
                                         boxes=item.views.boxes.numpy())
    return item


def _received(item: PreparedImage) -> PreparedImage:
    if item.views is not None:
        item.views = dataclasses.replace(item.views, pixel_values=torch.from_numpy(item.views.pixel_values),
                                         boxes=torch.from_numpy(item.views.boxes))
    return item


@dataclass
class RunSummary:
    regions: int = 0
    failed: int = 0


def run_local(model, tasks: Iterable[ImageTask], done: set[str], writer: JsonlWriter, settings: DescribeSettings,
              *, workers: int | None = None, total: int | None = None, progress: bool = True,
              with_index: bool = False) -> RunSummary:
    """Describe every pending region of `tasks` (those whose id is not in `done`), writing each batch's records
    as soon as it is done. `workers`: processes preparing images (default: `default_workers()`; 0: prepare
    in this process). `with_index`: tag records with their image's input position (for merging parts)."""
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers={workers}: give 0 (prepare in this process) or more")
    views = settings.views.resolve(model.config)
    work = ((t, [k for k, rid in enumerate(t.region_ids) if region_key(rid) not in done]) for t in tasks)
    summary = RunSummary()
    batch: list[PreparedImage] = []
    with Preparer(views, model.config.image_size, workers, ahead=2 * settings.batch_regions) as preparer:
        bar = tqdm(total=total, unit="region", desc="describe", disable=not progress, dynamic_ncols=True)

        def flush() -> None:
            per_image = describe_prepared(model, batch, settings)
            records = [{**r, "_index": it.task.index} if with_index else r
                       for it, recs in zip(batch, per_image) for r in recs]
            writer.write(records)
            summary.regions += len(records)
            summary.failed += sum("error" in r for r in records)
            bar.update(len(records))
            batch.clear()

        for item in preparer.map((t, pending) for t, pending in work if pending):
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
