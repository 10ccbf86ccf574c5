"""The COCO-style region annotation format of the release (spec §5.3), read and written in one place.

    {"dataset": {"description", "image_root", "tag_list": [...] | "file.txt", "categories", "attributes", ...},
     "images": [{"id", "file_name", "width", "height", "split"?}],
     "annotations": [{"id", "image_id", "caption", "bbox": [x1, y1, x2, y2],
                      "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                      "extra_info": {"parser_result": {"tag_set1": [i], "tag_set2": [i]},   # indices into tag_list
                                     "tags": {"tag_set1": ["red"], "tag_set2": ["left of"]},  # or the strings
                                     "coco_result": {"category": "star"},
                                     "ovad_result": {"att_vec": [1, 0, -1, ...]},             # -1 = unlabeled
                                     "relation": {"relation": "left of", "neighbour_id": 7}}}]}

The release's converted RefCOCOg / VG files carry RAM indices in `parser_result` and no tag list: pass the
RAM list (`ram_tag_list.txt`) as `tag_list=` when loading them. Our generated files embed their tag list.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PUNCT = re.compile(r'[.!"()*#:;~]')


def normalize_caption(caption: str, max_words: int = 50) -> str:
    """The release's `blip_caption` text processor: lower-case, punctuation to spaces, <= 50 words."""
    words = _PUNCT.sub(" ", caption.lower()).split()
    return " ".join(words[:max_words])


def box_from_segmentation(seg: Any) -> tuple[float, float, float, float] | None:
    """Min/max of the polygon vertices (spec §1.1); degenerate boxes are widened to 1 px."""
    if not seg:
        return None
    if isinstance(seg, dict):  # RLE masks are not used by any release file; the bbox field is used instead
        return None
    polys = seg if isinstance(seg[0], (list, tuple)) else [seg]
    xs = [float(v) for p in polys for v in p[0::2]]
    ys = [float(v) for p in polys for v in p[1::2]]
    if not xs or not ys:
        return None
    x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)


def box_polygon(box: tuple[float, float, float, float]) -> list[list[float]]:
    x1, y1, x2, y2 = box
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def read_tag_list(path: str | Path) -> list[str]:
    """One tag per line (RAM's `ram_tag_list.txt` layout); blank lines are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


@dataclass
class Region:
    """One annotated region, resolved: tags as strings, the box as floats (x1, y1, x2, y2)."""

    id: int
    image_id: int
    box: tuple[float, float, float, float]
    caption: str
    tags: list[str] = field(default_factory=list)
    category: str | None = None
    att_vec: list[int] | None = None
    relation: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "image_id": self.image_id, "box": list(self.box), "caption": self.caption,
                "tags": self.tags, "category": self.category, "att_vec": self.att_vec, "relation": self.relation}


@dataclass
class ImageRecord:
    id: int
    path: Path
    width: int
    height: int
    split: str | None = None


@dataclass
class RegionAnnotations:
    """A loaded annotation file: images, regions (grouped per image on demand) and the label lists."""

    images: dict[int, ImageRecord]
    regions: list[Region]
    tag_list: list[str]
    categories: list[str]
    attributes: list[str]
    info: dict = field(default_factory=dict)

    def split(self, name: str | None) -> "RegionAnnotations":
        """Only the images (and their regions) of split `name`; files without splits are returned whole."""
        if name in (None, "all"):
            return self
        if all(im.split is None for im in self.images.values()):
            return self
        images = {k: im for k, im in self.images.items() if im.split == name}
        if not images:
            found = sorted({str(im.split) for im in self.images.values()})
            raise ValueError(f"split {name!r} has no images; the file's splits are {found}")
        regions = [r for r in self.regions if r.image_id in images]
        return RegionAnnotations(images, regions, self.tag_list, self.categories, self.attributes, self.info)

    def by_image(self) -> dict[int, list[Region]]:
        out: dict[int, list[Region]] = {}
        for r in self.regions:
            out.setdefault(r.image_id, []).append(r)
        return out


def load_annotations(path: str | Path, *, tag_list: list[str] | str | Path | None = None,
                     image_root: str | Path | None = None) -> RegionAnnotations:
    """Read a release-style or generated annotation file.

    `tag_list` resolves `parser_result` indices (required for the release's files, which only hold RAM
    indices); `image_root` overrides `dataset.image_root` (relative roots are relative to the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path} is not valid JSON: {e}") from None
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"annotation file {path} has no top-level {key!r}: expected the COCO-style "
                             "layout of spec §5.3 (dataset / images / annotations)")
    info = data.get("dataset") or {}
    tags = tag_list if tag_list is not None else info.get("tag_list")
    if isinstance(tags, (str, Path)):
        tp = Path(tags)
        tags = read_tag_list(tp if tp.is_absolute() or tp.exists() else path.parent / tp)
    tags = list(tags or [])
    root = Path(image_root if image_root is not None else info.get("image_root", "."))
    if not root.is_absolute():
        root = path.parent / root
    images = {int(im["id"]): ImageRecord(int(im["id"]), root / im["file_name"], int(im.get("width", 0)),
                                         int(im.get("height", 0)), im.get("split"))
              for im in data["images"]}
    regions = [_region(a, tags, path) for a in data["annotations"]]
    return RegionAnnotations(images, regions, tags, list(info.get("categories", [])),
                             list(info.get("attributes", [])), info)


def annotation_box(a: dict, path: Path) -> tuple[float, float, float, float]:
    """The region box of one annotation (spec 1.1): its polygon's extent, else its x1, y1, x2, y2 `bbox`."""
    box = box_from_segmentation(a.get("segmentation"))
    if box is None:
        if "bbox" not in a:
            raise ValueError(f"annotation {a.get('id')} in {path} has neither segmentation nor bbox")
        x1, y1, x2, y2 = (float(v) for v in a["bbox"])
        box = (x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0))
    return box


def _region(a: dict, tags: list[str], path: Path) -> Region:
    box = annotation_box(a, path)
    extra = a.get("extra_info") or {}
    names: list[str] = []
    if "tags" in extra:
        names = list(extra["tags"].get("tag_set1", [])) + list(extra["tags"].get("tag_set2", []))
    elif "parser_result" in extra:
        pr = extra["parser_result"]
        idx = list(pr.get("tag_set1", [])) + list(pr.get("tag_set2", []))
        if idx and not tags:
            raise ValueError(f"{path} stores tags as indices (parser_result) but no tag list was given: "
                             "pass tag_list= (e.g. RAM's ram_tag_list.txt)")
        bad = [i for i in idx if not 0 <= int(i) < len(tags)]
        if bad:
            raise ValueError(f"tag index {bad[0]} in annotation {a.get('id')} is outside the tag list "
                             f"({len(tags)} tags): is it the right tag list?")
        names = [tags[int(i)] for i in idx]
    names = list(dict.fromkeys(names))  # clip(set1 + set2, 0, 1): each tag once
    category = (extra.get("coco_result") or {}).get("category")
    att = (extra.get("ovad_result") or {}).get("att_vec")
    rel = (extra.get("relation") or {}).get("relation")
    return Region(int(a["id"]), int(a["image_id"]), box, normalize_caption(str(a.get("caption", ""))),
                  names, category, list(att) if att is not None else None, rel)
