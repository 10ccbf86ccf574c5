"""Train DynRefer on region annotations (spec §5): one command, one YAML file.

    python -m dynrefer_core.train --config configs/mini.yaml [--resume] [--set train.max_steps=100 ...]
    torchrun --nproc_per_node 2 -m dynrefer_core.train --config configs/mini.yaml   # DDP (gloo on CPU)

Loss L = L_caption + 0.01 ASL_sum + 0.5 L_rtc (the model's forward). AdamW with weight decay on >= 2-D
weights only (spec §5.2); the learning rate warms up linearly from `warmup_start_lr` (the release's
warm-up starts at the peak, i.e. does nothing) and then follows a per-step cosine to `min_lr`. Gradients
are clipped; CUDA runs in bf16 autocast. Every `eval_every` steps the val split is evaluated (model
selection never looks at test). `out_dir` holds the model (`save_pretrained`), `trainer_state.pt` for
`--resume`, and `train_log.txt`. A model trained from scratch first warms its encoder up with linear
probes (`scratch_probes`). The config's sections are typed dataclasses (`train_config`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from .data.annotations import RegionAnnotations, load_annotations
from .data.dataset import RegionDataset
from .data.sampling import EpochSampler, endless_batches
from .data.scenes import attribute_lines
from .evaluate import calibrate_tag_threshold, evaluate_model
from .modeling.dynrefer import DynRefer
from .optim import adamw, lr_at
from .runtime import Ranks, init_distributed
from .scratch_probes import Objective, build_objective, probe_classes, warm_up_encoder
from .train_config import DataConfig, TrainConfig, load_config
from .views import ViewOptions

VAL_METRICS = ("recognition_top1", "tag_f1", "CIDEr", "METEOR", "relation_accuracy", "subject_accuracy")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, train_ann: RegionAnnotations) -> DynRefer:
    """A fresh model from the preset, initialised for training from scratch, with a tokenizer and a
    vocabulary built from the training data."""
    from .modeling.tokenization import build_word_tokenizer
    from .vocab import Vocabulary

    config = cfg.model.dynrefer_config()
    default = Vocabulary.default()
    tags = list(train_ann.tag_list) or sorted({t for r in train_ann.regions for t in r.tags})
    vocabulary = Vocabulary(tags=tags, classes=list(train_ann.categories) or default.classes,
                            attributes=attribute_lines(list(train_ann.attributes)) if train_ann.attributes
                            else default.attributes)
    texts = [r.caption for r in train_ann.regions] + vocabulary.words()
    tokenizer = build_word_tokenizer(texts, vocab_size=cfg.model.tokenizer_vocab_size or config.language.vocab_size)
    return DynRefer(config, tokenizer=tokenizer, vocabulary=vocabulary).init_from_scratch()


class Logger:
    """Lines to stdout (through tqdm) and to out_dir/train_log.txt (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        tqdm.write(line)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")


def prepare_data(data: DataConfig, ranks: Ranks) -> Path:
    """The annotation file; generated first (rank 0) when the config says how and it does not exist."""
    if not data.annotations:
        raise ValueError("data.annotations is not set: give the COCO-style annotation file to train on")
    path = Path(data.annotations)
    if not path.exists():
        if data.generate is None:
            raise ValueError(f"data.annotations {path} does not exist and data.generate is not set")
        if ranks.main:
            from .data.generate import generate

            generate(data.generate.seed, data.generate.num_images, path.parent, data.generate.split,
                     data.generate.workers)
    ranks.barrier()
    return path


@dataclass
class Run:
    """A training run between two steps: what `start_run` sets up, `fit` advances and `save_state` writes."""

    cfg: TrainConfig
    ranks: Ranks
    device: torch.device
    out: Path
    log: Logger
    model: DynRefer
    objective: Objective
    net: torch.nn.Module  # objective.module, under DDP with several processes
    optimizer: torch.optim.Optimizer
    data: RegionDataset
    sampler: EpochSampler
    val: RegionAnnotations | None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` trained on


def save_state(run: Run) -> None:
    """The model, `trainer_state.pt` (optimiser, position, RNG states, config, kept probes) for `--resume`,
    and `train_config.yaml`."""
    run.model.save_pretrained(run.out)
    state = {"optimizer": run.optimizer.state_dict(), "step": run.step, "epoch": run.epoch,
             "batch_in_epoch": run.batch_in_epoch, "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), "config": run.cfg.to_dict()}
    if run.objective.saved_probes is not None:
        state["probes"] = run.objective.saved_probes.probe_state()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = run.out / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(run.out / "trainer_state.pt")
    (run.out / "train_config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))


def restore_state(run: Run, state: dict) -> None:
    """Optimiser, position and RNG states from a `trainer_state.pt`."""
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.epoch, run.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def load_model(cfg: TrainConfig, train_ann: RegionAnnotations, ranks: Ranks, resume: bool, log: Logger
               ) -> tuple[DynRefer, dict | None]:
    """The model and trainer state saved in `out_dir` (`resume` and a state there), else a fresh model,
    the same on every rank."""
    out = Path(cfg.out_dir)
    if resume and (out / "trainer_state.pt").exists():
        state = torch.load(out / "trainer_state.pt", map_location="cpu", weights_only=False)
        model = DynRefer.from_pretrained(out, device=ranks.device(cfg.train.device))
        log(f"resumed from {out} at step {state['step']}")
        return model, state
    if resume:
        log(f"--resume: no trainer_state.pt in {out}, starting fresh")
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, train_ann)
    seed_everything(cfg.seed + ranks.rank)
    return model, None


def start_run(cfg: TrainConfig, resume: bool = False) -> Run:
    """Everything a run needs before its first step: processes, data, model (from `out_dir` with `resume`),
    objective and optimiser; a fresh run warms the encoder up here (`train.encoder_warmup_steps`)."""
    loop = cfg.train
    ranks = init_distributed(loop.device)
    if loop.threads:
        torch.set_num_threads(loop.threads)
    device, out = ranks.device(loop.device), Path(cfg.out_dir)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and (out / "trainer_state.pt").exists()):
            (out / "train_log.txt").unlink(missing_ok=True)  # a fresh run gets a fresh log; a resumed one appends
    log = Logger(out / "train_log.txt" if ranks.main else None)
    seed_everything(cfg.seed + ranks.rank)
    annotations = load_annotations(prepare_data(cfg.data, ranks), tag_list=cfg.data.tag_list,
                                   image_root=cfg.data.image_root)
    train_ann = annotations.split(cfg.data.train_split)
    val_ann = annotations.split(cfg.data.val_split) if cfg.data.val_split else None
    model, state = load_model(cfg, train_ann, ranks, resume, log)
    model.place(device, loop.dtype)
    model.train()
    classes = probe_classes(cfg, train_ann)
    data = RegionDataset(train_ann, list(model.vocabulary.tags), image_size=model.config.image_size,
                         views=ViewOptions(strategy="random").resolve(model.config), seed=cfg.seed,
                         class_prompt_ratio=cfg.data.class_prompt_ratio, phash_view_ratio=cfg.data.phash_view_ratio,
                         object_classes=classes)
    sampler = EpochSampler(len(data), cfg.seed, ranks.rank, ranks.world)
    if len(sampler) < loop.batch_size:
        raise ValueError(f"{len(sampler)} training regions per process is less than one batch of {loop.batch_size}")
    # Each training text embedded once, all up front in one order: its embedding then does not depend on
    # which texts it was first batched with, so a resumed run trains on the same bits as an uninterrupted one.
    model.text_encoder.use_cache()
    model.text_encoder.encode(data.region_texts())
    objective = build_objective(cfg, model, state, len(classes or ()))
    run = Run(cfg, ranks, device, out, log, model, objective, objective.module,
              adamw(objective.module, loop.lr, loop), data, sampler, val_ann)
    if state is not None:
        restore_state(run, state)
    elif loop.encoder_warmup_steps > 0:  # before the first checkpoint: an interrupted warm-up restarts with the run
        warm_up_encoder(objective.warmup, data, sampler, cfg, device, log, ranks)
    run.net = ranks.wrap(objective.module, device)
    if ranks.main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"device {device} dtype {model.compute_dtype} world {ranks.world} | {len(train_ann.regions)} train "
            f"regions ({len(train_ann.images)} images), {len(val_ann.regions) if val_ann else 0} val regions | "
            f"{n_train / 1e6:.2f} M trainable parameters | {loop.max_steps} steps x {loop.batch_size} regions x "
            f"{ranks.world} processes")
        log("config " + json.dumps(cfg.to_dict()))
        if loop.encoder_probe_weight > 0:
            log(f"the warm-up probes stay on: loss + {loop.encoder_probe_weight:g} x their tag loss (part 'probe')")
    return run


def validate(run: Run) -> dict[str, float]:
    """Rank 0 evaluates `train.val_regions` val regions and logs them; the others wait. Returns val_<metric>."""
    metrics = {}
    if run.ranks.main:
        result = evaluate_model(run.model, run.val, max_regions=run.cfg.train.val_regions,
                                meteor=run.cfg.train.val_meteor, progress=False)
        values = {name: result.value(name) for name in VAL_METRICS}
        run.log(f"val@{run.step} ({result.num_regions} regions, {result.seconds:.0f}s): "
                + " ".join(f"{k} {v:.4f}" for k, v in values.items() if not math.isnan(v)))
        metrics = {f"val_{k}": v for k, v in values.items()}
        run.model.train()
    run.ranks.barrier()
    return metrics


def fit(run: Run, stop_after: int | None = None) -> dict:
    """Train from `run.step` to `train.max_steps`, or save and return after step `stop_after` as if the run
    were interrupted. Returns the last logged metrics (rank 0)."""
    loop = run.cfg.train
    schedule = dict(lr=loop.lr, min_lr=loop.min_lr, warmup_steps=loop.warmup_steps,
                    warmup_start_lr=loop.warmup_start_lr, max_steps=loop.max_steps)
    bar = tqdm(total=loop.max_steps, initial=run.step, desc="train", unit="step", disable=not run.ranks.main,
               mininterval=1.0 if os.isatty(2) else 60.0)
    last: dict = {}
    sums: dict[str, float] = {}  # loss parts summed since the last log line, and their count "n"
    start = time.perf_counter()
    batches = endless_batches(run.data, run.sampler, loop.batch_size, run.cfg.data.num_workers, run.cfg.seed,
                              epoch=run.epoch, skip=run.batch_in_epoch) if run.step < loop.max_steps else ()
    for epoch, index, batch in batches:
        lr = lr_at(run.step, **schedule)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        output = run.net(**run.objective.inputs(batch.to(run.device)))  # autocast inside (model.place)
        run.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.objective.module.parameters(), loop.grad_clip)
        run.optimizer.step()
        run.step, run.epoch, run.batch_in_epoch = run.step + 1, epoch, index + 1
        parts = {"loss": float(output.loss.detach()), **{k: float(v.detach()) for k, v in output.losses.items()}}
        for name, value in {**parts, "n": 1}.items():
            sums[name] = sums.get(name, 0.0) + value
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()} | {"lr": f"{lr:.2e}"}, refresh=False)
        if run.ranks.main and (run.step % loop.log_every == 0 or run.step == loop.max_steps):
            count = sums.pop("n")
            last = {"step": run.step, **{k: v / count for k, v in sums.items()}}
            sums = {}
            run.log(f"step {run.step}/{loop.max_steps} epoch {epoch} lr {lr:.3e} grad_norm {float(grad_norm):.3f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
                    + f" | {time.perf_counter() - start:.0f}s")
        if run.val is not None and loop.eval_every > 0 and (run.step % loop.eval_every == 0
                                                            or run.step == loop.max_steps):
            last.update(validate(run))
        stop = stop_after is not None and run.step >= stop_after
        if run.step % loop.save_every == 0 or run.step == loop.max_steps or stop:
            if run.ranks.main:
                save_state(run)
            run.ranks.barrier()
        if run.step >= loop.max_steps or stop:
            break
    bar.close()
    return last


def finish(run: Run, seconds: float) -> None:
    """After the last step: choose the tag threshold on val (`train.calibrate_tag_threshold`, rank 0) and
    save it; log the end and leave the process group."""
    loop = run.cfg.train
    if run.ranks.main and loop.calibrate_tag_threshold and run.val is not None and run.step >= loop.max_steps:
        threshold, f1 = calibrate_tag_threshold(run.model, run.val, loop.val_regions * 4)
        run.log(f"tag threshold {run.model.config.tag_threshold} -> {threshold} (val tag F1 {f1:.4f}); "
                "saved in config.json")
        run.model.config.tag_threshold = threshold
        save_state(run)
    if run.ranks.main:
        run.log(f"done: {run.step} steps in {seconds:.0f}s; model in {run.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run the training described by `cfg`; returns the last logged metrics (rank 0).

    `stop_after`: save the state and return after that many steps (as if the run were interrupted).
    """
    run = start_run(cfg, resume)
    start = time.perf_counter()
    last = fit(run, stop_after)
    finish(run, time.perf_counter() - start)
    return last


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file (see configs/mini.yaml)")
    ap.add_argument("--resume", action="store_true", help="continue from out_dir/trainer_state.pt")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config entry, e.g. --set train.max_steps=50 --set out_dir=/tmp/run")
    args = ap.parse_args(argv)
    train(load_config(args.config, args.sets), resume=args.resume)


if __name__ == "__main__":
    main()
