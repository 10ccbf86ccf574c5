"""Region metrics: captions (pycocoevalcap, per region id), tags, recognition, attributes, relations,
and the DenseCap mAP (§8.1) of boxes with captions.

Caption metrics follow §8.2 but key the references by **region id**, not image id, so images with many
regions are scored correctly. METEOR runs the Java jar bundled with pycocoevalcap: captions are stripped
of newlines (a newline desynchronises the jar and the Python side then blocks forever), the call runs
under a timeout, and the Java process is always stopped.
"""
from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import numpy as np

RELATION_WORDS: tuple[str, ...] = ("left of", "right of", "above", "below")


def _clean(text: str) -> str:
    text = " ".join(str(text).replace("|||", " ").split())  # newlines, tabs and the jar's separator
    return text or "empty"  # an empty hypothesis breaks the tokenizer's line alignment


class MeteorScorer:
    """One Java METEOR process for a whole run; use as a context manager so the process is stopped."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self.timeout_s = timeout_s
        self._meteor = Meteor()

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, list[float]]:
        out: dict = {}

        def work() -> None:
            try:
                out["value"] = self._meteor.compute_score(gts, res)
            except Exception as e:  # reported in the caller's thread
                out["error"] = e

        th = threading.Thread(target=work, daemon=True)
        th.start()
        th.join(self.timeout_s)
        if th.is_alive() or "error" in out:
            self.close()
            if "error" in out:
                raise RuntimeError(f"METEOR failed: {out['error']!r}") from out["error"]
            raise TimeoutError(f"METEOR gave no answer within {self.timeout_s:.0f} s "
                               "(is Java installed? `java -version`)")
        score, scores = out["value"]
        return float(score), [float(s) for s in scores]

    def close(self) -> None:
        m = getattr(self, "_meteor", None)
        if m is None:
            return
        p = m.meteor_p
        for f in (p.stdin, p.stdout, p.stderr):
            try:
                f.close()
            except Exception:
                pass
        p.kill()
        p.wait()
        # the library's __del__ takes this lock again; a hung call may still hold the old one
        m.lock = threading.Lock()
        self._meteor = None

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def caption_metrics_available() -> bool:
    """pycocoevalcap installed and Java on the PATH (its PTB tokenizer and METEOR are Java programs)."""
    import importlib.util
    import shutil

    return importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None


def caption_metrics(predictions: Mapping[int, str], references: Mapping[int, Sequence[str]],
                    *, meteor: bool = True, meteor_timeout_s: float = 300.0) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) as fractions, keyed by region id (one hypothesis each)."""
    return caption_scores(predictions, references, meteor=meteor, meteor_timeout_s=meteor_timeout_s).corpus


@dataclass
class CaptionScores:
    """`corpus`: the metrics as `caption_metrics` gives them. `per_region`: CIDEr and METEOR of each region,
    in the order of `ids` (CIDEr-D's corpus value is their mean; METEOR's corpus value pools the matches
    of all regions, so it differs slightly from the mean of the per-region scores)."""

    corpus: dict[str, float]
    ids: list[int]
    per_region: dict[str, np.ndarray]


def caption_scores(predictions: Mapping[int, str], references: Mapping[int, Sequence[str]],
                   *, meteor: bool = True, meteor_timeout_s: float = 300.0) -> CaptionScores:
    """`caption_metrics` with the per-region CIDEr and METEOR kept (for bootstrap intervals)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        missing = sorted(set(references) ^ set(predictions))[:5]
        raise ValueError(f"predictions and references must cover the same region ids; differing: {missing}")
    if not predictions:
        raise ValueError("no predictions to score")
    ids = sorted(predictions)
    tok = PTBTokenizer()
    res = tok.tokenize({i: [{"caption": _clean(predictions[i])}] for i in ids})
    gts = tok.tokenize({i: [{"caption": _clean(r)} for r in references[i]] for i in ids})
    res = {i: [c or "empty"] for i, (c,) in res.items()}
    out: dict[str, float] = {}
    per: dict[str, np.ndarray] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    cider, cider_each = Cider().compute_score(gts, res)  # iterates gts' keys: sorted ids, as tokenize kept them
    out["CIDEr"], per["CIDEr"] = float(cider), np.asarray(cider_each, float)
    if meteor:
        with MeteorScorer(meteor_timeout_s) as m:
            out["METEOR"], meteor_each = m.compute_score(gts, res)
        per["METEOR"] = np.asarray(meteor_each, float)
    return CaptionScores(out, ids, per)


@dataclass
class TagScores:
    """Micro-averaged over all regions: P = TP / predicted, R = TP / ground truth."""

    precision: float
    recall: float
    f1: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def tag_prf(predicted: Sequence[set[str] | Sequence[str]], truth: Sequence[set[str] | Sequence[str]],
            threshold: float = float("nan")) -> TagScores:
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted tag sets but {len(truth)} ground-truth sets")
    tp = n_pred = n_true = 0
    for p, t in zip(predicted, truth):
        p, t = set(p), set(t)
        tp += len(p & t)
        n_pred += len(p)
        n_true += len(t)
    prec, rec, f1 = (float(v) for v in precision_recall_f1(tp, n_pred, n_true))
    return TagScores(prec, rec, f1, threshold)


def precision_recall_f1(tp, n_pred, n_true) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Micro P = TP / predicted, R = TP / ground truth and their F1 from counts (numbers or arrays of them,
    e.g. one per bootstrap resample); 0 where a denominator is 0."""
    tp, n_pred, n_true = (np.asarray(v, float) for v in (tp, n_pred, n_true))
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(n_pred > 0, tp / n_pred, 0.0)
        rec = np.where(n_true > 0, tp / n_true, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    return prec, rec, f1


def top1_accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equally many predictions and labels (> 0), got {len(predicted)} and {len(truth)}")
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def attribute_map(scores: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """OVAD-style mAP (§8.3): AP per attribute over labelled regions (label -1 = unlabeled), then the mean
    over attributes that have at least one positive. Returns (mAP, per-attribute AP with NaN for skipped)."""
    from sklearn.metrics import average_precision_score

    scores, labels = np.asarray(scores, float), np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same shape")
    aps = []
    for a in range(labels.shape[1]):
        keep = labels[:, a] >= 0
        y = labels[keep, a]
        aps.append(float(average_precision_score(y, scores[keep, a])) if y.sum() > 0 else float("nan"))
    valid = [x for x in aps if not np.isnan(x)]
    return (float(np.mean(valid)) if valid else float("nan")), aps


def relation_of(caption: str) -> str | None:
    """The first relation phrase in a caption ("left of", "right of", "above", "below"), or None."""
    words = f" {caption.lower()} "
    hits = [(words.find(f" {r} "), r) for r in RELATION_WORDS if f" {r} " in words]
    return min(hits)[1] if hits else None


def relation_accuracy(predictions: Sequence[str], relations: Sequence[str]) -> float:
    """Fraction of regions whose caption states the ground-truth relation word."""
    if len(predictions) != len(relations) or not relations:
        raise ValueError(f"need equally many captions and relations (> 0), got {len(predictions)}, {len(relations)}")
    return float(np.mean([relation_of(p) == r for p, r in zip(predictions, relations)]))


# --- DenseCap mAP (§8.1): the DenseCap evaluator as DynRefer's eval_densecap.py runs it -------------------

IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
GT_MERGE_IOU = 0.7

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


class Detection(NamedTuple):
    """One predicted region of an image: box (x1, y1, x2, y2), caption, confidence (higher = surer)."""

    box: Box
    caption: str
    score: float


class GTRegion(NamedTuple):
    """One ground-truth region of an image: box (x1, y1, x2, y2) and its caption."""

    box: Box
    caption: str


class Match(NamedTuple):
    """Where one detection landed: `gt` is its best-IoU GT box (-1 when it overlaps none), `iou` that
    overlap, `ok` whether it took that box (False when the box was already taken or iou is 0)."""

    gt: int
    iou: float
    ok: bool


class PairScorer(Protocol):
    """pycocoevalcap's interface: `gts` {key: [references]}, `res` {key: [candidate]} -> (mean, per key)."""

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, list[float]]: ...


def box_iou(a, b) -> np.ndarray:
    """(N, M) IoU of x1y1x2y2 boxes in continuous coordinates (no +1), as torchvision computes it;
    0 where the union is empty (torchvision gives 0/0 = NaN there, which compares the same way)."""
    a = np.asarray(a, float).reshape(-1, 4)
    b = np.asarray(b, float).reshape(-1, 4)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None] + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def merge_boxes(boxes, thr: float = GT_MERGE_IOU) -> list[list[int]]:
    """Index groups of GT boxes that become one box: repeatedly the box with the most remaining boxes at
    IoU >= thr (itself included; ties: the first) together with those boxes, until none is left.

    Why: Visual Genome annotates one object many times; the merged box holds all those captions as
    references, so npos counts the object once. A zero-area box joins no group and is dropped, as in the
    original (its IoU with itself is 0/0)."""
    good = box_iou(boxes, boxes) >= thr
    groups = []
    while good.any():
        members = np.flatnonzero(good[int(good.sum(0).argmax())])
        groups.append(members.tolist())
        good[members, :] = False
        good[:, members] = False
    return groups


def merge_ground_truth(regions: Sequence[GTRegion], thr: float = GT_MERGE_IOU) -> tuple[np.ndarray, list[list[str]]]:
    """One image's GT regions merged by `merge_boxes`: (M, 4) mean box of each group, and its captions."""
    boxes = np.array([r.box for r in regions], float).reshape(-1, 4)
    groups = merge_boxes(boxes, thr)
    merged = np.array([boxes[g].mean(0) for g in groups]).reshape(-1, 4)
    return merged, [[regions[i].caption for i in g] for g in groups]


def match_detections(boxes, gt_boxes) -> list[Match]:
    """Greedy matching of one image's detections, in the order given (pass them by descending score):
    each goes to its best-IoU GT box (ties: the first) and takes it if the IoU is > 0 and the box is free;
    otherwise it is a miss. Why no fall-back to the second-best box: the original has none."""
    iou = box_iou(boxes, gt_boxes)
    used = np.zeros(iou.shape[1], bool)
    out = []
    for row in iou:
        j = int(row.argmax()) if row.size else -1
        if j < 0 or row[j] <= 0:
            out.append(Match(-1, 0.0, False))
            continue
        out.append(Match(j, float(row[j]), not used[j]))
        used[j] = True
    return out


def average_precision(is_tp: Sequence[bool], npos: int) -> float:
    """DenseCap's AP of a ranked list: the mean over recall levels t = 0, 0.01, ..., 0.99 of the best
    precision at recall >= t (0 where recall never reaches t). Recall = TPs so far / npos, compared
    exactly (100·TP >= 100t·npos in integers). Why: the Python port compares float32 recall with
    torch.arange(0, 1, 0.01), whose float32 levels miss some exact recalls (9/20 misses 0.45); that moves
    an AP by at most 0.01 x precision, and the Lua original rounds differently again."""
    tp = np.cumsum(np.asarray(is_tp, bool))
    if tp.size == 0:
        return 0.0
    prec = tp / np.arange(1, tp.size + 1)
    best_from = np.maximum.accumulate(prec[::-1])[::-1]  # best precision at this rank or later
    first = np.searchsorted(100 * tp, np.arange(100) * npos)  # first rank with recall >= t
    return float(np.where(first < tp.size, best_from[np.minimum(first, tp.size - 1)], 0.0).mean())


@dataclass
class DenseCapResult:
    """DenseCap scores as fractions. `ap[i][j]`: AP at IoU >= IOU_THRESHOLDS[i] and METEOR >
    METEOR_THRESHOLDS[j]; `det_ap[i]`: AP at IoU >= IOU_THRESHOLDS[i], captions ignored (the original's
    METEOR threshold -1); `map`, `det_map`: their means. `n_gt_boxes` (npos) counts merged GT boxes."""

    map: float
    det_map: float
    ap: list[list[float]]
    det_ap: list[float]
    n_images: int
    n_detections: int
    n_gt_regions: int
    n_gt_boxes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _meteor_per_pair(pairs: list[tuple[str, list[str]]], scorer: PairScorer | None,
                     timeout_s: float) -> np.ndarray:
    """METEOR of each (candidate, references) pair that has references, NaN for the rest, in one batch."""
    out = np.full(len(pairs), np.nan)
    todo = [i for i, (_, refs) in enumerate(pairs) if refs]
    if not todo:
        return out
    gts = {k: [_clean(r) for r in pairs[i][1]] for k, i in enumerate(todo)}
    res = {k: [_clean(pairs[i][0])] for k, i in enumerate(todo)}
    own = scorer is None
    scorer = MeteorScorer(timeout_s) if own else scorer
    try:
        _, per = scorer.compute_score(gts, res)
    finally:
        if own:
            scorer.close()
    out[todo] = per
    return out


@dataclass
class DenseCapMatches:
    """Every detection of a DenseCap evaluation, matched and METEOR-scored, grouped by image (`start[i]` to
    `start[i + 1]` are image i's detections; `npos[i]` its merged GT boxes). `result()` gives the mAP of all
    images or of a resample of them (image indices, repeats allowed: the bootstrap's unit)."""

    images: list
    start: np.ndarray
    npos: np.ndarray
    scores: np.ndarray
    ok: np.ndarray
    iou: np.ndarray
    meteor: np.ndarray
    n_gt_regions: int

    def result(self, images: Sequence[int] | None = None) -> DenseCapResult:
        idx = np.arange(len(self.images)) if images is None else np.asarray(images, int)
        rows = (np.concatenate([np.arange(self.start[i], self.start[i + 1]) for i in idx]) if len(idx)
                else np.zeros(0, int))
        npos = int(self.npos[idx].sum())
        order = rows[np.argsort(-self.scores[rows], kind="stable")]
        ok, iou, met = self.ok[order], self.iou[order], self.meteor[order]
        det_ap = [average_precision(ok & (iou >= t), npos) for t in IOU_THRESHOLDS]
        ap = [[average_precision(ok & (iou >= t) & (met > m), npos) for m in METEOR_THRESHOLDS]
              for t in IOU_THRESHOLDS]
        return DenseCapResult(map=float(np.mean(ap)), det_map=float(np.mean(det_ap)), ap=ap, det_ap=det_ap,
                              n_images=len(idx), n_detections=len(rows), n_gt_regions=self.n_gt_regions,
                              n_gt_boxes=npos)


def densecap_map(predictions: Mapping[Hashable, Sequence[Detection]],
                 ground_truth: Mapping[Hashable, Sequence[GTRegion]],
                 meteor: PairScorer | None = None, *, meteor_timeout_s: float = 600.0) -> DenseCapResult:
    """DenseCap mAP of per-image detections against per-image GT regions (plain tuples work too).

    Per image: GT boxes merged (`merge_ground_truth`: mean box, all captions as references), detections matched
    by descending score (`match_detections`). Each matched detection is scored by METEOR against the
    references of its best box, all in one batch through `meteor` (default: one MeteorScorer for this call,
    then closed). Over all images, by descending score (ties: input order), a detection is a true positive
    at (IoU thr, METEOR thr) iff it took its box, IoU >= thr and METEOR > thr (strict). Images missing from
    either mapping count as having no detections or no GT (the original fails on both)."""
    return densecap_matches(predictions, ground_truth, meteor, meteor_timeout_s=meteor_timeout_s).result()


def densecap_matches(predictions: Mapping[Hashable, Sequence[Detection]],
                     ground_truth: Mapping[Hashable, Sequence[GTRegion]],
                     meteor: PairScorer | None = None, *, meteor_timeout_s: float = 600.0) -> DenseCapMatches:
    """The matching and METEOR step of `densecap_map`, kept per image."""
    images = list(ground_truth) + [k for k in predictions if k not in ground_truth]
    scores, pairs, ok, iou = [], [], [], []
    start, npos = [0], []
    n_regions = 0
    for img in images:
        gts = [GTRegion(*g) for g in ground_truth.get(img, ())]
        dets = sorted((Detection(*d) for d in predictions.get(img, ())), key=lambda d: -d.score)
        merged, references = merge_ground_truth(gts)
        n_regions += len(gts)
        npos.append(len(merged))
        for d, m in zip(dets, match_detections([d.box for d in dets], merged)):
            scores.append(float(d.score))
            pairs.append((d.caption, references[m.gt] if m.gt >= 0 else []))
            ok.append(m.ok)
            iou.append(m.iou)
        start.append(len(scores))
    met = _meteor_per_pair(pairs, meteor, meteor_timeout_s)
    return DenseCapMatches(images, np.asarray(start, int), np.asarray(npos, int), np.asarray(scores, float),
                           np.asarray(ok, bool), np.asarray(iou, float), met, n_regions)
