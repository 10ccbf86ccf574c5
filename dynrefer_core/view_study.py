"""The paper's view study (its Figure 4) on any checkpoint: view two fixed at t, swept from 0 to 1.

    python -m dynrefer_core.evaluate --checkpoint checkpoints/mini-2view --annotations FILE --split test \
        --sweep-t 0,0.1,...,1.0 --out sweep.json        (also writes sweep.png)

Each setting describes every region of the split with the views (t = 0, t) (an n > 2 model gets the tight
crop in its other slots, so every model is studied as a dual-view one) and scores the paper's four tasks on
the same regions: region captioning (METEOR, CIDEr), dense captioning on the ground-truth boxes (DenseCap
mAP, spec 8.1), attribute detection (attribute mAP) and region recognition (top-1), plus tag F1. The model's
own pHASH choice is scored on the same regions for comparison.

Intervals are 95 % percentile bootstraps over images (an image's regions are resampled together); every
setting uses the same resamples, so the differences between settings (`vs_best`, `vs_phash`) are paired.
METEOR here is the mean of per-region scores (the jar's corpus METEOR pools matches and differs slightly).

Task priors (`best_ts`): per task, the measured setting with the best value of the task's metric, if it beats
the pHASH choice with a paired 95 % interval above 0; otherwise pHASH stays the task's choice. `--save-priors`
stores them in the checkpoint's config.json; it refuses a test sweep, since choosing views is model selection.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from . import metrics
from .data.annotations import RegionAnnotations
from .evaluate import densecap_inputs, evaluate_model
from .views import TASKS, ViewOptions

# task -> its metrics, the first the one a task prior maximises (PRIMARY; "tags" has no prior)
TASK_METRICS = {"captioning": ("CIDEr", "METEOR"), "dense": ("densecap_map",), "attributes": ("attribute_mAP",),
                "recognition": ("recognition_top1",), "tags": ("tag_f1",)}
PRIMARY = {task: TASK_METRICS[task][0] for task in TASKS}
LABELS = {"CIDEr": "CIDEr", "METEOR": "METEOR", "densecap_map": "DenseCap mAP (GT boxes)",
          "attribute_mAP": "attribute mAP", "recognition_top1": "recognition top-1", "tag_f1": "tag F1"}
METRICS = tuple(m for ms in TASK_METRICS.values() for m in ms)


def parse_ts(text: str) -> list[float]:
    """"0,0.1,...,1.0" or "0,0.25,0.5": a comma list of t in [0, 1]; "..." continues the first step."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            k = parts.index("...")
            if k < 2 or k != len(parts) - 2:
                raise ValueError
            a, b, end = float(parts[0]), float(parts[1]), float(parts[-1])
            step = b - a
            if step <= 0:
                raise ValueError
            ts = [round(a + i * step, 6) for i in range(int(math.floor((end - a) / step + 1e-6)) + 1)]
        else:
            ts = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--sweep-t {text!r}: give t values in [0, 1] separated by commas, e.g. 0,0.1,...,1.0") from None
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts) or len(set(ts)) != len(ts):
        raise ValueError(f"--sweep-t {text!r}: need distinct t values in [0, 1]")
    return sorted(ts)


def dual_views(t: float, n_views: int) -> ViewOptions:
    """View one the tight crop, view two at t, other slots the tight crop again (t = 0: no context at all)."""
    return ViewOptions(n_views=n_views, strategy="fixed", ts=(t,) + (0.0,) * (n_views - 2))


def weighted_average_precision(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's: sum over thresholds of recall step x precision, tied scores one
    threshold) of one attribute under each row of `weights` (B, R): integer weights = repeated regions, so
    row b is the AP of bootstrap resample b. NaN where a resample has no positive."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order].astype(float), weights[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(w * y, axis=1)[:, ends]
    seen = np.cumsum(w, axis=1)[:, ends]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / np.where(seen > 0, seen, 1), 0.0)
        recall = tp / tp[:, -1:]
        steps = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
        return np.where(tp[:, -1] > 0, (steps * precision).sum(1), np.nan)


@dataclasses.dataclass
class Setting:
    """One evaluated setting: point values and their bootstrap replicates (B,) per metric."""

    name: str
    t: float | None
    values: dict[str, float]
    replicates: dict[str, np.ndarray]
    seconds: float
    selected_ts: dict[str, float] | None = None  # pHASH: the share of regions whose view two is each t


class SweepScorer:
    """Scores `evaluate_model` results on one fixed set of images and bootstrap resamples."""

    def __init__(self, image_ids: list, resamples: int, seed: int, meteor: metrics.MeteorScorer | None):
        self.image_ids = list(image_ids)
        self.index = {img: i for i, img in enumerate(self.image_ids)}
        rng = np.random.default_rng(seed)
        n = len(self.image_ids)
        self.draws = rng.integers(0, n, size=(resamples, n))
        # (B, images): how often each image is in each resample
        self.counts = np.stack([np.bincount(d, minlength=n) for d in self.draws]).astype(float)
        self.meteor = meteor

    def _resampled_mean(self, image_of: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The mean of per-region values `x` (of images `image_of`) in each resample (B,)."""
        n = len(self.image_ids)
        sums, counts = np.bincount(image_of, x, n), np.bincount(image_of, minlength=n).astype(float)
        return (self.counts @ sums) / np.maximum(self.counts @ counts, 1e-12)

    def score(self, res, tag_names: list[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Point values (those `evaluate_model` computed, METEOR as the mean of per-region scores) and their
        bootstrap replicates."""
        preds = res.predictions
        image_of = np.array([self.index[p["image_id"]] for p in preds])
        values, reps = {}, {}
        if not math.isnan(res.recognition_top1):
            labelled = np.array([p["category"] is not None and "predicted_category" in p for p in preds])
            right = np.array([p.get("predicted_category") == p["category"] for p in preds], float)
            values["recognition_top1"] = res.recognition_top1
            reps["recognition_top1"] = self._resampled_mean(image_of[labelled], right[labelled])
        if not math.isnan(res.tag_f1):
            known = set(tag_names)
            counts = [(len(set(p["tags"]) & set(p["gt_tags"]) & known), len(set(p["tags"])),
                       len(set(p["gt_tags"]) & known)) if p["gt_tags"] else (0, 0, 0) for p in preds]
            n = len(self.image_ids)
            values["tag_f1"] = res.tag_f1
            reps["tag_f1"] = metrics.precision_recall_f1(
                *(self.counts @ np.bincount(image_of, np.array(v, float), n) for v in zip(*counts)))[2]
        if res.attribute_arrays is not None and not math.isnan(res.attribute_mAP):
            scores, labels = res.attribute_arrays
            per_attr = []  # attributes with a positive (the mAP's rule, `metrics.attribute_map`)
            for a in range(labels.shape[1]):
                keep = labels[:, a] >= 0
                if labels[keep, a].sum() > 0:
                    per_attr.append(weighted_average_precision(scores[keep, a], labels[keep, a],
                                                               self.counts[:, image_of[keep]]))
            values["attribute_mAP"] = res.attribute_mAP
            reps["attribute_mAP"] = np.nanmean(np.stack(per_attr), axis=0)
        if self.meteor is not None:
            caps = metrics.caption_scores({p["id"]: p["caption"] for p in preds},
                                          {p["id"]: [p["reference"]] for p in preds}, meteor=True)
            by_id = {p["id"]: image_of[i] for i, p in enumerate(preds)}
            cap_images = np.array([by_id[i] for i in caps.ids])
            for name in ("CIDEr", "METEOR"):  # CIDEr-D's corpus value is the mean of its per-region scores
                values[name] = float(caps.per_region[name].mean())
                reps[name] = self._resampled_mean(cap_images, caps.per_region[name])
            predictions, ground_truth = densecap_inputs(preds)
            ground_truth = {img: ground_truth[img] for img in self.image_ids}  # our image order = our indices
            dense = metrics.densecap_matches(predictions, ground_truth, self.meteor)
            values["densecap_map"] = dense.result().map
            reps["densecap_map"] = np.array([dense.result(d).map for d in self.draws])
        return values, reps


def run_sweep(model, annotations: RegionAnnotations, ts: list[float], *, resamples: int = 1000, seed: int = 0,
              caption_metrics: bool = True, max_regions: int | None = None, batch_regions: int = 64,
              decoder: str = "fast", progress: bool = True, level: float = 0.95) -> dict:
    """Evaluate view two at each t of `ts` and the model's pHASH choice; the sweep as a JSON-ready dict."""
    if max_regions is not None:
        annotations = dataclasses.replace(annotations, regions=annotations.regions[:max_regions])
    if not annotations.regions:
        raise ValueError("no regions to sweep over")
    n = model.config.n_views
    if n < 2:
        raise ValueError("the view study needs a model with at least 2 views (this one fuses 1)")
    image_ids = list(dict.fromkeys(r.image_id for r in annotations.regions))
    plans = [(f"t={t:g}", t, dual_views(t, n)) for t in ts] + [("phash", None, ViewOptions(strategy="phash"))]
    settings = []
    meteor = metrics.MeteorScorer() if caption_metrics else None
    try:
        scorer = SweepScorer(image_ids, resamples, seed, meteor)
        for name, t, views in plans:
            start = time.perf_counter()
            res = evaluate_model(model, annotations, views=views, caption_metrics=False, batch_regions=batch_regions,
                                 decoder=decoder, progress=progress)
            values, reps = scorer.score(res, list(model.vocabulary.tags))
            chosen = None
            if t is None:
                picked = [v for p in res.predictions for v in p["views"][1:]]
                chosen = {f"{u:g}": picked.count(u) / len(picked) for u in sorted(set(picked))}
            settings.append(Setting(name, t, values, reps, time.perf_counter() - start, chosen))
    finally:
        if meteor is not None:
            meteor.close()
    return sweep_record(settings, image_ids, len(annotations.regions), resamples, seed, level, n)


def sweep_record(settings: list[Setting], image_ids: list, n_regions: int, resamples: int, seed: int,
                 level: float, n_views: int) -> dict:
    """Values, intervals and paired differences (to the best t, to pHASH) of every setting and metric."""
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(x: np.ndarray) -> list[float] | None:
        x = x[np.isfinite(x)]
        return [float(np.percentile(x, lo_q)), float(np.percentile(x, hi_q))] if x.size else None

    swept = [s for s in settings if s.t is not None]
    phash = next((s for s in settings if s.t is None), None)
    best = {}
    for m in METRICS:
        have = [s for s in swept if m in s.values]
        if have:
            best[m] = max(have, key=lambda s: (s.values[m], -s.t))  # ties: the smaller t
    rows = []
    for s in settings:
        row = {"setting": s.name, "t": s.t, "seconds": round(s.seconds, 1), "metrics": {}}
        if s.selected_ts is not None:
            row["selected_ts"] = s.selected_ts
        for m, v in s.values.items():
            entry = {"value": v, "ci": interval(s.replicates[m])}
            if m in best:
                entry["vs_best"] = interval(s.replicates[m] - best[m].replicates[m])
            if phash is not None and m in phash.replicates and s is not phash:
                entry["vs_phash"] = interval(s.replicates[m] - phash.replicates[m])
            row["metrics"][m] = entry
        rows.append(row)
    record = {"n_images": len(image_ids), "n_regions": n_regions, "n_views": n_views,
              "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "unit": "image"},
              "metrics": {m: {"task": task, "label": LABELS[m]} for task, ms in TASK_METRICS.items() for m in ms},
              "ts": [s.t for s in swept], "rows": rows,
              "best": {m: s.t for m, s in best.items()}}
    record["task_priors"] = best_ts(record, n_views)
    return record


def best_ts(sweep: dict, n_views: int) -> dict[str, list[float] | str]:
    """Per task, as `DynReferConfig.task_priors` holds it: the context ts of the swept setting with the best
    value of the task's PRIMARY metric (the sweep's `best`; ties: the smaller t), i.e. [t, 0, ...] (the other
    slots the tight crop, as measured), if its paired interval against pHASH lies above 0; else "phash" (no
    fixed view measured better than the image prior). Tasks the sweep could not score get none."""
    out: dict[str, list[float] | str] = {}
    for task, m in PRIMARY.items():
        if m not in sweep["best"]:
            continue
        best = next(r for r in sweep["rows"] if r["t"] == sweep["best"][m])
        against = best["metrics"][m].get("vs_phash")
        beats_phash = against is None or against[0] > 0
        out[task] = [best["t"]] + [0.0] * (n_views - 2) if beats_phash else "phash"
    return out


def priors_source(sweep: dict) -> str:
    """What task priors from `sweep` rest on, as `DynReferConfig.task_priors_source` records it."""
    where = sweep.get("settings", {})
    return (f"evaluate --sweep-t on split {where.get('split')!r} of {where.get('annotations')} ({sweep['n_regions']} "
            f"regions, {sweep['n_images']} images): per task the best of "
            + ", ".join(f"{task} {m}" for task, m in PRIMARY.items())
            + " where it beats pHASH (paired 95% interval above 0), else pHASH (docs/view-study.md)")


def sweep_table(sweep: dict) -> str:
    """Markdown: one row per setting, each metric as value [low, high]."""
    names = [m for m in METRICS if any(m in r["metrics"] for r in sweep["rows"])]
    lines = ["| views | " + " | ".join(LABELS[m] for m in names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in sweep["rows"]:
        cells = []
        for m in names:
            e = r["metrics"].get(m)
            cells.append("–" if e is None else f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"
                         if e["ci"] else f"{e['value']:.3f}")
        views = "(0, pHASH)" if r["t"] is None else f"(0, {r['t']:g})"
        lines.append(f"| {views} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_figure(sweep: dict, marks: list[float] = (), title: str | None = None):
    """One panel per metric: value vs t with its interval band; pHASH as a dashed line and band; `marks`:
    ts to draw as vertical lines (the app: the views chosen for the inspected box)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = [m for m in METRICS if any(m in r["metrics"] for r in sweep["rows"])]
    cols = 3
    fig = Figure(figsize=(4.0 * cols, 3.0 * math.ceil(len(names) / cols)), layout="constrained")
    swept = [r for r in sweep["rows"] if r["t"] is not None]
    phash = next((r for r in sweep["rows"] if r["t"] is None), None)
    for k, m in enumerate(names):
        ax = fig.add_subplot(math.ceil(len(names) / cols), cols, k + 1)
        rows = [r for r in swept if m in r["metrics"]]
        t = [r["t"] for r in rows]
        v = [r["metrics"][m]["value"] for r in rows]
        ci = [r["metrics"][m]["ci"] or [r["metrics"][m]["value"]] * 2 for r in rows]
        ax.fill_between(t, [c[0] for c in ci], [c[1] for c in ci], alpha=0.25, color="C0")
        ax.plot(t, v, "o-", color="C0", label="view two at t")
        if phash is not None and m in phash["metrics"]:
            e = phash["metrics"][m]
            ax.axhline(e["value"], color="C3", ls="--", label="pHASH")
            if e["ci"]:
                ax.axhspan(*e["ci"], color="C3", alpha=0.12)
        for x in marks:
            ax.axvline(x, color="0.3", lw=1, ls=":")
        ax.ticklabel_format(axis="y", useOffset=False)
        low, high = ax.get_ylim()
        if high - low < 1e-3:  # a flat curve (a saturated metric): show it flat, not magnified noise
            ax.set_ylim(low - 0.05, high + 0.05)
        task = sweep["metrics"][m]["task"]
        ax.set_title(f"{task}: {LABELS[m]}", fontsize=10)
        ax.set_xlabel("t of view two")
        ax.set_xlim(-0.03, 1.03)
        if k == 0:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_sweep_plot(sweep: dict, path: str | Path, title: str | None = None) -> Path:
    path = Path(path)
    sweep_figure(sweep, title=title).savefig(path, dpi=110)
    return path


def load_view_study(folder: str | Path) -> dict | None:
    """The sweep a checkpoint folder carries, or None: `view_study.json` (the study, on test), else
    `view_study_val.json` (the val sweep its task priors were chosen on)."""
    for name in ("view_study.json", "view_study_val.json"):
        path = Path(folder) / name
        if path.is_file():
            sweep = json.loads(path.read_text())
            if isinstance(sweep, dict) and "rows" in sweep:
                return sweep
    return None
