"""The output of `dynrefer describe`: append-only JSONL that survives a kill, part files, the COCO form."""
from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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
