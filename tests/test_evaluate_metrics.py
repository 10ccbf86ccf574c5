"""Metrics on hand-made inputs (caption metrics need Java for the tokenizer and METEOR)."""
import math
import shutil

import numpy as np
import pytest

from dynrefer_core import metrics

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
