"""Region metrics: captions (pycocoevalcap, per region id), tags, recognition, attributes, relations.

Caption metrics follow §8.2 but key the references by **region id**, not image id, so images with many
regions are scored correctly. METEOR runs the Java jar bundled with pycocoevalcap: captions are stripped
of newlines (a newline desynchronises the jar and the Python side then blocks forever), the call runs
under a timeout, and the Java process is always stopped.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

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
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        with MeteorScorer(meteor_timeout_s) as m:
            out["METEOR"] = m.compute_score(gts, res)[0]
    return out


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
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_true if n_true else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return TagScores(prec, rec, f1, threshold)


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
