"""Two-process DDP training through torchrun on the CPU (gloo backend)."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
import yaml

from dynrefer_core.data.generate import generate


PROBES = {"encoder_warmup_steps": 2, "encoder_warmup_context_probe": True, "encoder_probe_weight": 0.5}


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("probes", [False, True], ids=["method", "warm-up-and-probes"])
def test_torchrun_two_cpu_processes(tmp_path, probes):
    generate(31, 10, tmp_path / "data")
    cfg = {"seed": 3, "out_dir": str(tmp_path / "run"),
           "data": {"annotations": str(tmp_path / "data" / "annotations.json")},
           "model": {"preset": "tiny"},
           "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                     "eval_every": 3, "save_every": 3, "val_regions": 4, "threads": 1, "device": "cpu",
                     **(PROBES if probes else {})}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "dynrefer_core.train", "--config", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "train_log.txt").read_text()
    assert "world 2" in log and "3 steps x 4 regions x 2 processes" in log
    assert "step 3/3" in log and "val@3" in log and "done: 3 steps" in log
    assert log.count("step 1/3") == 1  # only rank 0 writes the log
    assert (tmp_path / "run" / "model.safetensors").is_file()
    if probes:  # the warm-up and the probed objective run under DDP too
        assert "encoder warm-up 2/2" in log and " probe " in log.split("step 3/3")[1].split("\n")[0]
