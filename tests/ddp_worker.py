"""Run by tests/test_train_ddp.py under torchrun: a short run through the trainer's own pieces, then each rank
writes what it holds, so the test can compare the ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py CONFIG OUT

OUT/rank<r>.pt: "ids" (the region ids the rank's sampler gives in epochs 0 and 1), "start" (the objective's
parameters before the main phase), "trained" (after it) and "unsynced" (after two more steps taken with
DDP's gradient all-reduce switched off, the control that shows the comparison can fail).
"""
import contextlib
import sys
from pathlib import Path

import torch

from dynrefer_core import train as T


def parameters(run):
    return {k: v.detach().clone() for k, v in run.objective.module.state_dict().items()}


run = T.start_run(T.load_config(sys.argv[1]))
held = {"start": parameters(run)}
T.fit(run)
held["trained"] = parameters(run)
held["ids"] = {}
for epoch in (0, 1):
    run.sampler.set_epoch(epoch)
    held["ids"][epoch] = [run.data.regions[i].id for i in run.sampler]
run.cfg.train.max_steps += 2
with getattr(run.net, "no_sync", contextlib.nullcontext)():  # (a net without DDP has no all-reduce to skip)
    T.fit(run)
held["unsynced"] = parameters(run)
torch.save(held, Path(sys.argv[2]) / f"rank{run.ranks.rank}.pt")
T.finish(run, 0.0)
