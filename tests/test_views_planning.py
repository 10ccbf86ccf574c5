"""View selection: the pHash rule against a literal computation, ties, all-zero scores, strategies, properties."""
import dataclasses

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynrefer_core.views import CANDIDATE_TS, ViewOptions, ViewPlan, plan_views, plan_views_batch
from dynrefer_core.views.planning import rank_candidates


def textured(w=120, h=90, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    img[h // 3: h // 2, w // 4: w // 2] = (250, 30, 30)
    return img


def literal_hash(gray, b):
    x1, y1, x2, y2 = np.clip(b, 0, [gray.shape[1], gray.shape[0]] * 2).astype(np.int64)
    c = cv2.dct(cv2.resize(gray[y1:y2, x1:x2], (224, 224)))[:8, :8]
    return (c > c.mean()).ravel()


def test_phash_rule_matches_a_literal_computation():
    img = textured()
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    for box in [(30, 30, 60, 45), (5, 5, 40, 80), (70.5, 10.25, 118.9, 33.3)]:
        b = np.array(box, np.float32)
        full = np.array([0, 0, 120, 90], np.float32)
        h0 = literal_hash(gray, b)
        scores = [int((h0 != literal_hash(gray, b + (full - b) * t)).sum()) / t for t in CANDIDATE_TS]
        plan = plan_views(img, box, n_views=4)
        assert [c.score for c in plan.candidates] == scores
        order = sorted(range(10), key=lambda k: (-scores[k], k))[:3]
        assert plan.selected_ts == [0.0] + [CANDIDATE_TS[k] for k in order]
        assert [c.selected for c in plan.candidates] == [k in order for k in range(10)]
        assert [v.t for v in plan.views] == plan.selected_ts


def test_rank_candidates_ties_go_to_smaller_t():
    assert rank_candidates(np.array([1.0, 5, 5, 3, 5, 0, 0, 0, 0, 0]), 3) == [1, 2, 4]
    assert rank_candidates(np.array([2.0, 0, 0, 2, 0, 0, 0, 0, 0, 9]), 2) == [9, 0]


def test_all_zero_scores_give_distinct_views():
    # The reference would pick t=0.1 twice here; we take t=0.1, t=0.2.
    assert rank_candidates(np.zeros(10), 2) == [0, 1]
    plan = plan_views(textured(), (0, 0, 120, 90), n_views=3)  # the whole image: every view is identical
    assert [c.hamming for c in plan.candidates] == [0] * 10
    assert plan.selected_ts == [0.0, 0.1, 0.2]
    assert len({v.crop_box for v in plan.views}) == 1 and len(plan.views) == 3


def test_alpha_changes_the_discount():
    img = textured()
    p1 = plan_views(img, (30, 30, 60, 45), alpha=1.0)
    p0 = plan_views(img, (30, 30, 60, 45), alpha=0.0)
    assert [c.score for c in p0.candidates] == [float(c.hamming) for c in p1.candidates]
    assert [c.score for c in p1.candidates] == [c.hamming / c.t for c in p1.candidates]


def test_n_views_one_is_the_base_view_only():
    plan = plan_views(textured(), (30, 30, 60, 45), n_views=1)
    assert plan.selected_ts == [0.0] and plan.views == [plan.base] and not any(c.selected for c in plan.candidates)


def test_random_strategy_is_seeded_distinct_and_unsorted():
    img = textured()
    plans = [plan_views(img, (30, 30, 60, 45), n_views=6, strategy="random", seed=s) for s in range(20)]
    again = plan_views(img, (30, 30, 60, 45), n_views=6, strategy="random", seed=3)
    assert again.selected_ts == plans[3].selected_ts
    for p in plans:
        assert len(set(p.selected_ts)) == 6 and set(p.selected_ts[1:]) <= set(CANDIDATE_TS)
    assert any(p.selected_ts[1:] != sorted(p.selected_ts[1:]) for p in plans)  # sampled order is kept


def test_fixed_strategy_on_and_off_grid():
    img = textured()
    plan = plan_views(img, (30, 30, 60, 45), strategy="fixed", ts=(0.6, 0.25))
    assert plan.selected_ts == [0.0, 0.6, 0.25]
    assert [v.t for v in plan.views] == [0.0, 0.6, 0.25]
    off = plan.views[2]
    assert off in plan.extra and off.selected and len(plan.candidates) == 10
    # b_0.25 = (30 - 7.5, 30 - 7.5, 60 + 15, 45 + 11.25)
    assert off.box == (22.5, 22.5, 75.0, 56.25) and off.crop_box == (22, 22, 75, 56)
    assert off.hamming == int((off.hash_bits != plan.base.hash_bits).sum())
    assert [c.t for c in plan.candidates if c.selected] == [0.6]


@pytest.mark.parametrize("kwargs, words", [
    (dict(strategy="fixed"), "needs ts"),
    (dict(strategy="fixed", ts=(0.2,)), "n_views-1"),
    (dict(strategy="fixed", ts=(0.2, 0.2)), "repeats"),
    (dict(strategy="fixed", ts=(-0.1, 0.5)), "[0, 1]"),
    (dict(strategy="fixed", ts=(0.5, 1.5)), "[0, 1]"),
    (dict(strategy="task"), "task= one of"),
    (dict(strategy="best"), "strategy='best'"),
    (dict(n_views=0), "n_views=0"),
    (dict(n_views=12), "at most 11"),
    (dict(ts=(0.2, 0.3)), "only used with strategy='fixed'"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as err:
        plan_views(textured(), (30, 30, 60, 45), **kwargs)
    assert words in str(err.value)


def test_task_prior_resolves_to_the_models_fixed_ts():
    from dynrefer_core.config import DynReferConfig

    task = ViewOptions(strategy="task", task="attributes")
    with pytest.raises(ValueError, match="only used with strategy='task'"):
        ViewOptions(strategy="random", task="attributes")
    with pytest.raises(ValueError, match="resolved for a model"):
        plan_views_batch(textured(), [(30, 30, 60, 45)], dataclasses.replace(task, n_views=2))
    with pytest.raises(ValueError, match="no task prior for 'attributes'.*--save-priors"):
        task.resolve(DynReferConfig.tiny())
    config = DynReferConfig.tiny()
    config.n_views = 2
    config.task_priors = {"attributes": [0.0], "captioning": [0.4], "dense": "phash"}
    config.validate()
    resolved = task.resolve(config)
    assert (resolved.strategy, resolved.ts, resolved.task, resolved.n_views) == ("fixed", (0.0,), "attributes", 2)
    # t = 0 repeats the tight crop: both views are the base view, as when a dual-view model gets no context
    plan = plan_views_batch(textured(), [(30, 30, 60, 45)], resolved)[0]
    assert plan.selected_ts == [0.0, 0.0] and plan.views == [plan.base, plan.base] and not plan.extra
    caption = ViewOptions(strategy="task", task="captioning").resolve(config)
    assert plan_views_batch(textured(), [(30, 30, 60, 45)], caption)[0].selected_ts == [0.0, 0.4]
    dense = ViewOptions(strategy="task", task="dense").resolve(config)  # the study found nothing better than pHASH
    assert (dense.strategy, dense.ts, dense.task) == ("phash", None, "dense")
    with pytest.raises(ValueError, match="n_views-1 = 1"):
        DynReferConfig.from_dict({**config.to_dict(), "task_priors": {"dense": [0.2, 0.3]}})
    with pytest.raises(ValueError, match="unknown task 'tags'"):
        DynReferConfig.from_dict({**config.to_dict(), "task_priors": {"tags": [0.2]}})


def test_batch_equals_single_and_to_dict_is_json():
    import json

    img = textured()
    boxes = [(30, 30, 60, 45), (0, 0, 120, 90), (10.5, 60, 11.9, 61.5), (-10, 80, 50, 200)]
    batch = plan_views_batch(img, boxes, ViewOptions(n_views=3))
    for box, p in zip(boxes, batch):
        single = plan_views(img, box, n_views=3)
        assert p.to_dict() == single.to_dict()
        np.testing.assert_array_equal(np.stack([c.hash_bits for c in p.candidates]),
                                      np.stack([c.hash_bits for c in single.candidates]))
    d = json.loads(json.dumps(batch[0].to_dict()))
    assert d["selected_ts"][0] == 0.0 and len(d["candidates"]) == 10 and len(d["views"]) == 3
    assert plan_views_batch(img, [], ViewOptions(n_views=3)) == []


def test_degenerate_boxes_give_three_distinct_views_or_value_error():
    img = textured()
    for box in [(10.2, 20.2, 11.7, 21.7), (119.5, 89.5, 121, 95), (-50, -50, 10, 10)]:
        plan = plan_views(img, box)
        assert len(set(plan.selected_ts)) == 3
    for box in [(10, 10, 10, 50), (30, 10, 20, 50), (200, 10, 300, 50)]:
        with pytest.raises(ValueError, match="120x90"):
            plan_views(img, box)


IMG = textured(64, 48, seed=3)
coord = st.floats(-20, 90, allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x1=coord, y1=coord, w=st.floats(0.05, 100), h=st.floats(0.05, 100), n=st.integers(1, 11),
       strategy=st.sampled_from(["phash", "random"]))
def test_properties(x1, y1, w, h, n, strategy):
    box = (x1, y1, x1 + w, y1 + h)
    inside = min(x1 + w, 64) > max(x1, 0) and min(y1 + h, 48) > max(y1, 0)
    if not inside:
        with pytest.raises(ValueError):
            plan_views(IMG, box, n_views=n, strategy=strategy, seed=0)
        return
    plan: ViewPlan = plan_views(IMG, box, n_views=n, strategy=strategy, seed=0)
    crops = [plan.base.crop_box] + [c.crop_box for c in plan.candidates]
    for small, big in zip(crops, crops[1:]):  # nested
        assert big[0] <= small[0] and big[1] <= small[1] and big[2] >= small[2] and big[3] >= small[3]
    for u1, v1, u2, v2 in crops:  # inside the image, never empty
        assert 0 <= u1 < u2 <= 64 and 0 <= v1 < v2 <= 48
    assert crops[-1] == (0, 0, 64, 48)
    assert len(plan.selected_ts) == n and plan.selected_ts[0] == 0.0 and len(set(plan.selected_ts)) == n
    assert sum(c.selected for c in plan.candidates) == n - 1
    if strategy == "phash":
        chosen = [c.score for t in plan.selected_ts[1:] for c in plan.candidates if c.t == t]
        assert chosen == sorted(chosen, reverse=True)
