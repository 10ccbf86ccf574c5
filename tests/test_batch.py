"""`dynrefer describe`: every input form, error lines, resume after a kill, torchrun and Ray give the same lines."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dynrefer_core import batch
from dynrefer_core.cli import main as cli
from dynrefer_core.data.generate import generate
from dynrefer_core.modeling.dynrefer import DynRefer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "mini"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model():
    return DynRefer.from_pretrained(CHECKPOINT, device="cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Six generated scenes (a seed no other test uses) and a JSONL input over them."""
    root = tmp_path_factory.mktemp("batch")
    ann = json.loads(generate(seed=6061, num_images=6, out=root).read_text())
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    lines = []
    for k, im in enumerate(ann["images"]):
        entry = {"image": f"images/{im['file_name']}", "boxes": by_image[im["id"]][:4]}
        if k % 2 == 0:
            entry.update(id=f"img{k}", phrases=["a red star", "a blue circle"])
        lines.append(json.dumps(entry))
    (root / "in.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run(*args: str) -> int:
    return cli(["describe", "--checkpoint", str(CHECKPOINT), "--no-progress", *map(str, args)])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same(a: list[dict], b: list[dict]) -> None:
    """The same lines: ids, captions and tag names exactly; scores to fp32 noise across processes."""
    assert [r["region_id"] for r in a] == [r["region_id"] for r in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key, value in x.items():
            if key in ("caption_score",):
                assert value == pytest.approx(y[key], rel=1e-4)
            elif key in ("tags", "similarity", "class_scores"):
                assert [list(d.values())[0] for d in value] == [list(d.values())[0] for d in y[key]]
                assert [d["score"] for d in value] == pytest.approx([d["score"] for d in y[key]], abs=1e-4)
            else:
                assert value == y[key], key


def test_jsonl_lines_are_what_describe_says(model, scenes, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run("--input", scenes / "in.jsonl", "--out", out, "--batch-regions", 5) == 0
    lines = records(out)
    entries = [json.loads(s) for s in (scenes / "in.jsonl").read_text().splitlines()]
    assert len(lines) == sum(len(e["boxes"]) for e in entries)
    k = 0
    for e in entries:
        results = model.describe(scenes / e["image"], e["boxes"], phrases=e.get("phrases", ()))
        image_id = e.get("id", e["image"])
        for i, r in enumerate(results):
            line = lines[k]
            k += 1
            assert (line["image"], line["image_id"], line["region_id"]) == (e["image"], image_id, f"{image_id}:{i}")
            assert line["box"] == list(r.box) and line["selected_ts"] == list(r.plan.selected_ts)
            assert line["caption"] == r.caption and line["caption_score"] == pytest.approx(r.caption_score, abs=1e-5)
            assert [t["name"] for t in line["tags"]] == [n for n, _ in r.tags]
            assert [s["phrase"] for s in line["similarity"]] == list(e.get("phrases", []))
            assert [s["score"] for s in line["similarity"]] == pytest.approx([s for _, s in r.similarity], abs=1e-5)
            assert line["category"] == r.category and line["box_rounding"] == "exact"


def test_coco_file_and_coco_results(model, scenes, tmp_path):
    out, coco = tmp_path / "out.jsonl", tmp_path / "coco.json"
    assert run("--input", scenes / "annotations.json", "--out", out, "--coco-results", coco) == 0
    ann = json.loads((scenes / "annotations.json").read_text())
    lines = records(out)
    assert [r["region_id"] for r in lines] == [a["id"] for a in ann["annotations"]]
    assert all(r["image_id"] == a["image_id"] for r, a in zip(lines, ann["annotations"]))
    results = json.loads(coco.read_text())
    assert len(results) == len(lines)
    x1, y1, x2, y2 = lines[0]["box"]
    assert results[0] == {"image_id": lines[0]["image_id"], "id": lines[0]["region_id"], "caption": lines[0]["caption"],
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "score": lines[0]["caption_score"]}


def test_image_folder_with_boxes_and_bad_inputs(scenes, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(scenes / "images", folder / "sub")
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out.jsonl"
    code = run("--input", folder, "--out", out, "--boxes", "[[20, 30, 120, 140], [50, 50, 50, 90]]",
               "--phrases", "a red star")
    assert code == 1  # some regions failed: the exit status says so ...
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("described 6 regions, 8 failed")  # ... and the last line how many
    lines = records(out)
    assert len(lines) == 7 * 2  # every region has its line, in folder order
    names = sorted(p.name for p in (folder / "sub").iterdir())
    assert [r["image"] for r in lines[::2]] == [f"sub/{n}" for n in names]
    broken = [r for r in lines if r["image"] == "sub/broken.jpg"]
    assert all("ImageLoadError" in r["error"] for r in broken)
    zero = [r for r in lines if r["region_id"].endswith(":1") and r["image"] != "sub/broken.jpg"]
    assert all("zero area" in r["error"] for r in zero)
    good = [r for r in lines if "error" not in r]
    assert len(good) == 6 and all(r["similarity"][0]["phrase"] == "a red star" for r in good)
    # Nothing is overwritten without --resume; unknown inputs get a clear message.
    assert run("--input", folder, "--out", out, "--boxes", "[[1, 2, 3, 4]]") == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run("--input", folder, "--out", tmp_path / "x.jsonl") == 2
    assert "--boxes" in capsys.readouterr().err


def test_bad_jsonl_lines_get_error_lines(scenes, tmp_path):
    src = tmp_path / "in.jsonl"
    first = (scenes / "in.jsonl").read_text().splitlines()[1]
    src.write_text(first.replace('"images/', f'"{scenes}/images/') + "\n{broken\n"
                   + json.dumps({"image": "a.jpg", "boxes": "no"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert run("--input", src, "--out", out) == 1
    lines = records(out)
    assert [r["region_id"] for r in lines[-2:]] == ["line 2", "line 3"]
    assert "not valid JSON" in lines[-2]["error"] and '"boxes" must be a list' in lines[-1]["error"]


def test_preparing_processes_give_the_lines_of_one_process(scenes, tmp_path):
    """Images prepared in 3 processes (forked, in input order, arrays sent back) or in this process: the same
    lines. Batches of 2 regions keep several images in flight, so a reordering would show."""
    outs = []
    for workers in (0, 3):
        outs.append(tmp_path / f"w{workers}.jsonl")
        assert run("--input", scenes / "in.jsonl", "--out", outs[-1], "--batch-regions", 2, "--workers", workers) == 0
    assert_same(records(outs[1]), records(outs[0]))
    assert run("--input", scenes / "in.jsonl", "--out", tmp_path / "x.jsonl", "--workers", -1) == 2


def test_a_batch_is_split_into_equal_model_calls():
    from dynrefer_core.batch.engine import call_size

    assert [call_size(n, 32) for n in (1, 32, 37, 47, 50, 64, 1000)] == [1, 32, 37, 47, 25, 32, 33]


def _die(*args):  # a preparing process that crashes (pickled by reference into the forked worker)
    os._exit(3)


def test_a_dying_preparing_process_stops_the_run_with_a_clear_error(scenes, tmp_path, monkeypatch, capsys):
    from dynrefer_core.batch import engine

    monkeypatch.setattr(engine, "_prepare_for_transfer", _die)
    out = tmp_path / "out.jsonl"
    assert run("--input", scenes / "in.jsonl", "--out", out, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert "a process preparing images died" in err and "--resume" in err and "images/s6061_" in err


def _parent(proc_dir: Path) -> int | None:
    """The parent pid of a /proc/PID entry, None once it is gone (or a zombie)."""
    try:
        fields = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


@pytest.mark.slow
def test_resume_after_a_kill_loses_nothing_and_doubles_nothing(scenes, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert run("--input", scenes / "annotations.json", "--out", whole, "--batch-regions", 2) == 0
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "dynrefer_core.batch", "--checkpoint", str(CHECKPOINT), "--input",
           str(scenes / "annotations.json"), "--out", str(out), "--batch-regions", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    cut = np.random.default_rng().integers(2, len(records(whole)) - 2)  # kill at a random point
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < cut):
        time.sleep(0.05)
    workers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.pid]
    assert workers, "the run prepares images in worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone = time.time() + 10  # the workers leave with the killed run
    while time.time() < gone and any(p.exists() and _parent(p) is not None for p in workers):
        time.sleep(0.1)
    assert not any(p.exists() and _parent(p) is not None for p in workers), "a worker outlived the killed run"
    done = out.read_text()
    assert 0 < done.count("\n") < len(records(whole))
    with out.open("a") as f:  # as if the kill had come in the middle of a write
        f.write('{"image": "images/s6061_0000')
    assert subprocess.run(cmd + ["--resume"], env=ENV).returncode == 0
    assert_same(records(out), records(whole))


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_lines(scenes, tmp_path):
    single = tmp_path / "single.jsonl"
    assert run("--input", scenes / "in.jsonl", "--out", single, "--batch-regions", 3) == 0
    out = tmp_path / "multi.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "dynrefer_core.batch", "--checkpoint", str(CHECKPOINT), "--input", str(scenes / "in.jsonl"),
           "--out", str(out), "--batch-regions", "3", "--no-progress", "--coco-results", str(tmp_path / "c.json")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "described 24 regions, 0 failed" in done.stdout
    assert_same(records(out), records(single))
    assert not list(tmp_path.glob("multi.jsonl.part-*")) and json.loads((tmp_path / "c.json").read_text())


@pytest.mark.slow
def test_ray_engine_gives_the_same_lines(scenes, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray Data is the optional [ray] extra")
    local = tmp_path / "local.jsonl"
    assert run("--input", scenes / "in.jsonl", "--out", local) == 0
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1",
                                                                           "TRANSFORMERS_OFFLINE": "1"}})
    try:
        out = tmp_path / "ray.jsonl"
        assert run("--input", scenes / "in.jsonl", "--out", out, "--engine", "ray", "--num-workers", "2") == 0
        assert_same(records(out), records(local))
    finally:
        ray.shutdown()


def test_the_dynrefer_command(capsys):
    assert cli([]) == 0 and "describe" in capsys.readouterr().out
    assert cli(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    assert batch.main is not None
    done = subprocess.run([sys.executable, "-m", "dynrefer_core.cli", "evaluate", "--help"], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--annotations" in done.stdout
