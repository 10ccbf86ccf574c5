"""Describe everything: proposals -> describe -> confidence, NMS, best first; and dense captioning's evaluation."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dynrefer_core import evaluate as E
from dynrefer_core.automatic import AutomaticRegionDescriber
from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.proposals import load_proposer
from dynrefer_core.views import load_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proposal_file(scenes, tmp_path_factory):
    """Plain-JSON proposals for the shared scenes: each image's GT boxes (objectness 0.9, 0.8, ...), a box that
    nearly repeats the first one, and a box of background."""
    ann = load_annotations(scenes)
    table = {}
    for image_id, regions in ann.by_image().items():
        rows = [[*r.box, 0.9 - 0.05 * k] for k, r in enumerate(regions)]
        x1, y1, x2, y2 = regions[0].box
        rows.append([x1 + 1, y1, x2 + 1, y2, 0.2])  # IoU with the first box well above 0.7
        rows.append([0, 0, 30, 30, 0.1])
        table[ann.images[image_id].path.name] = rows
    path = tmp_path_factory.mktemp("proposals") / "proposals.json"
    path.write_text(json.dumps(table))
    return path


def test_describe_all_ranks_by_caption_probability_times_objectness(bundled_model, scenes, proposal_file):
    ann = load_annotations(scenes)
    image_id, regions = next(iter(ann.by_image().items()))
    path = ann.images[image_id].path
    proposer = load_proposer(f"file:{proposal_file}")
    results = bundled_model.describe_all(path, proposer, phrases=["a red star"])
    assert 0 < len(results) <= len(regions) + 2
    confidences = [r.confidence for r in results]
    assert confidences == sorted(confidences, reverse=True)
    for r in results:
        assert r.confidence == pytest.approx(r.caption_score * r.objectness, rel=1e-6)
        d = r.to_dict()
        assert d["objectness"] == r.objectness and d["confidence"] == r.confidence and d["caption"]
        assert [s["phrase"] for s in d["similarity"]] == ["a red star"]
    # The near-duplicate of the first box is suppressed in favour of the surer of the two.
    boxes = torch.tensor([r.box for r in results])
    from torchvision.ops import box_iou

    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert float(iou.max()) <= 0.7
    # Each answer is what describe says about that box.
    alone = bundled_model.describe(path, [results[0].box])[0]
    assert alone.caption == results[0].caption
    # A cap on the number of regions keeps the most likely objects.
    two = AutomaticRegionDescriber(bundled_model, proposer, max_regions=2).generate(path)
    assert sorted(r.objectness for r in two) == pytest.approx([0.85, 0.9])
    with pytest.raises(ValueError, match="max_regions=0"):
        AutomaticRegionDescriber(bundled_model, proposer, max_regions=0)
    assert load_image(path).size == (384, 384)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="DenseCap scores captions with METEOR (Java)")
def test_evaluate_dense_captioning_with_proposals_from_a_file(scenes, proposal_file, tmp_path):
    out = tmp_path / "dense.json"
    assert E.main(["--checkpoint", str(ROOT / "checkpoints" / "mini"), "--annotations", str(scenes), "--split", "all",
                   "--no-meteor", "--densecap", "proposals", "--proposals", str(proposal_file), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["densecap_protocol"] == "proposals" and res["proposal_recall"] == 1.0  # every GT box is proposed
    assert 0 < res["densecap_map"] <= res["densecap_det_map"] <= 1
    assert "proposed boxes, caption probability x objectness" in res["table"]
    assert res["settings"]["proposals"] == str(proposal_file)


def test_describe_all_takes_view_options(bundled_model, scenes, proposal_file):
    from dynrefer_core.views import ViewOptions

    ann = load_annotations(scenes)
    path = ann.images[next(iter(ann.by_image()))].path
    fixed = bundled_model.describe_all(path, load_proposer(f"file:{proposal_file}"), max_regions=2,
                                       views=ViewOptions(strategy="fixed", ts=(0.5, 1.0)))
    assert [r.plan.selected_ts for r in fixed] == [[0.0, 0.5, 1.0]] * 2
