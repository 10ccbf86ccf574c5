"""DenseCap mAP (§8.1) on hand-made images; METEOR is the real Java jar, one process for the module.

Boxes are x1, y1, x2, y2. Expected APs are computed by hand in the comments: with npos GT boxes and a
ranked list of TP/FP, AP = mean over t = 0, 0.01, ..., 0.99 of the best precision at recall >= t.
"""
import shutil

import numpy as np
import pytest

from dynrefer_core import metrics
from dynrefer_core.metrics import Detection as D
from dynrefer_core.metrics import GTRegion as G

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java (default-jre-headless)")


class CountingScorer:
    """The real METEOR scorer, recording how many pairs each call scores."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def compute_score(self, gts, res):
        self.calls.append(len(gts))
        return self.inner.compute_score(gts, res)


@pytest.fixture(scope="module")
def meteor():
    with metrics.MeteorScorer(timeout_s=120) as m:
        yield m


def assert_all_ap(result, det_ap, ap_rows):
    assert result.det_ap == pytest.approx(det_ap)
    assert np.asarray(result.ap) == pytest.approx(np.asarray(ap_rows))
    assert result.det_map == pytest.approx(np.mean(det_ap))
    assert result.map == pytest.approx(np.mean(ap_rows))


# --- pure logic -------------------------------------------------------------------------------------------

def test_average_precision_on_a_hand_computed_ranking():
    # TP FP TP FP FP TP, npos 4: recall .25 .25 .5 .5 .5 .75, precision 1 .5 .67 .5 .4 .5
    # t 0..0.25 (26 levels): 1; t 0.26..0.50 (25): 2/3; t 0.51..0.75 (25): 1/2; t 0.76..0.99 (24): 0
    assert metrics.average_precision([1, 0, 1, 0, 0, 1], 4) == pytest.approx((26 + 25 * 2 / 3 + 25 * 0.5) / 100)
    # a recall exactly on a level reaches it: 7/20 reaches 0.35 (36 levels), though 35 * 0.01 > 0.35 in
    # float64; 9/20 reaches 0.45 (46 levels), though the Python port's float32 levels miss it (0.45 there)
    assert metrics.average_precision([1] * 7, 20) == pytest.approx(0.36)
    assert metrics.average_precision([1] * 9, 20) == pytest.approx(0.46)
    assert metrics.average_precision([1], 1) == 1.0
    assert metrics.average_precision([0, 0], 3) == 0.0
    assert metrics.average_precision([], 3) == 0.0


def test_merge_takes_the_box_with_most_overlaps_first():
    a, b, c = [0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 14.5]
    iou = metrics.box_iou([a, b, a], [b, c, c])[[0, 1, 2], [0, 1, 2]]
    assert iou[0] >= 0.7 and iou[1] >= 0.7 and iou[2] < 0.7  # a~b, b~c, but not a~c
    far = [50, 50, 60, 60]
    # b (index 2) overlaps all three, so one group; taking a (the first) first would give {a, b}, {c}
    assert metrics.merge_boxes([a, c, b, far]) == [[0, 1, 2], [3]]
    assert metrics.merge_boxes([a, [0, 0, 10, 14.6]]) == [[0], [1]]  # IoU 0.685 < 0.7
    assert metrics.merge_boxes([a, [5, 5, 5, 9]]) == [[0]]  # zero area: dropped, as in the original
    assert metrics.merge_boxes(np.zeros((0, 4))) == []


def test_merged_box_is_the_group_mean_with_all_captions():
    regions = [G((0, 0, 10, 10), "small wooden crate"), G((0, 0, 10, 14.5), "red square sign"),
               G((0, 0, 10, 12), "cardboard box"), G((50, 50, 60, 60), "a blue ball")]
    boxes, refs = metrics.merge_ground_truth(regions)
    assert boxes == pytest.approx(np.array([[0, 0, 10, (10 + 14.5 + 12) / 3], [50, 50, 60, 60]]))
    assert refs == [["small wooden crate", "red square sign", "cardboard box"], ["a blue ball"]]
    boxes, refs = metrics.merge_ground_truth([])
    assert boxes.shape == (0, 4) and refs == []


def test_match_has_no_fall_back_to_the_second_best_box():
    gt = [[0, 0, 10, 10], [3, 0, 13, 10]]  # IoU 70/130 = 0.54: two boxes
    dets = [[0, 0, 10, 10], [1, 0, 11, 10]]  # the second: IoU 90/110 with box 0 (taken), 80/120 with box 1
    m = metrics.match_detections(dets, gt)
    assert m[0] == (0, 1.0, True)
    assert m[1].gt == 0 and m[1].iou == pytest.approx(9 / 11) and not m[1].ok
    assert metrics.match_detections([[20, 20, 30, 30]], gt) == [(-1, 0.0, False)]  # overlaps nothing
    assert metrics.match_detections(dets, np.zeros((0, 4))) == [(-1, 0.0, False)] * 2
    assert metrics.match_detections([], gt) == []


# --- the whole evaluator, real METEOR ---------------------------------------------------------------------

@needs_java
def test_perfect_predictions_score_one(meteor):
    gt = {1: [G((0, 0, 50, 50), "a red car"), G((60, 0, 120, 40), "a black dog on the grass")],
          2: [G((10, 10, 90, 70), "white clouds in a blue sky")]}
    pred = {k: [D(g.box, g.caption, 0.5 + i / 10) for i, g in enumerate(v)] for k, v in gt.items()}
    counting = CountingScorer(meteor)
    r = metrics.densecap_map(pred, gt, meteor=counting)
    assert r.map == pytest.approx(1.0) and r.det_map == pytest.approx(1.0)
    assert_all_ap(r, [1] * 5, np.ones((5, 6)))
    assert (r.n_images, r.n_detections, r.n_gt_regions, r.n_gt_boxes) == (2, 3, 3, 3)
    assert counting.calls == [3]  # all pairs in one batch
    assert r.to_dict()["map"] == r.map


@needs_java
@pytest.mark.parametrize("first", ["close", "far"])
def test_iou_between_thresholds(meteor, first):
    gt = {0: [G((0, 0, 100, 100), "a red car"), G((200, 0, 300, 100), "a black dog")]}
    close = D((10, 0, 110, 100), "a red car", 0.9)  # IoU 90/110 = 0.82: TP at every IoU threshold
    far = D((240, 0, 340, 100), "a black dog", 0.9)  # IoU 60/140 = 0.43: TP at 0.3 and 0.4 only
    if first == "close":
        pred = {0: [close, far._replace(score=0.8)]}
        low = 0.51  # TP FP, npos 2: precision 1 up to recall .5 -> levels 0..0.50
    else:
        pred = {0: [far, close._replace(score=0.8)]}
        low = 0.255  # FP TP: precision .5 at recall .5 -> 51 levels x 0.5
    det_ap = [1, 1, low, low, low]
    r = metrics.densecap_map(pred, gt, meteor=meteor)
    assert_all_ap(r, det_ap, [[a] * 6 for a in det_ap])


@needs_java
def test_wrong_captions_fail_meteor_thresholds_but_count_for_detection(meteor):
    tree = "a tall green tree next to a red brick building"
    _, per = meteor.compute_score({0: ["a red car"], 1: [tree]}, {0: ["two dogs sleeping"], 1: ["green tree"]})
    assert per[0] == 0.0 and 0.1 < per[1] < 0.15  # the premise: METEOR 0 and METEOR 0.13
    gt = {0: [G((0, 0, 50, 50), "a red car"), G((100, 0, 200, 80), tree)]}
    pred = {0: [D((0, 0, 50, 50), "two dogs sleeping", 0.9), D((100, 0, 200, 80), "green tree", 0.8)]}
    r = metrics.densecap_map(pred, gt, meteor=meteor)
    # METEOR > 0, 0.05, 0.1: FP TP -> 0.255 (0 is not > 0); > 0.15, 0.2, 0.25: FP FP -> 0
    row = [0.255, 0.255, 0.255, 0, 0, 0]
    assert_all_ap(r, [1] * 5, [row] * 5)


@needs_java
def test_duplicate_detections_are_false_positives(meteor):
    gt = {0: [G((0, 0, 50, 50), "a red car"), G((100, 100, 150, 150), "a black dog")]}
    pred = {0: [D((0, 0, 50, 50), "a red car", 0.9), D((0, 0, 50, 50), "a red car", 0.8),
                D((100, 100, 150, 150), "a black dog", 0.7)]}
    r = metrics.densecap_map(pred, gt, meteor=meteor)
    # TP FP TP, npos 2: recall .5 .5 1, precision 1 .5 .67 -> t <= .5 (51 levels): 1, t > .5 (49): 2/3
    ap = (51 + 49 * 2 / 3) / 100
    assert_all_ap(r, [ap] * 5, np.full((5, 6), ap))


@needs_java
def test_overlapping_gt_boxes_merge_into_one_with_all_references(meteor):
    gt = {0: [G((0, 0, 10, 10), "small wooden crate"), G((0, 0, 10, 14.5), "red square sign"),
              G((0, 0, 10, 12), "cardboard box"), G((50, 50, 60, 60), "a blue ball")]}
    mean_box = (0, 0, 10, (10 + 14.5 + 12) / 3)
    # the caption of the group's second box: METEOR 1 only if all of the group's captions are references
    pred = {0: [D(mean_box, "red square sign", 0.9), D((50, 50, 60, 60), "a blue ball", 0.8)]}
    r = metrics.densecap_map(pred, gt, meteor=meteor)
    assert (r.n_gt_regions, r.n_gt_boxes) == (4, 2)
    assert r.map == pytest.approx(1.0) and r.det_map == pytest.approx(1.0)


@needs_java
def test_detection_whose_best_box_is_taken_is_a_miss(meteor):
    gt = {0: [G((0, 0, 10, 10), "a red car"), G((3, 0, 13, 10), "a black dog")]}
    # the second detection describes box 1 (IoU 0.67) but its best box is box 0 (IoU 0.82), already taken
    pred = {0: [D((0, 0, 10, 10), "a red car", 0.9), D((1, 0, 11, 10), "a black dog", 0.8)]}
    r = metrics.densecap_map(pred, gt, meteor=meteor)
    assert_all_ap(r, [0.51] * 5, np.full((5, 6), 0.51))  # TP FP, npos 2


@needs_java
def test_images_without_gt_or_without_predictions(meteor):
    gt = {"a": [G((0, 0, 10, 10), "a red car")], "b": [G((0, 0, 20, 20), "a tall tree")], "d": []}
    pred = {"a": [D((0, 0, 10, 10), "a red car", 0.5)], "b": [], "c": [D((0, 0, 10, 10), "a cat", 0.9)]}
    r = metrics.densecap_map(pred, gt, meteor=meteor)
    # "c" (no GT) ranks first: FP TP with npos 2 (b's box is never found) -> 51 levels x 0.5
    assert_all_ap(r, [0.255] * 5, np.full((5, 6), 0.255))
    assert (r.n_images, r.n_detections, r.n_gt_regions, r.n_gt_boxes) == (4, 2, 2, 2)

    counting = CountingScorer(meteor)
    for pred, gt in [({}, {"b": gt["b"]}), ({"c": pred["c"]}, {}), ({}, {})]:
        r = metrics.densecap_map(pred, gt, meteor=counting)
        assert (r.map, r.det_map) == (0.0, 0.0)
    assert counting.calls == []  # nothing to score: METEOR is not asked


@needs_java
@pytest.mark.slow  # starts a second Java METEOR
def test_own_meteor_process_is_stopped(monkeypatch):
    started = []

    class Recording(metrics.MeteorScorer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self._meteor.meteor_p)

    monkeypatch.setattr(metrics, "MeteorScorer", Recording)
    gt = {0: [G((0, 0, 50, 50), "a red car\nparked")]}  # a newline must not hang the jar
    pred = {0: [((0, 0, 50, 50), "a red\ncar parked", 0.9)]}  # plain tuples work too
    r = metrics.densecap_map(pred, gt)
    assert r.map == pytest.approx(1.0)
    assert len(started) == 1 and started[0].poll() is not None
