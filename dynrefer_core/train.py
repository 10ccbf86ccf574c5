"""Train DynRefer on region annotations (spec §5): one command, one YAML file.

    python -m dynrefer_core.train --config configs/mini.yaml [--resume] [--set train.max_steps=100 ...]
    torchrun --nproc_per_node 2 -m dynrefer_core.train --config configs/mini.yaml   # DDP (gloo on CPU)

Loss L = L_caption + 0.01 ASL_sum + 0.5 L_rtc (the model's forward). AdamW with weight decay on >= 2-D
weights only (spec §5.2); the learning rate warms up linearly from `warmup_start_lr` (the release's
warm-up starts at the peak, i.e. does nothing) and then follows a per-step cosine to `min_lr`. Gradients
are clipped; CUDA runs in bf16 autocast. Every `eval_every` steps the val split is evaluated (model
selection never looks at test). `out_dir` holds the model (`save_pretrained`), `trainer_state.pt` for
`--resume`, and `train_log.txt`.
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
from torch.utils.data import DataLoader, Sampler
from torchvision.ops import roi_align
from tqdm import tqdm

from .data.annotations import RegionAnnotations, load_annotations
from .data.dataset import RegionDataset, collate_regions
from .data.scenes import attribute_lines
from .evaluate import calibrate_tag_threshold, evaluate_model
from .modeling.losses import asymmetric_loss
from .runtime import choose_device, choose_dtype
from .train_config import TrainConfig, load_config  # noqa: F401  (load_config: the trainer's entry for configs)
from .views import ViewOptions

# ------------------------------------------------------------------------------------------ schedule


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, warmup_start_lr: float,
          max_steps: int) -> float:
    """Linear warm-up from warmup_start_lr to lr over warmup_steps, then cosine from lr to min_lr."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Spec §5.2: decay on >= 2-D weights; none on biases, 1-D parameters and names with "ln"/"bn"."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "ln" in name or "bn" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------ sampling


class EpochSampler(Sampler[int]):
    """Seeded permutation per epoch, split over ranks, able to skip the batches a resumed run already saw."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world  # drop the tail so every rank takes the same number of steps
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return self.n // self.world - self.skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: TrainConfig, train_ann: RegionAnnotations):
    """A fresh model from the preset, with a tokenizer and vocabulary built from the training data."""
    from .config import DynReferConfig
    from .modeling.dynrefer import DynRefer
    from .modeling.tokenization import build_word_tokenizer
    from .vocab import Vocabulary

    config = cfg.model.dynrefer_config()
    default = Vocabulary.default()
    tags = list(train_ann.tag_list) or sorted({t for r in train_ann.regions for t in r.tags})
    vocabulary = Vocabulary(tags=tags, classes=list(train_ann.categories) or default.classes,
                            attributes=attribute_lines(list(train_ann.attributes)) if train_ann.attributes
                            else default.attributes)
    texts = [r.caption for r in train_ann.regions] + vocabulary.words()
    vocab_size = cfg.model.tokenizer_vocab_size or config.language.vocab_size
    tokenizer = build_word_tokenizer(texts, vocab_size=vocab_size)
    return DynRefer(config, tokenizer=tokenizer, vocabulary=vocabulary).init_from_scratch()


def epoch_batches(ds: RegionDataset, sampler: "EpochSampler", epoch: int, batch_size: int, num_workers: int,
                  seed: int, skip: int = 0) -> DataLoader:
    """One epoch of training batches, views and order seeded by (seed, epoch), minus `skip` regions already seen."""
    sampler.set_epoch(epoch, skip=skip)
    ds.set_epoch(epoch)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_regions, drop_last=True,
                      num_workers=num_workers, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed * 7919 + epoch))  # leaves the global RNG alone


class EncoderWarmup(torch.nn.Module):
    """Encoder warm-up for training from scratch: the tag loss on a linear probe of z.

    The release starts from a pretrained ViT and Q-Former, so z already carries shape when its decoders
    begin. From scratch, the decoders (cross-attention heads with a shared output layer; a T5 reading z by
    attention) pass almost no gradient for features that z does not yet have, and shape never appears
    (measured on DynRefer-mini: category at chance after 3600 steps). A few hundred steps with a linear
    probe give z those features; the probes are then dropped and the method's losses take over. The probe
    reads all query tokens (flattened), so that each can specialise as the decoders' cross-attention lets
    them (DynRefer-mini, 600 steps: category 0.91 from flattened z, 0.63 from mean(z)).

    `context_probe`: a second linear probe, on the mean of the context views' RoI maps X_k (k >= 1) before
    alignment, trained with the same tags. A relation and its neighbour lie outside the box, so they reach the
    RoI maps only if the ViT writes them there; through z that signal arrives too weakly to learn
    (DynRefer-mini, 800 steps: neighbour colour 0.18 from z, 0.53 from this probe; at 600 steps 0.43, but 0.36
    when the probe reads the G x G grid flattened instead of its mean, which favours the region itself).

    `object_classes` > 0 (with `object_weight`): a third probe, on the context views' whole ViT token maps
    RoI-aligned (2 x 2) at every other annotated object inside the view (`RegionBatch.context_objects`), trained
    with cross-entropy on that object's category. The neighbour a relation names lies in those views, but
    the ViT learns to recognise shapes only where the region is: in DynRefer-mini trained without this probe,
    the neighbour's category read at its own box in the context views was 0.28, the region's at its box 0.57
    (bench/probe_encoder.py). With it the caption's neighbour-category word rose from chance to 0.31.
    """

    def __init__(self, model, n_tags: int, context_probe: bool = False, object_classes: int = 0,
                 object_weight: float = 1.0) -> None:
        super().__init__()
        c = model.config
        self.model = model
        self.probe = torch.nn.Linear(c.num_query_tokens * c.qformer_hidden, n_tags)
        self.context_probe = torch.nn.Linear(c.vision_width, n_tags) if context_probe else None
        self.object_probe = torch.nn.Linear(4 * c.vision_width, object_classes) if object_classes > 0 else None
        self.object_weight = object_weight

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor, tag_targets: torch.Tensor,
                context_objects: torch.Tensor | None = None, **_other_inputs) -> torch.Tensor:
        z, rois, grid = self.encode(pixel_values, boxes)
        return self.probe_loss(z, rois, tag_targets, grid, context_objects)

    def encode(self, pixel_values: torch.Tensor, boxes: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """z (N, Q, D), the RoI maps of every view (N, n, C, G, G), which the context probe reads, and the views'
        token maps (N, n, C, G, G) if the object probe reads them (else None)."""
        with self.model.autocast():
            cls, rois, *grid = self.model.embed_views(pixel_values, boxes, return_grid=self.object_probe is not None)
            return self.model.fuse_views(cls, rois), rois, (grid[0] if grid else None)

    def probe_loss(self, z: torch.Tensor, rois: torch.Tensor, tag_targets: torch.Tensor,
                   grid: torch.Tensor | None = None, context_objects: torch.Tensor | None = None) -> torch.Tensor:
        """Tag loss of the probes on z (N, Q, D) and on the context RoI maps rois[:, 1:] (N, n, C, G, G), plus
        `object_weight` x the object probe's cross-entropy on the token maps `grid` at `context_objects`."""
        c = self.model.config
        targets = tag_targets.to(self.probe.weight.device)
        loss = asymmetric_loss(self.probe(z.float().flatten(1)), targets, gamma_neg=c.tag_gamma_neg)
        if self.context_probe is not None and rois.shape[1] > 1:
            context = rois[:, 1:].float().mean(dim=(1, 3, 4))
            loss = loss + asymmetric_loss(self.context_probe(context), targets, gamma_neg=c.tag_gamma_neg)
        loss = loss * c.tag_loss_weight
        if self.object_probe is not None:
            if grid is None or context_objects is None:
                raise ValueError("the object probe needs the views' token maps and the batch's context_objects "
                                 "(RegionDataset(object_classes=...))")
            if len(context_objects):
                loss = loss + self.object_weight * self.object_loss(grid, context_objects)
        return loss

    def object_loss(self, grid: torch.Tensor, context_objects: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the object probe: token maps (N, n, C, G, G), objects (K, 7) as in `RegionBatch`."""
        n_views = grid.shape[1]
        objects = context_objects.to(grid.device, torch.float32)
        index = objects[:, 0] * n_views + objects[:, 1]  # the (sample, view) map in the flattened batch
        region_roi = self.model.vision.roi_align  # its scale and sampling, at a 2 x 2 output
        maps = roi_align(grid.flatten(0, 1).float(), torch.cat([index[:, None], objects[:, 2:6]], 1), output_size=2,
                         spatial_scale=region_roi.spatial_scale, sampling_ratio=region_roi.sampling_ratio,
                         aligned=region_roi.aligned)
        return torch.nn.functional.cross_entropy(self.object_probe(maps.flatten(1)), objects[:, 6].long())

    def probe_state(self) -> dict:
        """The probes' weights alone (the model is saved on its own), for `--resume`."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_probe_state(self, state: dict) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("model.")]:
            raise ValueError(f"probe state does not fit: missing {missing}, unexpected {unexpected}")


class ProbedObjective(torch.nn.Module):
    """The method's losses plus `weight` x the warm-up probes' loss (`train.encoder_probe_weight`).

    Without it, once the warm-up ends the encoder learns only what the decoders ask for, and from scratch they
    do not ask for what z does not yet carry: in DynRefer-mini the context maps held the relation (linear
    probe 0.51) but z did not (0.30), and the caption's relation word stayed at chance through 2000 steps
    (val 0.24). With the probes on it reached 0.75 in 1800 steps at weight 0.3, 0.80 at weight 1. Returns the
    model's `DynReferOutput` with a "probe" part.
    """

    def __init__(self, warmup: EncoderWarmup, weight: float) -> None:
        super().__init__()
        self.warmup = warmup
        self.weight = weight

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor, captions, tag_targets: torch.Tensor,
                rtc_texts=None, context_objects: torch.Tensor | None = None):
        model = self.warmup.model
        model.check_training_targets(pixel_values.shape[0], captions, tag_targets)
        controls = model.sample_controls(tag_targets, captions)  # before the encoder, as in DynRefer.forward
        z, rois, grid = self.warmup.encode(pixel_values, boxes)
        out = model.region_losses(z, captions, tag_targets, controls, rtc_texts=rtc_texts)
        probe = self.warmup.probe_loss(z, rois, tag_targets, grid, context_objects)
        out.losses["probe"] = probe.float() * self.weight
        out.loss = sum(out.losses.values())
        return out


def warm_up_encoder(warm: EncoderWarmup, ds: RegionDataset, sampler: "EpochSampler", cfg: TrainConfig, dd: "Dist",
                    device: torch.device, log) -> None:
    """`train.encoder_warmup_steps` steps of `warm` (an `EncoderWarmup`) at the constant `train.encoder_warmup_lr`."""
    t, d = cfg.train, cfg.data
    steps, bs = t.encoder_warmup_steps, t.batch_size
    net = warm
    if dd.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            warm, device_ids=[dd.local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(param_groups(warm, t.weight_decay), lr=t.encoder_warmup_lr, betas=tuple(t.betas))
    if dd.main:
        probes = "z and one on the mean context RoI map" if warm.context_probe is not None else "z"
        if warm.object_probe is not None:
            probes += (f", plus {warm.object_weight:g} x cross-entropy of an object probe on the other objects in "
                       "the context views")
        log(f"encoder warm-up: {steps} steps at lr {t.encoder_warmup_lr:g}, tag loss on a linear probe of "
            f"{probes}, then the method's losses")
    step, epoch, running, count = 0, 0, 0.0, 0
    while step < steps:
        # Epochs 10000+: its own data order, so the main phase's epochs are the same with or without it.
        for batch in epoch_batches(ds, sampler, 10_000 + epoch, bs, d.num_workers, cfg.seed):
            batch = batch.to(device)
            loss = net(**batch.model_inputs(), context_objects=batch.context_objects)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(warm.parameters(), t.grad_clip)
            optimizer.step()
            step += 1
            running, count = running + float(loss.detach()), count + 1
            if dd.main and (step % t.log_every == 0 or step == steps):
                log(f"encoder warm-up {step}/{steps} probe loss {running / count:.4f}")
                running, count = 0.0, 0
            if step >= steps:
                break
        epoch += 1


# ------------------------------------------------------------------------------------------ training


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_hint: str | None) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() and device_hint != "cpu" else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    return d


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


def prepare_data(cfg: TrainConfig, main: bool) -> Path:
    """The annotation file; generated first (rank 0) when the config says how and it does not exist."""
    d = cfg.data
    if not d.annotations:
        raise ValueError("data.annotations is not set: give the COCO-style annotation file to train on")
    path = Path(d.annotations)
    if not path.exists():
        gen = d.generate
        if gen is None:
            raise ValueError(f"data.annotations {path} does not exist and data.generate is not set")
        if main:
            from .data.generate import generate

            generate(gen.seed, gen.num_images, path.parent, gen.split, gen.workers)
    if dist.is_initialized():
        dist.barrier()
    return path


def save_state(out: Path, model, optimizer, step: int, epoch: int, batch_in_epoch: int, cfg: dict,
               probes: EncoderWarmup | None = None) -> None:
    model.save_pretrained(out)
    state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
             "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
             "config": cfg.to_dict()}
    if probes is not None:
        state["probes"] = probes.probe_state()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = out / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "trainer_state.pt")
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run the training described by `cfg`; returns the last logged metrics (rank 0).

    `stop_after`: save the state and return after that many steps (as if the run were interrupted).
    """
    from .modeling.dynrefer import DynRefer

    t = cfg.train
    dd = init_distributed(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = choose_device(t.device if dd.world == 1 or t.device == "cpu" else
                           (f"cuda:{dd.local_rank}" if torch.cuda.is_available() else "cpu"))
    dtype = choose_dtype(device, t.dtype)
    out = Path(cfg.out_dir)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    if dd.main and not (resume and (out / "trainer_state.pt").exists()):
        (out / "train_log.txt").unlink(missing_ok=True)  # a fresh run gets a fresh log; a resumed one appends
    log = Logger(out / "train_log.txt" if dd.main else None)
    seed = cfg.seed
    seed_everything(seed + dd.rank)

    ann_path = prepare_data(cfg, dd.main)
    d = cfg.data
    ann = load_annotations(ann_path, tag_list=d.tag_list, image_root=d.image_root)
    train_ann = ann.split(d.train_split)
    val_ann = ann.split(d.val_split) if d.val_split else None

    state = None
    if resume and (out / "trainer_state.pt").exists():
        state = torch.load(out / "trainer_state.pt", map_location="cpu", weights_only=False)
        model = DynRefer.from_pretrained(out, device=device)
        log(f"resumed from {out} at step {state['step']}")
    else:
        if resume:
            log(f"--resume: no trainer_state.pt in {out}, starting fresh")
        seed_everything(seed)  # identical initial weights on every rank
        model = build_model(cfg, train_ann)
        seed_everything(seed + dd.rank)
    model.place(device, dtype)
    model.text_encoder.use_cache()
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = list(model.vocabulary.tags)
    object_weight = t.encoder_object_probe_weight
    object_classes = list(train_ann.categories) if object_weight > 0 else None
    if object_classes is not None and not object_classes:
        raise ValueError("train.encoder_object_probe_weight > 0 needs region categories in the annotations "
                         f"({d.annotations} has none): set it to 0")
    ds = RegionDataset(train_ann, vocab, image_size=model.config.image_size,
                       views=ViewOptions(strategy="random").resolve(model.config), seed=seed, class_prompt_ratio=d.class_prompt_ratio,
                       phash_view_ratio=d.phash_view_ratio, object_classes=object_classes)
    bs = t.batch_size
    sampler = EpochSampler(len(ds), seed, dd.rank, dd.world)
    steps_per_epoch = len(sampler) // bs
    if steps_per_epoch == 0:
        raise ValueError(f"{len(sampler)} training regions per process is less than one batch of {bs}")

    warm, objective, saved_probes = None, model, None
    probe_weight = t.encoder_probe_weight
    if (state is None and t.encoder_warmup_steps > 0) or probe_weight > 0:
        warm = EncoderWarmup(model, len(vocab), t.encoder_warmup_context_probe,
                             len(object_classes or []), object_weight).to(device)
    if object_weight > 0 and warm is None:
        raise ValueError("train.encoder_object_probe_weight > 0 is a probe of the encoder warm-up: it needs "
                         "train.encoder_warmup_steps > 0 or train.encoder_probe_weight > 0")
    if probe_weight > 0:
        objective, saved_probes = ProbedObjective(warm, probe_weight), warm
        if state is not None:
            if "probes" not in state:
                raise ValueError(f"{out / 'trainer_state.pt'} holds no probe weights: it was saved by a run without "
                                 "train.encoder_probe_weight; resume it with the same config")
            warm.load_probe_state(state["probes"])
    optimizer = torch.optim.AdamW(param_groups(objective, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state is None and t.encoder_warmup_steps > 0:
        # Before the first checkpoint: an interrupted warm-up simply restarts with the run.
        warm_up_encoder(warm, ds, sampler, cfg, dd, device, log)
    ddp = objective
    if dd.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[dd.local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    max_steps = t.max_steps
    sched = dict(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, warmup_start_lr=t.warmup_start_lr,
                 max_steps=max_steps)
    if dd.main:
        log(f"device {device} dtype {dtype} world {dd.world} | {len(train_ann.regions)} train regions "
            f"({len(train_ann.images)} images), {len(val_ann.regions) if val_ann else 0} val regions | "
            f"{n_train / 1e6:.2f} M trainable parameters | {max_steps} steps x {bs} regions x {dd.world} processes")
        log("config " + json.dumps(cfg.to_dict()))
        if probe_weight > 0:
            log(f"the warm-up probes stay on: loss + {probe_weight:g} x their tag loss (part 'probe')")
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", disable=not dd.main,
               mininterval=1.0 if os.isatty(2) else 60.0)
    last: dict = {}
    running: dict[str, float] = {}
    t0 = time.perf_counter()
    while step < max_steps:
        for batch in epoch_batches(ds, sampler, epoch, bs, d.num_workers, seed, skip=batch_in_epoch * bs):
            lr = lr_at(step, **sched)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = batch.to(device)
            inputs = batch.model_inputs()
            if objective is not model:  # the probes' objective also takes the other objects in the views
                inputs["context_objects"] = batch.context_objects
            output = ddp(**inputs)  # bf16 autocast inside on CUDA (model.place)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(objective.parameters(), t.grad_clip)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            parts = {"loss": float(output.loss.detach()), **{k: float(v.detach()) for k, v in output.losses.items()}}
            for k, v in parts.items():
                running[k] = running.get(k, 0.0) + v
            running["n"] = running.get("n", 0) + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()} | {"lr": f"{lr:.2e}"}, refresh=False)
            if dd.main and (step % t.log_every == 0 or step == max_steps):
                n = running.pop("n")
                avg = {k: v / n for k, v in running.items()}
                running = {}
                el = time.perf_counter() - t0
                log(f"step {step}/{max_steps} epoch {epoch} lr {lr:.3e} grad_norm {float(gnorm):.3f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in avg.items()) + f" | {el:.0f}s")
                last = {"step": step, **avg}
            if val_ann is not None and t.eval_every > 0 and (step % t.eval_every == 0 or step == max_steps):
                if dd.main:
                    res = evaluate_model(model, val_ann, max_regions=t.val_regions, meteor=t.val_meteor,
                                         progress=False)
                    vals = {k: res.value(k) for k in ("recognition_top1", "tag_f1", "CIDEr", "METEOR",
                                                      "relation_accuracy", "subject_accuracy")}
                    log(f"val@{step} ({res.num_regions} regions, {res.seconds:.0f}s): "
                        + " ".join(f"{k} {v:.4f}" for k, v in vals.items() if not math.isnan(v)))
                    last.update({f"val_{k}": v for k, v in vals.items()})
                    model.train()
                if dist.is_initialized():
                    dist.barrier()
            stop = stop_after is not None and step >= stop_after
            if step % t.save_every == 0 or step == max_steps or stop:
                if dd.main:
                    save_state(out, model, optimizer, step, epoch, batch_in_epoch, cfg, saved_probes)
                if dist.is_initialized():
                    dist.barrier()
            if step >= max_steps or stop:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            continue
        break
    bar.close()
    if dd.main and t.calibrate_tag_threshold and val_ann is not None and step >= max_steps:
        thr, f1 = calibrate_tag_threshold(model, val_ann, t.val_regions * 4)
        log(f"tag threshold {model.config.tag_threshold} -> {thr} (val tag F1 {f1:.4f}); saved in config.json")
        model.config.tag_threshold = thr
        save_state(out, model, optimizer, step, epoch, batch_in_epoch, cfg, saved_probes)
    if dd.main:
        log(f"done: {step} steps in {time.perf_counter() - t0:.0f}s; model in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
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
