"""The bundled model (checkpoints/mini) on the example scenes of the demo: its answers must not drift.

tests/data/bundled_mini_scenes.json holds what the model said for each box of the "scene" examples in
assets/examples.json (caption, caption score, tags above the model's threshold, category, selected views).
After a change that is meant to change these answers, regenerate the file, on the CPU with one thread as the
tests run, and say why in the commit:

    PYTHONPATH=. HF_HUB_OFFLINE=1 python tests/test_bundled_model.py
"""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).parent / "data" / "bundled_mini_scenes.json"


def scene_examples() -> list[dict]:
    examples = json.loads((ROOT / "assets" / "examples.json").read_text())
    return [e for e in examples if e["kind"] == "scene"]


def answers(model) -> list[dict]:
    """What the model says for every box of every scene example, in file order."""
    out = []
    for example in scene_examples():
        results = model.describe(ROOT / "assets" / example["image"], example["boxes"])
        for box, r in zip(example["boxes"], results):
            out.append({"image": example["image"], "box": box, "caption": r.caption,
                        "caption_score": round(r.caption_score, 4),
                        "tags": [[name, round(score, 4)] for name, score in r.tags], "category": r.category,
                        "views": list(r.plan.selected_ts)})
    return out


def test_the_bundled_model_still_says_what_it_said(bundled_model):
    recorded = json.loads(RECORD.read_text())
    got = answers(bundled_model)
    assert [(a["image"], a["box"]) for a in got] == [(a["image"], a["box"]) for a in recorded]
    assert len(got) == 8 and len({a["caption"] for a in recorded}) > 1
    for now, then in zip(got, recorded):
        where = f"{then['image']} {then['box']}"
        assert now["caption"] == then["caption"], where
        assert [name for name, _ in now["tags"]] == [name for name, _ in then["tags"]], where
        assert [s for _, s in now["tags"]] == pytest.approx([s for _, s in then["tags"]], abs=2e-3), where
        assert now["caption_score"] == pytest.approx(then["caption_score"], abs=2e-3), where
        assert (now["category"], now["views"]) == (then["category"], then["views"]), where


if __name__ == "__main__":
    from dynrefer_core.modeling.dynrefer import DynRefer

    torch.set_num_threads(1)
    model = DynRefer.from_pretrained(ROOT / "checkpoints" / "mini", device="cpu")
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text("[\n" + ",\n".join(json.dumps(a) for a in answers(model)) + "\n]\n")  # a line per box
    print(f"wrote {RECORD}")
