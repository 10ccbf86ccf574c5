"""The view study (dynrefer_core/view_study.py): t parsing, the bootstrap's pieces against direct computation,
the sweep command end to end on a tiny model, task priors saved with the checkpoint and used by describe and
the app."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from demo_support import load_app
from dynrefer_core import evaluate as E
from dynrefer_core import metrics
from dynrefer_core import view_study as V
from dynrefer_core.config import DynReferConfig
from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.modeling.dynrefer import DynRefer

JAVA = shutil.which("java") is not None


def test_parse_ts_expands_ellipsis_and_refuses_nonsense():
    assert V.parse_ts("0,0.1,...,1.0") == [round(0.1 * k, 6) for k in range(11)]
    assert V.parse_ts("1, 0.25,0") == [0.0, 0.25, 1.0]
    assert V.parse_ts("0,0.5,...,1") == [0.0, 0.5, 1.0]
    for bad in ("", "0,1.5", "0,0.5,0.5", "0,...,1", "0,0.2,...", "a,b"):
        with pytest.raises(ValueError, match="--sweep-t"):
            V.parse_ts(bad)


def test_weighted_average_precision_is_sklearns_on_repeated_rows():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(3, 40))
        scores = rng.integers(0, 5, n) / 4.0 if trial % 2 else rng.random(n)  # with and without ties
        labels = rng.integers(0, 2, n)
        weights = rng.integers(0, 3, (4, n)).astype(float)
        got = V.weighted_average_precision(scores, labels, weights)
        for w, g in zip(weights, got):
            rows = np.repeat(np.arange(n), w.astype(int))
            if labels[rows].sum() == 0:
                assert np.isnan(g)
            else:
                assert g == pytest.approx(average_precision_score(labels[rows], scores[rows]), abs=1e-12)


class WordOverlap:
    """A deterministic stand-in for the METEOR jar (PairScorer): shared words / reference words."""

    def compute_score(self, gts, res):
        out = []
        for k in gts:
            ref = set(" ".join(gts[k]).split())
            out.append(len(ref & set(res[k][0].split())) / max(len(ref), 1))
        return float(np.mean(out)), out


def test_densecap_resample_equals_the_evaluator_on_repeated_images():
    rng = np.random.default_rng(1)
    words = ["a", "red", "blue", "circle", "square", "left", "of"]

    def caption():
        return " ".join(rng.choice(words, 4))

    gt, pred = {}, {}
    for img in range(5):
        boxes = [[x, x, x + 20, x + 30] for x in rng.integers(0, 100, 3).tolist()]
        gt[img] = [metrics.GTRegion(b, caption()) for b in boxes]
        pred[img] = [metrics.Detection([v + rng.integers(-3, 4) for v in b], caption(), float(rng.random()))
                     for b in boxes]
    matches = metrics.densecap_matches(pred, gt, WordOverlap())
    assert matches.result().map == metrics.densecap_map(pred, gt, WordOverlap()).map
    draw = [3, 0, 3, 1, 1]  # image 3 and 1 twice, 2 and 4 left out
    copies = {k: img for k, img in enumerate(draw)}
    direct = metrics.densecap_map({k: pred[i] for k, i in copies.items()}, {k: gt[i] for k, i in copies.items()},
                                  WordOverlap())
    assert matches.result(draw).map == pytest.approx(direct.map, abs=1e-12)
    assert matches.result(draw).n_gt_boxes == direct.n_gt_boxes


def _setting(name, t, value, rng):
    """CIDEr = value, attribute mAP = 1 - value, recognition the same 0.9 everywhere, each with noisy replicates."""
    reps = value + rng.normal(0, 0.01, 200)
    return V.Setting(name, t, {"CIDEr": value, "attribute_mAP": 1 - value, "recognition_top1": 0.9},
                     {"CIDEr": reps, "attribute_mAP": 1 - reps, "recognition_top1": 0.9 + rng.normal(0, 0.01, 200)},
                     1.0)


def test_sweep_record_pairs_differences_and_picks_priors():
    rng = np.random.default_rng(2)
    settings = [_setting(f"t={t:g}", t, v, rng) for t, v in ((0.0, 0.2), (0.3, 0.5), (0.6, 0.5), (1.0, 0.1))]
    settings.append(_setting("phash", None, 0.4, rng))
    sweep = V.sweep_record(settings, list(range(20)), 60, 200, 0, 0.95, n_views=3)
    rows = {r["setting"]: r for r in sweep["rows"]}
    assert sweep["best"] == {"CIDEr": 0.3, "attribute_mAP": 1.0, "recognition_top1": 0.0}  # ties: the smaller t
    assert rows["t=0.3"]["metrics"]["CIDEr"]["vs_best"] == [0.0, 0.0]
    low, high = rows["t=1"]["metrics"]["CIDEr"]["vs_best"]
    assert high < 0 and low < high  # t = 1 clearly worse than the best t, paired
    ci = rows["t=0.3"]["metrics"]["CIDEr"]["ci"]
    assert ci[0] < 0.5 < ci[1]
    assert "vs_phash" not in rows["phash"]["metrics"]["CIDEr"]
    # the measured setting (view two at t, the third slot the tight crop), unless pHASH is as good
    assert sweep["task_priors"] == {"captioning": [0.3, 0.0], "attributes": [1.0, 0.0], "recognition": "phash"}
    assert "| (0, pHASH) |" in V.sweep_table(sweep)
    fig = V.sweep_figure(sweep, marks=[0.3])
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "captioning: CIDEr"


@pytest.mark.slow
@pytest.mark.skipif(not JAVA, reason="METEOR and the PTB tokenizer need Java")
def test_sweep_command_scores_every_task_at_every_t(tiny_ckpt, tmp_path, capsys):
    ckpt, ann = tiny_ckpt
    out = tmp_path / "sweep.json"
    assert E.main(["--checkpoint", str(ckpt), "--annotations", str(ann), "--split", "all", "--max-regions", "14",
                   "--sweep-t", "0,0.5,...,1.0", "--bootstrap", "60", "--out", str(out)]) == 0
    sweep = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert [r["t"] for r in sweep["rows"]] == [0.0, 0.5, 1.0, None]
    assert sweep["n_regions"] == 14 and sweep["bootstrap"]["resamples"] == 60
    for row in sweep["rows"]:
        assert set(row["metrics"]) == set(V.METRICS), row["setting"]
        for name, entry in row["metrics"].items():
            low, high = entry["ci"]
            assert low <= high and np.isfinite(entry["value"]), (row["setting"], name)
    phash = sweep["rows"][-1]
    assert phash["setting"] == "phash" and sum(phash["selected_ts"].values()) == pytest.approx(1.0)
    assert set(sweep["task_priors"]) == set(V.PRIMARY) and all(ts == "phash" or len(ts) == 2 for ts in sweep["task_priors"].values())
    printed = capsys.readouterr().out
    assert "| (0, 0.5) |" in printed and "best t per metric" in printed


def test_task_priors_saved_on_val_drive_describe_and_never_come_from_test(tiny_ckpt, tmp_path, scenes):
    ckpt, ann = tiny_ckpt
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    with pytest.raises(SystemExit):  # choosing views on test is model selection on test
        E.main(["--checkpoint", str(folder), "--annotations", str(ann), "--split", "test", "--sweep-t", "0,1",
                "--save-priors", "--no-caption-metrics"])
    assert E.main(["--checkpoint", str(folder), "--annotations", str(ann), "--split", "val", "--sweep-t", "0,0.4,1",
                   "--bootstrap", "20", "--save-priors", "--no-caption-metrics"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert set(config["task_priors"]) == {"attributes", "recognition"}  # no Java here: no caption metrics
    assert "split 'val'" in config["task_priors_source"]
    prior = config["task_priors"]["attributes"]
    model = DynRefer.from_pretrained(folder, device="cpu")
    image = load_annotations(ann).images
    first = next(iter(image.values())).path
    result = model.describe(first, [(10, 10, 60, 50)], strategy="task", task="attributes")[0]
    if prior == "phash":  # a random model: no fixed view measured better than pHASH
        assert result.plan.strategy == "phash"
    else:
        assert result.plan.strategy == "fixed" and result.plan.selected_ts == [0.0, *prior]
    with pytest.raises(ValueError, match="no task prior for 'captioning'"):
        model.describe(first, [(10, 10, 60, 50)], strategy="task", task="captioning")


def test_app_offers_the_models_task_priors_and_draws_its_study(tmp_path):
    app = load_app()
    handlers = app.handlers
    config = DynReferConfig.tiny()
    config.task_priors = {"attributes": [0.0, 0.2], "captioning": [0.5, 0.3], "dense": "phash"}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        folder = DynRefer(config).save_pretrained(tmp_path / "with-priors")
    rng = np.random.default_rng(3)
    sweep = V.sweep_record([_setting(f"t={t:g}", t, v, rng) for t, v in ((0.0, 0.2), (0.5, 0.4))]
                           + [_setting("phash", None, 0.3, rng)], list(range(5)), 10, 200, 0, 0.95, 3)
    (folder / "view_study.json").write_text(json.dumps(sweep))
    loaded = handlers.load_model(str(folder), "cpu")
    assert loaded.error is None and loaded.view_study()["rows"][0]["t"] == 0.0
    choices = handlers.task_prior_choices(loaded.config)
    assert ("task prior: attributes (t = 0, 0, 0.2)", "task:attributes") in choices
    options = handlers.view_options(3, "task:captioning", "", "dct", 1.0, 0, config=loaded.config)
    assert (options.strategy, options.ts, options.task) == ("fixed", (0.5, 0.3), "captioning")
    assert ("task prior: dense (pHASH: no fixed view measured better)", "task:dense") in choices
    assert handlers.view_options(3, "task", "", "dct", 1.0, 0, task="dense", config=loaded.config).strategy == "phash"
    with pytest.raises(app.gr.Error, match="no task prior for 'recognition'"):
        handlers.view_options(3, "task", "", "dct", 1.0, 0, task="recognition", config=loaded.config)
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(image)
    value = {"image": str(image), "boxes": [{"xmin": 20, "ymin": 30, "xmax": 60, "ymax": 70}]}
    note = handlers.on_views(value, None, 3, "task:captioning", "", "dct", 1.0, 0, config=loaded.config)[-1]
    assert "t = 0.0, 0.5, 0.3" in note
    fig = handlers.on_study(sweep, value, None, 3, "task:captioning", "", "dct", 1.0, 0, config=loaded.config)
    marked = {round(line.get_xdata()[0], 3) for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == ":"}
    assert marked == {0.5, 0.3}
    payload = handlers.api_describe(loaded, str(image), "[[20, 30, 60, 70]]", strategy="task", task="attributes")
    assert payload["regions"][0]["selected_ts"] == [0.0, 0.0, 0.2]
    demo = app.build_app(loaded)
    assert any(getattr(b, "elem_id", None) == "study-plot" for b in demo.blocks.values())


def test_the_bundled_two_view_model_carries_its_study_and_priors_from_val():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "mini-2view"
    config = DynReferConfig.from_dict({k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                                       if k != "format"})
    assert config.n_views == 2 and set(config.task_priors) == set(V.PRIMARY)
    val = json.loads((folder / "view_study_val.json").read_text())
    assert val["settings"]["split"] == "val" and val["task_priors"] == config.task_priors  # chosen on val
    for name in ("view_study.json", "view_study_unseen_seed2718.json"):
        sweep = json.loads((folder / name).read_text())
        assert sweep["settings"]["split"] == "test" and sweep["ts"] == [round(0.1 * k, 6) for k in range(11)]
        assert [r["setting"] for r in sweep["rows"]][-1] == "phash"
        for row in sweep["rows"]:
            assert set(row["metrics"]) == set(V.METRICS)
            assert all(e["ci"][0] <= e["ci"][1] for e in row["metrics"].values())
        assert (folder / name).with_suffix(".png").is_file()
    assert V.load_view_study(folder)["settings"]["split"] == "test"
