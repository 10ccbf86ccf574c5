"""The predictor: prepare (CPU side) + describe_views (model side), and describe() that chains them."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.describe import describe_views, threshold_tags
from dynrefer_core.evaluate import evaluate_model
from dynrefer_core.views import BoxError, ViewOptions, plan_views_batch, prepare, render_views

PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # a real 512x600 photo shipped with matplotlib


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (200, 260, 3), dtype=np.uint8))


def test_threshold_tags_keeps_scores_above_the_threshold_best_first():
    probs = torch.tensor([[0.2, 0.9, 0.75, 0.7], [0.1, 0.1, 0.1, 0.1]])
    assert threshold_tags(probs, ["a", "b", "c", "d"], 0.7) == [[("b", pytest.approx(0.9)), ("c", pytest.approx(0.75))],
                                                                []]


def test_describe_is_prepare_then_describe_views(tiny_model, photo):
    boxes = [(10, 20, 90, 120), (100, 40, 250, 190)]
    views = ViewOptions().resolve(tiny_model.config)
    rendered = prepare(photo, boxes, views, tiny_model.config.image_size)
    out = describe_views(tiny_model, rendered.pixel_values, rendered.boxes, phrases=["a cat", "sky"], tag_threshold=0.3,
                         controls=["red"])
    results = tiny_model.describe(photo, boxes, phrases=["a cat", "sky"], tag_threshold=0.3, controls=["red"])
    assert [r.caption for r in results] == out.captions and len(out) == 2
    for i, r in enumerate(results):
        assert r.tags == out.tags[i] and r.control == out.controls[i] and r.control.startswith("red")
        assert r.caption_score == pytest.approx(out.caption_scores[i], abs=1e-6)
        assert [s for _, s in r.similarity] == pytest.approx(out.similarity[i].tolist(), abs=1e-6)
        assert r.category == out.classes[int(out.class_scores[i].argmax())]
        assert r.plan.selected_ts == rendered.plans[i].selected_ts
        # describe hands back the S x S crops it rendered: no second rendering needed to show them
        assert [np.asarray(c).tolist() for c in r.crops] == [np.asarray(c).tolist() for c in rendered.crops[i]]
    # Regions batched from two images give the same per-region answers as each image alone.
    other = prepare(photo.transpose(Image.FLIP_LEFT_RIGHT), boxes[:1], views, tiny_model.config.image_size)
    mixed = describe_views(tiny_model, torch.cat([rendered.pixel_values, other.pixel_values]),
                           torch.cat([rendered.boxes, other.boxes]), tag_threshold=0.3, controls=["red"], batch_size=2)
    alone = describe_views(tiny_model, other.pixel_values, other.boxes, tag_threshold=0.3, controls=["red"])
    assert mixed.captions[:2] == out.captions and mixed.captions[2] == alone.captions[0]
    assert torch.allclose(mixed.tag_probs[2], alone.tag_probs[0], atol=1e-5)


def test_describe_a_real_photo(tiny_model):
    boxes = [(120, 60, 400, 330), (0, 0, 512, 600), (200, 400, 330, 590)]
    results = tiny_model.describe(PHOTO, boxes, phrases=["a woman in uniform", "medals"], tag_threshold=0.0)
    assert len(results) == 3
    for r, box in zip(results, boxes):
        assert r.box == tuple(float(v) for v in box)
        assert [v.t for v in r.plan.views][0] == 0.0 and len(r.plan.views) == 3
        assert isinstance(r.caption, str) and 0 < r.caption_score <= 1
        scores = [s for _, s in r.tags]
        assert len(r.tags) == len(tiny_model.vocabulary.tags) and scores == sorted(scores, reverse=True)  # threshold 0
        assert [p for p, _ in r.similarity] == ["a woman in uniform", "medals"]
        assert all(0 <= s <= 1 for _, s in r.similarity)
        assert r.category in tiny_model.vocabulary.classes
        assert set(r.timings) == {"views", "vision", "heads", "caption", "total"}
        d = r.to_dict()
        json.dumps(d)
        assert {"box", "views", "caption", "caption_score", "tags", "similarity", "timings"} <= set(d)
        # The JSON lists every scored view (t = 0 and the ten candidates); exactly the n used are selected.
        assert [v["t"] for v in d["views"]][:2] == [0.0, 0.1] and len(d["views"]) == 11
        assert sorted(v["t"] for v in d["views"] if v["selected"]) == sorted(r.plan.selected_ts)
        assert all(len(v["hash_hex"]) == 16 for v in d["views"])
    # The full-image box: every view is the whole image.
    assert results[1].plan.views[0].crop_box == (0, 0, 512, 600)
    high = tiny_model.describe(PHOTO, boxes[:1], tag_threshold=1.0)
    assert high[0].tags == [] and high[0].control == "|"
    assert tiny_model.describe(PHOTO, []) == []
    with pytest.raises(ValueError, match="n_views=2"):
        tiny_model.describe(PHOTO, boxes[:1], views=ViewOptions(n_views=2))


def test_describe_is_deterministic_and_batch_independent(tiny_model):
    boxes = [(120, 60, 400, 330), (200, 400, 330, 590)]
    together = tiny_model.describe(PHOTO, boxes, phrases=["face"])
    alone = tiny_model.describe(PHOTO, boxes[1:], phrases=["face"], batch_size=1)
    assert together[1].caption == alone[0].caption
    assert together[1].similarity[0][1] == pytest.approx(alone[0].similarity[0][1], abs=1e-5)


def test_describe_views_without_captions_and_with_other_classes(tiny_model, photo):
    views = ViewOptions().resolve(tiny_model.config)
    rendered = prepare(photo, [(10, 20, 90, 120)], views, tiny_model.config.image_size)
    out = describe_views(tiny_model, rendered.pixel_values, rendered.boxes, captions=False, classes=["dog", "Cat"],
                         attributes=True)
    assert out.captions == [] and out.classes == ["dog", "Cat"] and out.class_scores.shape == (1, 2)
    z = tiny_model.encode_regions(rendered.pixel_values, rendered.boxes)
    expected = tiny_model.match_probabilities(z, tiny_model.text_encoder.encode(["the dog", "the cat"]))
    assert torch.allclose(out.class_scores, expected, atol=1e-5)
    assert out.attribute_scores.shape == (1, len(tiny_model.vocabulary.attributes))


def test_the_planner_names_the_bad_box(tiny_model, photo):
    boxes = [(10, 20, 90, 120), (50, 50, 50, 90), (0, 0, 10, 10)]
    with pytest.raises(BoxError) as err:
        plan_views_batch(photo, boxes, ViewOptions(n_views=3))
    assert err.value.index == 1 and str(err.value).startswith("box 1: ")
    with pytest.raises(BoxError, match="box 1: "):
        tiny_model.describe(photo, boxes)
    with pytest.raises(ValueError, match="n_views is not set"):
        plan_views_batch(photo, boxes, ViewOptions())
    with pytest.raises(ValueError, match="strategy='sideways'"):
        ViewOptions(strategy="sideways")
    with pytest.raises(ValueError, match="box_rounding='round'"):
        ViewOptions(box_rounding="round")


def test_box_rounding_follows_the_model_unless_overridden(tiny_model, photo):
    box = [(13, 17, 41, 60)]
    exact = tiny_model.describe(photo, box)[0]
    assert exact.box_rounding == "exact" and exact.to_dict()["box_rounding"] == "exact"
    reference = tiny_model.describe(photo, box, views=ViewOptions(box_rounding="reference"))[0]
    assert reference.box_rounding == "reference"
    plan = plan_views_batch(photo, box, ViewOptions(n_views=3))
    expected = render_views(photo, plan, tiny_model.config.image_size, box_rounding="reference").boxes
    rendered = prepare(photo, box, ViewOptions(n_views=3, box_rounding="reference"), tiny_model.config.image_size)
    assert torch.equal(rendered.boxes, expected)
    released = dataclasses.replace(tiny_model.config, box_rounding="reference")
    assert ViewOptions().resolve(released).box_rounding == "reference"
    assert ViewOptions(box_rounding="exact").resolve(released).box_rounding == "exact"


def test_evaluate_and_describe_agree_on_the_bundled_model(bundled_model, scenes):
    """One model-side step: evaluate's captions, tags and scores are describe's for the same regions (the first
    4 scenes of a seed the model was not trained on)."""
    ann = load_annotations(scenes)
    ann = dataclasses.replace(ann, regions=[r for r in ann.regions if r.image_id <= 4])
    res = evaluate_model(bundled_model, ann, caption_metrics=False, progress=False, batch_regions=5)
    by_id = {p["id"]: p for p in res.predictions}
    for image_id, regions in ann.by_image().items():
        results = bundled_model.describe(ann.images[image_id].path, [r.box for r in regions])
        for r, got in zip(regions, results):
            p = by_id[r.id]
            assert got.caption == p["caption"]
            assert got.caption_score == pytest.approx(p["caption_score"], abs=1e-4)
            assert [name for name, _ in got.tags] == p["tags"]
            assert got.category == p["predicted_category"]
            assert list(got.plan.selected_ts) == p["views"]
