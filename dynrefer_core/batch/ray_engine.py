"""`dynrefer describe --engine ray`: the same records through a Ray Data actor pool (the optional [ray] extra)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from .engine import DescribeSettings, RunSummary, describe_prepared, prepare_image
from .inputs import ImageTask
from .records import JsonlWriter, region_key

class RayDescriber:
    """A Ray Data actor: loads the model once, then describes batches of images (rows {"task": json})."""

    def __init__(self, checkpoint: str, device: str | None, settings: DescribeSettings, done: set[str]):
        from ..modeling.dynrefer import DynRefer

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
