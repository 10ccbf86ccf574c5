"""Two-process DDP training through torchrun on the CPU (gloo backend)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from dynrefer_core.data.annotations import load_annotations
from dynrefer_core.data.generate import generate

PROBES = {"encoder_warmup_steps": 2, "encoder_warmup_context_probe": True, "encoder_probe_weight": 0.5}
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")]


def torchrun(tmp_path, cfg, *command):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *command], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def tiny_config(tmp_path, **train):
    return {"seed": 3, "out_dir": str(tmp_path / "run"),
            "data": {"annotations": str(generate(31, 10, tmp_path / "data"))},
            "model": {"preset": "tiny"},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                      "eval_every": 3, "save_every": 3, "val_regions": 4, "threads": 1, "device": "cpu", **train}}


@pytest.mark.parametrize("probes", [False, True], ids=["method", "warm-up-and-probes"])
def test_torchrun_two_cpu_processes(tmp_path, probes):
    torchrun(tmp_path, tiny_config(tmp_path, **(PROBES if probes else {})),
             "-m", "dynrefer_core.train", "--config", str(tmp_path / "c.yaml"))
    log = (tmp_path / "run" / "train_log.txt").read_text()
    assert "world 2" in log and "3 steps x 4 regions x 2 processes" in log
    assert "step 3/3" in log and "val@3" in log and "done: 3 steps" in log
    assert log.count("step 1/3") == 1  # only rank 0 writes the log
    assert (tmp_path / "run" / "model.safetensors").is_file()
    if probes:  # the warm-up and the probed objective run under DDP too
        assert "encoder warm-up 2/2" in log and " probe " in log.split("step 3/3")[1].split("\n")[0]


def test_ranks_read_disjoint_shards_and_hold_the_same_parameters(tmp_path):
    torchrun(tmp_path, tiny_config(tmp_path, eval_every=0, **PROBES),
             str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path / "c.yaml"), str(tmp_path))
    held = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    regions = {r.id for r in load_annotations(tmp_path / "data" / "annotations.json").split("train").regions}
    for epoch in (0, 1):  # each rank its own half of the training regions, a new split each epoch
        first, second = held[0]["ids"][epoch], held[1]["ids"][epoch]
        assert len(first) == len(second) == len(regions) // 2 and not set(first) & set(second)
        assert set(first) | set(second) <= regions and len(set(first) | set(second)) == len(regions) // 2 * 2
    assert held[0]["ids"][0] != held[0]["ids"][1]

    def differing(a, b):
        assert a.keys() == b.keys()
        return [k for k in a if not torch.equal(a[k], b[k])]

    assert differing(held[0]["start"], held[0]["trained"])  # the main phase trained them
    assert differing(held[0]["trained"], held[1]["trained"]) == []  # with the gradients averaged over the ranks
    assert differing(held[0]["unsynced"], held[1]["unsynced"])  # without the all-reduce the ranks drift apart
