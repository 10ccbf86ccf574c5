"""The inputs of `dynrefer describe` (JSONL, COCO-style files, images and folders) as a stream of ImageTasks."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.annotations import annotation_box

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
