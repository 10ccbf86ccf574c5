"""Write a DynRefer-mini benchmark: images + `annotations.json` in the release's format (spec §5.3).

    python -m dynrefer_core.data.generate --seed 0 --num-images 8000 --out data/mini
    python -m dynrefer_core.data.generate --seed 123 --num-images 300 --out data/check --split test

With `--split all` (default) image i goes to val if i % 10 == 8, test if i % 10 == 9, else train; with
`--split NAME` every image is in NAME. Image i of seed S is the same whatever --num-images is.
"""
from __future__ import annotations

import argparse
import json
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from . import scenes
from .annotations import box_polygon


def split_of(index: int, split: str) -> str:
    if split != "all":
        return split
    return {8: "val", 9: "test"}.get(index % 10, "train")


def _one(job: tuple[int, int, str, str]) -> tuple[dict, list[dict]]:
    seed, index, out, split = job
    scene = scenes.generate_scene(scenes.scene_rng(seed, index))
    name = f"s{seed}_{index:06d}.jpg"
    (Path(out) / "images" / name).write_bytes(scene.jpeg)
    image_id = index + 1
    image = {"id": image_id, "file_name": name, "width": scene.image.width, "height": scene.image.height,
             "split": split_of(index, split)}
    tag_index = {t: i for i, t in enumerate(scenes.tag_vocabulary())}
    base = image_id * 100  # <= 12 objects per image, so ids stay unique and readable
    anns = []
    for k, o in enumerate(scene.objects):
        set1, set2 = scene.tags(k)
        box = [round(v, 2) for v in o.box]
        anns.append({
            "id": base + k, "image_id": image_id, "caption": scene.caption(k), "bbox": box,
            "segmentation": box_polygon(tuple(box)),
            "extra_info": {
                "parser_result": {"tag_set1": [tag_index[t] for t in set1], "tag_set2": [tag_index[t] for t in set2]},
                "tags": {"tag_set1": set1, "tag_set2": set2},
                "coco_result": {"category": o.category},
                "ovad_result": {"att_vec": scene.attributes(k)},
                "attributes": {"colour": o.colour, "pattern": o.pattern, "size": o.size},
                "relation": {"relation": o.relation, "neighbour_id": base + o.neighbour},
            },
        })
    return image, anns


def generate(seed: int, num_images: int, out: str | Path, split: str = "all", workers: int = 1) -> Path:
    """Generate `num_images` scenes into `out`; returns the path of annotations.json."""
    if num_images < 1:
        raise ValueError(f"--num-images {num_images} must be >= 1")
    if split not in ("all", "train", "val", "test"):
        raise ValueError(f"--split {split!r} must be one of all, train, val, test")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, str(out), split) for i in range(num_images)]
    images, annotations = [], []
    bar = dict(total=num_images, desc="scenes", unit="img")
    if workers > 1:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(_one, jobs, chunksize=16), **bar))
    else:
        results = [_one(j) for j in tqdm(jobs, **bar)]
    for image, anns in results:
        images.append(image)
        annotations.extend(anns)
    data = {
        "dataset": {
            "description": "DynRefer-mini: procedural region benchmark (dynrefer_core.data.scenes)",
            "image_root": "images", "seed": seed, "num_images": num_images, "split": split,
            "tag_list": scenes.tag_vocabulary(), "categories": list(scenes.CATEGORIES),
            "attributes": list(scenes.ATTRIBUTES),
        },
        "images": images,
        "annotations": annotations,
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--num-images", type=int, required=True)
    ap.add_argument("--out", required=True, help="output folder (images/ and annotations.json)")
    ap.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                    help="all: 80/10/10 train/val/test by image index; otherwise every image in that split")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    path = generate(args.seed, args.num_images, args.out, args.split, args.workers)
    data = json.loads(path.read_text())
    counts: dict[str, int] = {}
    for im in data["images"]:
        counts[im["split"]] = counts.get(im["split"], 0) + 1
    print(f"wrote {path}: {len(data['images'])} images {counts}, {len(data['annotations'])} regions")


if __name__ == "__main__":
    main()
