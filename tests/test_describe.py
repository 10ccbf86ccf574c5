"""The predictor: prepare (CPU side) + describe_views (model side), and describe() that chains them."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynrefer_core.config import DynReferConfig
from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.data.generate import generate
from dynrefer_core.describe import describe_views, threshold_tags
from dynrefer_core.evaluate import evaluate_model
from dynrefer_core.modeling.dynrefer import DynRefer
from dynrefer_core.views import BoxError, ViewOptions, plan_views_batch, prepare, render_views

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DynRefer(DynReferConfig.tiny()).eval()


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (200, 260, 3), dtype=np.uint8))


def test_threshold_tags_keeps_scores_above_the_threshold_best_first():
    probs = torch.tensor([[0.2, 0.9, 0.75, 0.7], [0.1, 0.1, 0.1, 0.1]])
    assert threshold_tags(probs, ["a", "b", "c", "d"], 0.7) == [[("b", pytest.approx(0.9)), ("c", pytest.approx(0.75))],
                                                                []]


def test_describe_is_prepare_then_describe_views(model, photo):
    boxes = [(10, 20, 90, 120), (100, 40, 250, 190)]
    views = ViewOptions().resolve(model.config)
    rendered = prepare(photo, boxes, views, model.config.image_size)
    out = describe_views(model, rendered.pixel_values, rendered.boxes, phrases=["a cat", "sky"], tag_threshold=0.3,
                         controls=["red"])
    results = model.describe(photo, boxes, phrases=["a cat", "sky"], tag_threshold=0.3, controls=["red"])
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
    other = prepare(photo.transpose(Image.FLIP_LEFT_RIGHT), boxes[:1], views, model.config.image_size)
    mixed = describe_views(model, torch.cat([rendered.pixel_values, other.pixel_values]),
                           torch.cat([rendered.boxes, other.boxes]), tag_threshold=0.3, controls=["red"], batch_size=2)
    alone = describe_views(model, other.pixel_values, other.boxes, tag_threshold=0.3, controls=["red"])
    assert mixed.captions[:2] == out.captions and mixed.captions[2] == alone.captions[0]
    assert torch.allclose(mixed.tag_probs[2], alone.tag_probs[0], atol=1e-5)


def test_describe_views_without_captions_and_with_other_classes(model, photo):
    rendered = prepare(photo, [(10, 20, 90, 120)], ViewOptions().resolve(model.config), model.config.image_size)
    out = describe_views(model, rendered.pixel_values, rendered.boxes, captions=False, classes=["dog", "Cat"],
                         attributes=True)
    assert out.captions == [] and out.classes == ["dog", "Cat"] and out.class_scores.shape == (1, 2)
    z = model.encode_regions(rendered.pixel_values, rendered.boxes)
    expected = model.match_probabilities(z, model.text_encoder.encode(["the dog", "the cat"]))
    assert torch.allclose(out.class_scores, expected, atol=1e-5)
    assert out.attribute_scores.shape == (1, len(model.vocabulary.attributes))


def test_the_planner_names_the_bad_box(model, photo):
    boxes = [(10, 20, 90, 120), (50, 50, 50, 90), (0, 0, 10, 10)]
    with pytest.raises(BoxError) as err:
        plan_views_batch(photo, boxes, ViewOptions(n_views=3))
    assert err.value.index == 1 and str(err.value).startswith("box 1: ")
    with pytest.raises(BoxError, match="box 1: "):
        model.describe(photo, boxes)
    with pytest.raises(ValueError, match="n_views is not set"):
        plan_views_batch(photo, boxes, ViewOptions())
    with pytest.raises(ValueError, match="strategy='sideways'"):
        ViewOptions(strategy="sideways")
    with pytest.raises(ValueError, match="box_rounding='round'"):
        ViewOptions(box_rounding="round")


def test_box_rounding_follows_the_model_unless_overridden(model, photo):
    box = [(13, 17, 41, 60)]
    exact = model.describe(photo, box)[0]
    assert exact.box_rounding == "exact" and exact.to_dict()["box_rounding"] == "exact"
    reference = model.describe(photo, box, views=ViewOptions(box_rounding="reference"))[0]
    assert reference.box_rounding == "reference"
    plan = plan_views_batch(photo, box, ViewOptions(n_views=3))
    expected = render_views(photo, plan, model.config.image_size, box_rounding="reference").boxes
    rendered = prepare(photo, box, ViewOptions(n_views=3, box_rounding="reference"), model.config.image_size)
    assert torch.equal(rendered.boxes, expected)
    released = dataclasses.replace(model.config, box_rounding="reference")
    assert ViewOptions().resolve(released).box_rounding == "reference"
    assert ViewOptions(box_rounding="exact").resolve(released).box_rounding == "exact"


@pytest.fixture(scope="module")
def bundled():
    return DynRefer.from_pretrained(ROOT / "checkpoints" / "mini", device="cpu")


@pytest.fixture(scope="module")
def unseen_scenes(tmp_path_factory):
    return generate(seed=5150, num_images=4, out=tmp_path_factory.mktemp("unseen"))


def test_evaluate_and_describe_agree_on_the_bundled_model(bundled, unseen_scenes):
    """One model-side step: evaluate's captions, tags and scores are describe's for the same regions."""
    ann = load_annotations(unseen_scenes)
    res = evaluate_model(bundled, ann, caption_metrics=False, progress=False, batch_regions=5)
    by_id = {p["id"]: p for p in res.predictions}
    for image_id, regions in ann.by_image().items():
        results = bundled.describe(ann.images[image_id].path, [r.box for r in regions])
        for r, got in zip(regions, results):
            p = by_id[r.id]
            assert got.caption == p["caption"]
            assert got.caption_score == pytest.approx(p["caption_score"], abs=1e-4)
            assert [name for name, _ in got.tags] == p["tags"]
            assert got.category == p["predicted_category"]
            assert list(got.plan.selected_ts) == p["views"]
