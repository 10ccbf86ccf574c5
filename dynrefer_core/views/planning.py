"""Choose the n nested views of a region (spec §1.3 and §2): the base view t=0 plus n-1 candidates.

Strategies:
- ``"phash"`` (the method, "image prior"): score(t) = Hamming(h_0, h_t) / t**alpha over t = 0.1..1.0; the n-1
  best, ties to the smaller t, in descending score. alpha=1 is the official rule. Difference from the reference:
  when the remaining scores are all 0 (e.g. the region is the whole image) the reference picks t=0.1 again;
  we never pick a candidate twice and take the next smallest t instead.
- ``"random"`` (the training sampler): n-1 distinct candidates drawn with a seeded ``numpy.random.Generator``,
  kept in sampled order (the reference uses Python's ``random.sample``, so the draws themselves differ).
- ``"fixed"``: the given ``ts``, in the given order; any t in (0, 1] works, off-grid ones are computed like the
  candidates and appear in ``ViewPlan.views`` (and ``extra``), not in ``candidates``. t = 0 repeats the tight
  crop (a dual-view model's t = 0 point, or a task that is best without context).
- ``"task"`` ("task prior"): the ``ts`` the view study measured best for ``task`` on this model
  (``DynReferConfig.task_priors``, docs/view-study.md); ``ViewOptions.resolve`` turns it into "fixed", or into
  "phash" for a task where the study found no fixed view better than pHASH.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .geometry import BOX_ROUNDINGS, CANDIDATE_TS, NUM_CANDIDATES, crop_boxes, region_box, view_boxes
from .hashing import hash_hex, make_hasher
from .imageio import ImageSource, load_image

STRATEGIES = ("phash", "fixed", "random", "task")
TASKS = ("captioning", "dense", "attributes", "recognition")  # the paper's four tasks, for task priors


class BoxError(ValueError):
    """A box that cannot be planned: `index` is its position in the boxes given, `reason` what is wrong."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"box {index}: {reason}")
        self.index, self.reason = index, reason


@dataclass(frozen=True)
class ViewOptions:
    """How the n views of a region are chosen and rendered; one value travels through every path.

    n_views: t = 0 plus n-1 chosen views (None: the model's n). strategy: "phash" (image prior), "fixed"
    (the n-1 `ts`, in order), "random" (seeded by `seed`) or "task" (the model's task prior for `task`, one of
    `TASKS`, which `resolve` makes "fixed" with the model's ts). alpha: the t^alpha discount of the
    pHASH score. hash_name: the hash h_t (`HASH_NAMES`). box_rounding: how the region box is mapped into each
    view, "exact" or "reference" (the release's truncation); None: the model's `DynReferConfig.box_rounding`.
    Invalid combinations raise ValueError here, before any image is read.
    """

    n_views: int | None = None
    strategy: str = "phash"
    ts: tuple[float, ...] | None = None
    alpha: float = 1.0
    hash_name: str = "dct"
    seed: int | None = None
    box_rounding: str | None = None
    task: str | None = None  # with strategy "task"; kept after `resolve` to say where the views came from

    def __post_init__(self) -> None:
        if self.ts is not None:
            object.__setattr__(self, "ts", tuple(float(t) for t in self.ts))
        if self.box_rounding is not None and self.box_rounding not in BOX_ROUNDINGS:
            raise ValueError(f"box_rounding={self.box_rounding!r}: use one of {BOX_ROUNDINGS}")
        if self.strategy == "task":
            if self.task not in TASKS:
                raise ValueError(f"strategy='task' needs task= one of {TASKS}, got {self.task!r}")
            if self.ts is not None:
                raise ValueError("strategy='task' takes its ts from the model's task priors; give no ts")
        elif self.task is not None and self.strategy == "random":
            raise ValueError(f"task={self.task!r} is only used with strategy='task'")
        elif self.n_views is not None:
            _check_args(self.n_views, self.strategy, self.ts, self.alpha)
        elif self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not known: use one of {STRATEGIES}")

    def resolve(self, config) -> "ViewOptions":
        """These options with the model's n_views and box_rounding filled in where they are None, and a task
        prior replaced by what the model stores for it (`DynReferConfig.task_priors`): fixed ts, or pHASH
        where the view study found no fixed view better."""
        n_views = config.n_views if self.n_views is None else self.n_views
        out = dataclasses.replace(self, box_rounding=self.box_rounding or config.box_rounding)
        if self.strategy != "task":
            return dataclasses.replace(out, n_views=n_views)
        priors = getattr(config, "task_priors", None) or {}
        if self.task not in priors:
            raise ValueError(f"this model has no task prior for {self.task!r} (it has: {sorted(priors) or 'none'}); "
                             "measure them with `python -m dynrefer_core.evaluate --sweep-t ... --split val "
                             "--save-priors` (docs/view-study.md), or use strategy 'phash'")
        if priors[self.task] == "phash":
            return dataclasses.replace(out, n_views=n_views, strategy="phash")
        ts = tuple(priors[self.task])
        if n_views != len(ts) + 1:
            raise ValueError(f"the {self.task!r} prior has {len(ts) + 1} views (t = 0, {ts}), not n_views={n_views}")
        return dataclasses.replace(out, n_views=n_views, strategy="fixed", ts=ts)


@dataclass(eq=False)  # compared by identity: == on the hash_bits arrays would be ambiguous
class ViewCandidate:
    """One nested view: t, b_t (float32 math), its integer crop box, h_t and its score."""

    t: float
    box: tuple[float, float, float, float]
    crop_box: tuple[int, int, int, int]
    hash_bits: np.ndarray
    hash_hex: str
    hamming: int
    score: float
    selected: bool = False

    def to_dict(self) -> dict:
        return {"t": self.t, "box": list(self.box), "crop_box": list(self.crop_box), "hash_hex": self.hash_hex,
                "hamming": self.hamming, "score": self.score, "selected": self.selected}


@dataclass(eq=False)
class ViewPlan:
    """The views of one region: base (t=0), the ten candidates, and the chosen ts in model order."""

    box: tuple[float, float, float, float]
    image_size: tuple[int, int]
    n_views: int
    strategy: str
    hash_name: str
    alpha: float
    base: ViewCandidate
    candidates: list[ViewCandidate]
    selected_ts: list[float]
    extra: list[ViewCandidate] = field(default_factory=list)  # "fixed" ts that are not on the 0.1 grid

    @property
    def all_views(self) -> list[ViewCandidate]:
        """Every view that was hashed and scored: t = 0, the ten candidates, then off-grid fixed ts."""
        return [self.base, *self.candidates, *self.extra]

    @property
    def views(self) -> list[ViewCandidate]:
        """[base, chosen views...] in the order the model sees them (x_v index k); a fixed t = 0 is the base."""
        by_t = {0.0: self.base, **{c.t: c for c in [*self.candidates, *self.extra]}}
        return [self.base, *(by_t[t] for t in self.selected_ts[1:])]

    def to_dict(self) -> dict:
        return {"box": list(self.box), "image_size": list(self.image_size), "n_views": self.n_views,
                "strategy": self.strategy, "hash_name": self.hash_name, "alpha": self.alpha,
                "selected_ts": list(self.selected_ts), "base": self.base.to_dict(),
                "candidates": [c.to_dict() for c in self.candidates], "extra": [c.to_dict() for c in self.extra],
                "views": [v.to_dict() for v in self.views]}


def plan_views(image: ImageSource, box: Sequence[float], n_views: int = 3, strategy: str = "phash", *,
               ts: Sequence[float] | None = None, alpha: float = 1.0, hash_name: str = "dct",
               seed: int | None = None) -> ViewPlan:
    """Plan the n views of the region ``box`` = (x1, y1, x2, y2) in pixels of ``image``."""
    options = ViewOptions(n_views, strategy, ts, alpha, hash_name, seed)
    return plan_views_batch(image, [box], options)[0]


def plan_views_batch(image: ImageSource, boxes: Sequence[Sequence[float]], views: ViewOptions, *,
                     workers: int | None = None) -> list[ViewPlan]:
    """``plan_views`` for many regions of one image: the image is converted (and hashed per crop box) once.
    ``workers``: threads hashing the crops (default ``min(8, cpus)``; 1 hashes in this thread).

    With ``strategy="random"`` one Generator seeded with ``views.seed`` draws for all boxes in order. A box that
    cannot be planned raises `BoxError` (a ValueError) with its index in ``boxes``.
    """
    if views.n_views is None:
        raise ValueError("ViewOptions.n_views is not set: give it, or resolve the options for a model first")
    n_views, strategy, alpha, hash_name, seed = views.n_views, views.strategy, views.alpha, views.hash_name, views.seed
    fixed_ts = _check_args(n_views, strategy, views.ts, alpha)
    rgb = np.asarray(load_image(image))
    size = (rgb.shape[1], rgb.shape[0])
    regions = []
    for i, b in enumerate(boxes):
        try:
            regions.append(region_box(b, size))
        except ValueError as err:
            raise BoxError(i, str(err)) from err
    if not regions:
        return []
    hasher = make_hasher(rgb, hash_name)
    grid = np.array(CANDIDATE_TS, dtype=np.float64)
    all_ts = [0.0, *CANDIDATE_TS]
    # (N, 11, 4) float32 boxes b_t, their crop boxes and (N, 11, 64) hashes h_t.
    b_t = np.stack([view_boxes(b, size, all_ts) for b in regions])
    crops = np.stack([crop_boxes(b, size) for b in b_t])
    bits = hasher.many(crops, workers=workers).reshape(len(regions), len(all_ts), -1)
    hamming = (bits[:, :1] != bits[:, 1:]).sum(-1)
    scores = hamming / grid ** alpha
    rng = np.random.default_rng(seed) if strategy == "random" else None

    plans = []
    for i, region in enumerate(regions):
        def view(k: int, t: float) -> ViewCandidate:
            h = bits[i, k].reshape(8, 8)
            return ViewCandidate(t=t, box=tuple(float(v) for v in b_t[i, k]),
                                 crop_box=tuple(int(v) for v in crops[i, k]), hash_bits=h, hash_hex=hash_hex(h),
                                 hamming=int(hamming[i, k - 1]) if k else 0,
                                 score=float(scores[i, k - 1]) if k else 0.0)

        base = view(0, 0.0)
        base.selected = True  # view 0 (t = 0) is always one of the n views
        candidates = [view(k + 1, t) for k, t in enumerate(CANDIDATE_TS)]
        extra: list[ViewCandidate] = []
        if strategy == "phash":
            chosen = [CANDIDATE_TS[k] for k in rank_candidates(scores[i], n_views - 1)]
        elif strategy == "random":
            chosen = [CANDIDATE_TS[k] for k in rng.choice(NUM_CANDIDATES, size=n_views - 1, replace=False)]
        else:
            chosen = []
            for t in fixed_ts:  # already snapped to the grid where within 1e-9 of it
                if t and t not in CANDIDATE_TS:
                    extra.append(_off_grid_view(region, size, t, hasher, base.hash_bits, alpha))
                chosen.append(t)
        for c in [*candidates, *extra]:
            c.selected = c.t in chosen
        plans.append(ViewPlan(box=tuple(float(v) for v in region), image_size=size, n_views=n_views,
                              strategy=strategy, hash_name=hash_name, alpha=alpha, base=base,
                              candidates=candidates, selected_ts=[0.0, *chosen], extra=extra))
    return plans


def rank_candidates(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best candidate scores, best first, ties to the smaller index (smaller t), never twice.

    Equals the reference's greedy argmax-then-zero loop, except that once the remaining scores are all 0 the
    reference returns index 0 again while we return the smallest index not taken yet.
    """
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]]


def _off_grid_view(region, size, t, hasher, h0, alpha) -> ViewCandidate:
    # Crop it after the smaller grid ts so that it nests like them (see crop_boxes).
    b = view_boxes(region, size, [0.0, *(g for g in CANDIDATE_TS if g < t), t])
    c = crop_boxes(b, size)[-1]
    h = hasher(c).reshape(8, 8)
    ham = int((h != h0).sum())
    return ViewCandidate(t=t, box=tuple(float(v) for v in b[-1]), crop_box=tuple(int(v) for v in c), hash_bits=h,
                         hash_hex=hash_hex(h), hamming=ham, score=float(ham / t ** alpha))


def _check_args(n_views, strategy, ts, alpha) -> list[float]:
    if strategy == "task":
        raise ValueError("strategy='task' must be resolved for a model first (ViewOptions.resolve): its task "
                         "priors give the ts")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not known: use one of {STRATEGIES}")
    if not isinstance(n_views, (int, np.integer)) or n_views < 1:
        raise ValueError(f"n_views={n_views!r} must be an integer >= 1 (the base view t=0 is always included)")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} must be a finite number (alpha=1 is the method's 1/t discount)")
    if strategy != "fixed":
        if ts is not None:
            raise ValueError(f"ts={ts!r} is only used with strategy='fixed'")
        if n_views - 1 > NUM_CANDIDATES:
            raise ValueError(f"n_views={n_views} is too large: there are {NUM_CANDIDATES} candidates, so at most "
                             f"{NUM_CANDIDATES + 1} views")
        return []
    if ts is None:
        raise ValueError("strategy='fixed' needs ts, e.g. ts=(0.2, 0.6)")
    fixed = [float(t) for t in ts]
    if len(fixed) != n_views - 1:
        raise ValueError(f"ts={tuple(fixed)} has {len(fixed)} values but n_views={n_views} needs n_views-1 = "
                         f"{n_views - 1}")
    bad = [t for t in fixed if not (0.0 <= t <= 1.0)]
    if bad:
        raise ValueError(f"ts={tuple(fixed)}: every t must be in [0, 1] (0 repeats the tight crop), got {bad}")
    snapped = [next((g for g in (0.0, *CANDIDATE_TS) if abs(g - t) < 1e-9), t) for t in fixed]
    context = [t for t in snapped if t]
    if len(set(context)) != len(context):
        raise ValueError(f"ts={tuple(fixed)} repeats a context view: the views with t > 0 must be distinct")
    return snapped
