"""Regenerate the demo's examples under assets/ (run once; the outputs are committed).

    python demo/make_assets.py

- assets/scenes/: held-out generated scenes (seed 2026, never used for training) with two ground-truth boxes
  each and three phrases: what the bundled checkpoints/mini model knows.
- assets/photos/: public-domain / CC0 photos shipped inside scikit-image (a dev dependency) with hand-picked
  boxes: the views work on them, meaningful captions need the released DynRefer weights.
- assets/examples.json: the list the app reads ({"image", "boxes", "phrases", "kind"}).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from dynrefer_core.data import generate  # noqa: E402

ASSETS = ROOT / "assets"
SCENE_SEED, NUM_SCENES = 2026, 4

# name in skimage.data -> (boxes (x1, y1, x2, y2) in its pixels, phrases, licence as its docstring states)
PHOTOS = {
    "astronaut": ([[150, 20, 300, 180], [280, 340, 510, 512]], "a smiling woman, a white helmet, an american flag",
                  "NASA, public domain"),
    "coffee": ([[160, 10, 410, 250], [315, 210, 410, 335]], "a cup of coffee, a silver spoon, a wooden table",
               "Rachel Michetti, CC0"),
    "chelsea": ([[125, 80, 215, 150], [220, 200, 295, 270]], "a green eye, a pink nose, a cat",
                "Stefan van der Walt, CC0"),
    "rocket": ([[295, 120, 345, 410], [0, 0, 90, 420]], "a white rocket, a launch tower, the night sky",
               "SpaceX, public domain"),
}


def make_scenes() -> list[dict]:
    examples = []
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(generate.generate(SCENE_SEED, NUM_SCENES, tmp, split="test").read_text())
        (ASSETS / "scenes").mkdir(parents=True, exist_ok=True)
        for image in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            # Two mid-sized objects; the phrases: their own attribute phrase plus one of a third object.
            anns.sort(key=lambda a: -(a["bbox"][2] - a["bbox"][0]) * (a["bbox"][3] - a["bbox"][1]))
            picked = anns[1:3] if len(anns) >= 3 else anns[:2]
            others = [a for a in anns if a not in picked]
            phrases = [" ".join(a["caption"].split()[:5]) for a in picked + others[:1]]
            name = image["file_name"]  # the generator's JPEG bytes, exactly what the model was trained on
            (ASSETS / "scenes" / name).write_bytes((Path(tmp) / "images" / name).read_bytes())
            examples.append({"image": f"scenes/{name}", "boxes": [[round(v) for v in a["bbox"]] for a in picked],
                             "phrases": ", ".join(phrases), "kind": "scene"})
    return examples


def make_photos() -> list[dict]:
    from skimage import data

    (ASSETS / "photos").mkdir(parents=True, exist_ok=True)
    examples, sources = [], ["# Photos from scikit-image's bundled sample data (skimage.data)", ""]
    for name, (boxes, phrases, licence) in PHOTOS.items():
        Image.fromarray(getattr(data, name)()).save(ASSETS / "photos" / f"{name}.jpg", quality=92)
        examples.append({"image": f"photos/{name}.jpg", "boxes": boxes, "phrases": phrases, "kind": "photo"})
        sources.append(f"- `{name}.jpg`: `skimage.data.{name}()`, {licence}.")
    (ASSETS / "photos" / "SOURCES.md").write_text("\n".join(sources) + "\n")
    return examples


def main() -> None:
    examples = make_scenes() + make_photos()
    (ASSETS / "examples.json").write_text("[\n" + ",\n".join(json.dumps(e) for e in examples) + "\n]\n")
    print(f"wrote {len(examples)} examples to {ASSETS / 'examples.json'}")


if __name__ == "__main__":
    main()
