"""The evaluate command end to end on a tiny random model (numbers are low; the format is what is tested)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynrefer_core import evaluate as E
from dynrefer_core.data.annotations import load_annotations


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_evaluate_cli_writes_json_with_headline_metrics(tiny_ckpt, tmp_path, capsys):
    ckpt, ann = tiny_ckpt
    out = tmp_path / "eval.json"
    E.main(["--checkpoint", str(ckpt), "--annotations", str(ann), "--split", "test", "--out", str(out),
            "--save-predictions", "--threads", "1"])
    res = json.loads(out.read_text())
    n_test = len(load_annotations(ann).split("test").regions)
    assert res["num_regions"] == n_test
    for key in ("recognition_top1", "tag_f1", "METEOR", "BLEU-4", "ROUGE-L", "attribute_mAP", "relation_accuracy"):
        assert 0.0 <= res[key] <= 1.0, key
    assert res["CIDEr"] >= 0.0
    assert res["settings"]["strategy"] == "phash" and res["settings"]["split"] == "test"
    assert len(res["predictions"]) == n_test
    p = res["predictions"][0]
    assert p["views"][0] == 0.0 and len(p["views"]) == 3 and isinstance(p["caption"], str)
    assert "| recognition_top1 |" in res["table"] and "| recognition_top1 |" in capsys.readouterr().out


def test_evaluate_ablation_settings_without_meteor(tiny_ckpt, tmp_path):
    ckpt, ann = tiny_ckpt
    for args in (["--n-views", "1"], ["--strategy", "fixed", "--ts", "0.3", "0.8"], ["--strategy", "random"]):
        out = tmp_path / "e.json"
        E.main(["--checkpoint", str(ckpt), "--annotations", str(ann), "--out", str(out), "--no-meteor",
                "--save-predictions", "--max-regions", "3", *args])
        res = json.loads(out.read_text())
        assert res["num_regions"] == 3 and res["METEOR"] is None  # a scene has >= 4 regions
        views = {len(p["views"]) for p in res["predictions"]}
        if "--n-views" in args:
            assert views == {1}
        if "fixed" in args:
            assert all(p["views"] == [0.0, 0.3, 0.8] for p in res["predictions"])


def test_evaluate_rejects_fixed_without_ts(tiny_ckpt):
    ckpt, ann = tiny_ckpt
    with pytest.raises(SystemExit):
        E.main(["--checkpoint", str(ckpt), "--annotations", str(ann), "--strategy", "fixed"])


@pytest.mark.slow
def test_evaluate_with_a_hub_id_offline_fails_fast_and_clearly(scenes):
    """python -m dynrefer_core.evaluate --checkpoint <hub id> with HF_HUB_OFFLINE=1: exit 1 within the timeout, the
    last line of stderr says what it could not find (no hang on the network)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}  # this checkout's package
    command = [sys.executable, "-m", "dynrefer_core.evaluate", "--checkpoint", "dynrefer-core-tests/no-such-model",
               "--annotations", str(scenes), "--split", "all"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 1
    assert ("'dynrefer-core-tests/no-such-model' is neither a local model folder nor a reachable Hugging Face Hub "
            "model") in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="DenseCap scores captions with METEOR (Java)")
def test_evaluate_densecap_on_ground_truth_boxes(tiny_ckpt, tmp_path, capsys):
    ckpt, ann = tiny_ckpt
    out = tmp_path / "dense.json"
    assert E.main(["--checkpoint", str(ckpt), "--annotations", str(ann), "--split", "all", "--max-regions", "12",
                   "--densecap", "gt", "--no-meteor", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["densecap_protocol"] == "gt" and 0 <= res["densecap_map"] <= res["densecap_det_map"] == 1.0
    assert "DenseCap mAP (ground-truth boxes, caption probability: the paper's protocol)" in res["table"]
    with pytest.raises(SystemExit):
        E.main(["--checkpoint", str(ckpt), "--annotations", str(ann), "--densecap", "proposals"])
    assert "exactly one of --proposer DIR and --proposals FILE" in capsys.readouterr().err
