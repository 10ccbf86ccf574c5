"""bench/probe_encoder.py: the slot labels it probes for, the neighbour's box in a view, and a run end to end."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from dynrefer_core import train as T
from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.data.generate import generate

spec = importlib.util.spec_from_file_location("probe_encoder", Path(__file__).parents[1] / "bench/probe_encoder.py")
P = importlib.util.module_from_spec(spec)
spec.loader.exec_module(P)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return generate(43, 24, root / "data"), root


def test_slot_labels_are_the_caption_words(data):
    ann, _ = data
    records = json.loads(ann.read_text())["annotations"]
    by_id = {r["id"]: r for r in records}
    for r in records:
        size, colour, pattern, category, relation, n_colour, n_category = P.slot_labels(r, by_id)
        assert r["caption"] == (f"a {size} {colour} {pattern} {category} {relation} "
                                f"{'an' if n_colour[0] in 'aeiou' else 'a'} {n_colour} {n_category}")


def test_probe_is_nan_without_two_classes_and_fits_separable_data():
    import numpy as np

    x = np.arange(20, dtype=float)[:, None]
    assert math.isnan(P.probe(x, np.zeros(20, dtype=int), 0.6))
    assert math.isnan(P.probe(x, (x[:, 0] > 9).astype(int), 0.5))  # both classes, but the fit rows hold one
    y = np.tile([0, 1], 20)
    assert P.probe(np.stack([y + 0.01 * np.arange(40), np.ones(40)], 1), y, 0.5) == 1.0


@pytest.mark.slow
def test_probe_encoder_runs_on_a_saved_model(data, tmp_path):
    ann, root = data
    cfg = T.load_config(None, ["model.preset=tiny"])
    T.build_model(cfg, load_annotations(ann).split("train")).save_pretrained(root / "ckpt")
    out = tmp_path / "probes.md"
    table = P.main(["--checkpoint", str(root / "ckpt"), "--annotations", str(ann), "--split", "train",
                    "--threads", "1", "--out", str(out)])
    assert out.read_text() == table + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| features")
            and not line.startswith("| RoI-aligned")]
    assert len(rows) == 8  # six stages, then the neighbour's box and the region's box
    values = [float(v) for row in rows for v in row.strip("| ").split(" | ")[1:]]
    assert len(values) == 6 * 7 + 2 * 2 and all(0.0 <= v <= 1.0 for v in values if not math.isnan(v))
    assert "Where the neighbour is at least 80% inside a context view (0 views)" not in table
