"""Metrics and evaluate's scoring on hand-made inputs (caption metrics need Java for the tokenizer and METEOR)."""
import math
import shutil

import numpy as np
import pytest

from dynrefer_core import evaluate, metrics
from dynrefer_core.data.annotations import load_annotations

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java (default-jre-headless)")


def test_tag_prf_is_micro_averaged():
    pred = [{"red", "star", "left of"}, {"blue"}, set()]
    true = [{"red", "star", "tiny"}, {"blue", "ring"}, {"cross"}]
    s = metrics.tag_prf(pred, true, 0.7)
    # TP = 2 + 1 + 0 = 3, predicted = 4, true = 6
    assert s.precision == pytest.approx(3 / 4)
    assert s.recall == pytest.approx(3 / 6)
    assert s.f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert s.to_dict()["threshold"] == 0.7
    assert metrics.tag_prf([set()], [set()]).f1 == 0.0
    with pytest.raises(ValueError, match="2 predicted tag sets but 1"):
        metrics.tag_prf([set(), set()], [set()])


def test_top1_and_relation_accuracy():
    assert metrics.top1_accuracy(["star", "ring", "heart", "star"], ["star", "ring", "star", "cross"]) == 0.5
    assert metrics.relation_of("a tiny red star left of a ring") == "left of"
    assert metrics.relation_of("a star above a ring right of x") == "above"  # the first one
    assert metrics.relation_of("a leftover star") is None
    caps = ["a star left of a ring", "a star above a ring", "a star"]
    assert metrics.relation_accuracy(caps, ["left of", "below", "above"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        metrics.top1_accuracy([], [])


def test_attribute_map_ignores_unlabeled_and_attributes_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.5], [0.1, 0.2, 0.5], [0.3, 0.9, 0.5]])
    labels = np.array([[1, 0, 0], [0, -1, 0], [0, 1, 0], [1, 0, 0]])
    m, aps = metrics.attribute_map(scores, labels)
    # attr 0: ranking 0.9(+), 0.8(-), 0.3(+), 0.1(-) -> AP = (1/1 + 2/3) / 2
    assert aps[0] == pytest.approx((1 + 2 / 3) / 2)
    # attr 1: region 1 unlabeled; 0.9(-), 0.2(+), 0.1(-) -> AP = 1/2
    assert aps[1] == pytest.approx(0.5)
    assert math.isnan(aps[2])  # no positive
    assert m == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


@pytest.mark.slow
@needs_java
def test_caption_metrics_perfect_partial_and_newlines():
    refs = {1: ["a tiny red striped star left of a green ring"],
            2: ["a large blue dotted circle below a pink heart"],
            3: ["a small cyan solid cross right of a red star"],
            4: ["a large yellow checked square above an orange arrow"]}
    perfect = metrics.caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["CIDEr"] == pytest.approx(10.0, rel=1e-3)  # CIDEr-D of identical captions: 10 x cosine 1
    preds = {k: v[0] for k, v in refs.items()}
    preds[2] = "a large blue dotted\ncircle\r\nabove a pink heart"  # newline must not hang METEOR
    preds[3] = ""  # empty hypothesis is scored, not crashed on
    partial = metrics.caption_metrics(preds, refs)
    for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 < partial[k] < perfect[k]
    with pytest.raises(ValueError, match="same region ids"):
        metrics.caption_metrics({1: "x"}, {2: ["x"]})


@pytest.mark.slow
@needs_java
def test_meteor_process_is_closed():
    with metrics.MeteorScorer(timeout_s=60) as m:
        proc = m._meteor.meteor_p
        score, per = m.compute_score({1: ["a red star"], 2: ["a blue ring"]}, {1: ["a red star"], 2: ["a ring"]})
        assert per[0] == pytest.approx(1.0, abs=1e-3) and 0 < per[1] < 1
    assert proc.poll() is not None  # the Java process has exited


def prediction(id, caption, reference, tags, gt_tags, category, predicted, relation):
    return {"id": id, "image_id": 1, "box": [0, 0, 1, 1], "views": [0.0], "caption": caption, "caption_score": 0.5,
            "reference": reference, "tags": tags, "gt_tags": gt_tags, "category": category,
            "predicted_category": predicted, "relation": relation}


HAND_MADE = [
    prediction(1, "a tiny red striped star left of a green ring", "a tiny red striped star left of a green ring",
               ["red", "star", "left of"], ["red", "star", "tiny"], "star", "star", "left of"),
    prediction(2, "a large blue dotted circle above a pink ring", "a large blue dotted circle below a pink heart",
               ["blue"], ["blue", "ring"], "circle", "ring", "below"),
    prediction(3, "a tiny cyan solid square right of a red star", "a tiny cyan solid cross right of a red star",
               [], ["cross", "not-a-tag"], "cross", "star", "right of"),
    prediction(4, "a small green checked heart", "a small green checked heart", ["heart"], [], None, "heart", None),
]
TAG_NAMES = ["red", "star", "left of", "tiny", "blue", "ring", "cross", "heart"]


def test_score_predictions_on_hand_made_predictions():
    res = evaluate.score_predictions(HAND_MADE, TAG_NAMES, 0.7, caption_metrics=False)
    assert res.num_regions == 4 and res.tag_threshold == 0.7 and res.captions == {}
    # Regions 1-3 have a category (4 has none): star = star, ring != circle, star != cross.
    assert res.recognition_top1 == pytest.approx(1 / 3)
    # Regions with ground-truth tags (1-3), tags outside the vocabulary dropped: TP 2 + 1 + 0 of 4 predicted and
    # 3 + 2 + 1 true.
    assert (res.tag_precision, res.tag_recall) == (pytest.approx(3 / 4), pytest.approx(3 / 6))
    assert res.tag_f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    # Regions with a relation (1-3): the caption says left of / above / right of for left of / below / right of.
    assert res.relation_accuracy == pytest.approx(2 / 3)
    assert res.subject_accuracy == pytest.approx(2 / 3)  # region 3 names a square, not a cross
    assert res.neighbour_accuracy == pytest.approx(2 / 3)  # region 2 names a ring, not a heart
    assert res.tiny_subject_accuracy == pytest.approx(1 / 2)  # regions 1 and 3 are tiny
    assert res.word_accuracy["category"] == pytest.approx(2 / 3) and res.word_accuracy["colour"] == 1.0
    assert res.word_accuracy["relation"] == pytest.approx(2 / 3)
    assert res.word_accuracy["neighbour category"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no regions"):
        evaluate.score_predictions([], TAG_NAMES, 0.7, caption_metrics=False)


@needs_java
def test_score_predictions_scores_each_caption_against_its_own_reference():
    same = evaluate.score_predictions(HAND_MADE, TAG_NAMES, 0.7, meteor=False).captions
    disjoint = [dict(p, caption=f"zebra {w} quartz") for p, w in zip(HAND_MADE, ["xylophone", "kiwi", "jolt", "fjord"])]
    apart = evaluate.score_predictions(disjoint, TAG_NAMES, 0.7, meteor=False).captions
    identical = [dict(p, caption=p["reference"]) for p in HAND_MADE]
    perfect = evaluate.score_predictions(identical, TAG_NAMES, 0.7, meteor=False).captions
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["CIDEr"] == pytest.approx(10.0, rel=1e-3)  # CIDEr-D of identical captions: 10 x cosine 1
    assert apart["BLEU-4"] < 1e-6 and apart["ROUGE-L"] == 0.0 and apart["CIDEr"] == 0.0
    for key in ("BLEU-4", "ROUGE-L", "CIDEr"):  # two of four captions differ from their references
        assert apart[key] < same[key] < perfect[key], key


def test_evaluate_model_predictions_carry_the_references(tiny_model, scenes):
    """Each prediction holds the annotation's caption, tags, category and relation beside what the model said;
    the metrics compare the two."""
    ann = load_annotations(scenes)
    res = evaluate.evaluate_model(tiny_model, ann, caption_metrics=False, progress=False, max_regions=12)
    regions = {r.id: r for r in ann.regions[:12]}
    assert [p["id"] for p in res.predictions] == list(regions)
    for p in res.predictions:
        r = regions[p["id"]]
        assert (p["reference"], p["gt_tags"], p["category"], p["relation"]) == (r.caption, r.tags, r.category,
                                                                                r.relation)
        assert (p["image_id"], p["box"]) == (r.image_id, list(r.box))
        assert p["predicted_category"] in ann.categories and isinstance(p["caption"], str)
        assert p["caption"] != r.caption  # a random model
    hits = [p["predicted_category"] == regions[p["id"]].category for p in res.predictions]
    assert res.recognition_top1 == pytest.approx(sum(hits) / len(hits)) and res.recognition_top1 < 1
    related = [p for p in res.predictions if regions[p["id"]].relation]
    assert related and res.relation_accuracy == pytest.approx(
        sum(metrics.relation_of(p["caption"]) == regions[p["id"]].relation for p in related) / len(related))
