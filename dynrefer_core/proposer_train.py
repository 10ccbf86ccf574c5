"""Train the class-agnostic FCOS box proposer (`dynrefer_core.proposer_net`) from scratch on generated scenes.

    python -m dynrefer_core.proposer_train --config configs/proposer.yaml [--set train.max_steps=100 ...]

Every object of the train split is a positive of the one class "object". The benchmark is generated first if
`data.annotations` does not exist. During training the val split picks the checkpoint (recall at IoU 0.5
with `eval.max_proposals` proposals); after it, val picks the score threshold: the highest one that keeps
val recall within `eval.recall_tolerance` of its best, so that captioning spends no time on boxes that do not
help recall. Only then is an unseen seed generated and measured, once, for the report.

`out_dir` gets model.safetensors (fp32), config.json (net shape, postprocess, how it was trained),
train_log.jsonl and eval.json; `dynrefer_core.proposals.TrainedProposer` loads it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .data.annotations import RegionAnnotations, load_annotations
from .data.generate import generate
from .proposals import box_recall, postprocess
from .proposer_net import ProposerNetConfig, build_net, image_tensor
from .train_config import GenerateConfig, _check_types, load_typed_config
from .views.imageio import load_image

SIZE_EDGES = (24.0, 52.0)  # box side (max of w, h) below which an object counts as tiny, then small


@dataclass
class ProposerDataConfig:
    annotations: str = "data/proposer/annotations.json"
    generate: GenerateConfig | None = None  # how to make `annotations` when it does not exist
    train_split: str = "train"
    val_split: str = "val"
    val_images: int = 300  # the first N val images (0: all) for checkpoint and threshold choice
    unseen_annotations: str | None = None  # measured once after all choices (None: skipped)
    unseen_generate: GenerateConfig | None = None

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class ProposerLoopConfig:
    max_steps: int = 3000
    batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-5
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    threads: int | None = 2
    log_every: int = 25
    eval_every: int = 500  # 0: only after the last step
    max_minutes: float = 0.0  # > 0: a wall-clock budget for the training loop; the schedule follows it (see _lr)
    augment: bool = True  # random flips and transposes: the scenes have no up, left or orientation

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class ProposerEvalConfig:
    max_proposals: int = 30
    iou: float = 0.5
    nms_iou: float = 0.5
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    recall_tolerance: float = 0.002

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class ProposerTrainConfig:
    seed: int = 0
    out_dir: str = "checkpoints/proposer"
    data: ProposerDataConfig = field(default_factory=ProposerDataConfig)
    net: dict[str, Any] = field(default_factory=dict)  # `ProposerNetConfig` fields; missing ones keep defaults
    train: ProposerLoopConfig = field(default_factory=ProposerLoopConfig)
    eval: ProposerEvalConfig = field(default_factory=ProposerEvalConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        ProposerNetConfig.from_dict(self.net)  # refuse unknown net keys when the run starts

    def net_config(self) -> ProposerNetConfig:
        return ProposerNetConfig.from_dict(self.net)


def load_proposer_config(path: str | Path | None, sets: Sequence[str] = ()) -> ProposerTrainConfig:
    """The YAML file (None: defaults), then `--set a.b=value` overrides parsed as YAML; unknown keys refused."""
    return load_typed_config(ProposerTrainConfig, path, sets)


# ------------------------------------------------------------------------------------------------- data


def _annotations(path: str, gen: GenerateConfig | None) -> RegionAnnotations:
    if not Path(path).is_file():
        if gen is None:
            raise ValueError(f"{path} does not exist and the config has no generate section to make it")
        generate(gen.seed, gen.num_images, Path(path).parent, gen.split, gen.workers)
    return load_annotations(path)


def _samples(ann: RegionAnnotations, limit: int = 0) -> list[tuple[Path, torch.Tensor]]:
    """(image path, boxes (M, 4)) per image, in image id order."""
    regions = ann.by_image()
    ids = sorted(ann.images)[: limit or None]
    return [(ann.images[i].path, torch.tensor([r.box for r in regions.get(i, [])], dtype=torch.float32).reshape(-1, 4))
            for i in ids]


def _augment(img: torch.Tensor, boxes: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """A random flip / transpose of a (3, H, W) image and its boxes."""
    boxes = boxes.clone()
    if rng.random() < 0.5:  # transpose (with the flips: all 8 symmetries of the square)
        img, boxes = img.transpose(1, 2), boxes[:, [1, 0, 3, 2]]
    h, w = img.shape[1:]
    if rng.random() < 0.5:
        img, boxes = img.flip(2), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    if rng.random() < 0.5:
        img, boxes = img.flip(1), torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)
    return img.contiguous(), boxes


# ------------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def raw_outputs(net: torch.nn.Module, samples: list[tuple[Path, torch.Tensor]], batch_size: int = 8) -> list[dict]:
    """The net's boxes and scores (before the proposer's clean-up) for every sample image."""
    was_training = net.training
    net.eval()
    out: list[dict] = []
    for i in range(0, len(samples), batch_size):
        out += net([image_tensor(load_image(p)) for p, _ in samples[i:i + batch_size]])
    net.train(was_training)
    return out


def recall_table(raw: list[dict], samples: list[tuple[Path, torch.Tensor]], cfg: ProposerEvalConfig,
                 thresholds: Sequence[float], size: tuple[int, int]) -> dict[str, Any]:
    """Recall at `cfg.iou` with <= `cfg.max_proposals` per score threshold, and by object size at the first."""
    truths = [b for _, b in samples]
    table: dict[str, Any] = {"images": len(samples), "objects": sum(len(b) for b in truths), "recall": {},
                             "mean_proposals": {}}
    kept_by_thr = {}
    for thr in thresholds:
        kept = [postprocess(o["boxes"], o["scores"], size=size, nms_iou=cfg.nms_iou, score_threshold=thr,
                            max_proposals=cfg.max_proposals).boxes for o in raw]
        kept_by_thr[thr] = kept
        table["recall"][f"{thr:g}"] = box_recall(kept, truths, iou=cfg.iou, max_proposals=cfg.max_proposals)
        table["mean_proposals"][f"{thr:g}"] = sum(len(k) for k in kept) / max(len(kept), 1)
    first = kept_by_thr[thresholds[0]]
    by_size = {}
    for name, lo, hi in (("tiny", 0, SIZE_EDGES[0]), ("small", *SIZE_EDGES), ("large", SIZE_EDGES[1], math.inf)):
        sides = [torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for b in truths]
        sel = [b[(s >= lo) & (s < hi)] for b, s in zip(truths, sides)]
        if sum(len(s) for s in sel):
            by_size[name] = box_recall(first, sel, iou=cfg.iou, max_proposals=cfg.max_proposals)
    table[f"recall_by_size_at_{thresholds[0]:g}"] = by_size
    return table


def choose_threshold(recalls: dict[str, float], tolerance: float) -> float:
    """The highest threshold whose recall is within `tolerance` of the best one."""
    best = max(recalls.values())
    return max(float(t) for t, r in recalls.items() if r >= best - tolerance)


# ------------------------------------------------------------------------------------------------ train


def _progress(step: int, minutes: float, cfg: ProposerLoopConfig) -> float:
    """How far the run is, in [0, 1]: steps done or wall time used, whichever is further along.

    Why time: the CPU is shared, so a step takes 2-8 s depending on the neighbours; a cosine over wall time
    still ends at min_lr when the budget does, instead of being cut off at a high learning rate."""
    p = step / cfg.max_steps
    return max(p, minutes / cfg.max_minutes) if cfg.max_minutes > 0 else p


def _lr(step: int, progress: float, cfg: ProposerLoopConfig) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine from lr to min_lr over the run's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _save(net: torch.nn.Module, out: Path, cfg: ProposerTrainConfig, post: dict, trained: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"kind": "fcos-proposer", "net": cfg.net_config().to_dict(), "postprocess": post,
              "trained": trained, "train_config": dataclasses.asdict(cfg)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def train(cfg: ProposerTrainConfig) -> dict[str, Any]:
    """Train, choose the checkpoint and threshold on val, save `cfg.out_dir`; returns the eval JSON's content."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ann = _annotations(cfg.data.annotations, cfg.data.generate)
    train_set = _samples(ann.split(cfg.data.train_split))
    val_set = _samples(ann.split(cfg.data.val_split), cfg.data.val_images)
    size = (cfg.net_config().image_size, cfg.net_config().image_size)
    net = build_net(cfg.net_config())
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("w", encoding="utf-8")
    post = {"score_threshold": 0.0, "nms_iou": cfg.eval.nms_iou, "max_proposals": cfg.eval.max_proposals}
    best: dict[str, Any] = {"recall": -1.0, "step": 0}
    order: list[int] = []
    sums: dict[str, float] = {}
    steps_done = 0
    net.train()

    def evaluate_now(step: int) -> None:
        rec = recall_table(raw_outputs(net, val_set), val_set, cfg.eval, [0.0], size)["recall"]["0"]
        row = {"step": step, "val_recall": round(rec, 4), "minutes": round((time.time() - start) / 60, 2)}
        log.write(json.dumps(row) + "\n"), log.flush()
        print(row, flush=True)
        if rec >= best["recall"]:  # ties: the later (more trained) one
            best.update(recall=rec, step=step, state={k: v.clone() for k, v in net.state_dict().items()})
            _save(net, out, cfg, post, {"steps": step, "partial": True})

    for step in range(cfg.train.max_steps):
        progress = _progress(step, (time.time() - start) / 60, cfg.train)
        if progress >= 1.0:
            print(f"stopping at step {step}: max_minutes {cfg.train.max_minutes} reached", flush=True)
            break
        if len(order) < cfg.train.batch_size:
            order += rng.sample(range(len(train_set)), len(train_set))
        idx, order = order[:cfg.train.batch_size], order[cfg.train.batch_size:]
        images, targets = [], []
        for i in idx:
            path, boxes = train_set[i]
            img = image_tensor(load_image(path))
            if cfg.train.augment:
                img, boxes = _augment(img, boxes, rng)
            images.append(img)
            targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)})
        for g in opt.param_groups:
            g["lr"] = _lr(step, progress, cfg.train)
        losses = net(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        opt.step()
        steps_done = step + 1
        for k, v in {"loss": loss, **losses}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if (step + 1) % cfg.train.log_every == 0:
            row = {"step": step + 1, **{k: round(v / cfg.train.log_every, 4) for k, v in sums.items()},
                   "lr": round(opt.param_groups[0]["lr"], 6), "minutes": round((time.time() - start) / 60, 2)}
            log.write(json.dumps(row) + "\n"), log.flush()
            print(row, flush=True)
            sums = {}
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            evaluate_now(step + 1)
    if best["step"] != steps_done or "state" not in best:
        evaluate_now(steps_done)
    train_minutes = (time.time() - start) / 60
    net.load_state_dict(best["state"])
    val = recall_table(raw_outputs(net, val_set), val_set, cfg.eval, cfg.eval.thresholds, size)
    post["score_threshold"] = choose_threshold(val["recall"], cfg.eval.recall_tolerance)
    report: dict[str, Any] = {
        "metric": f"recall at IoU {cfg.eval.iou:g} with <= {cfg.eval.max_proposals} proposals per image "
                  f"(NMS {cfg.eval.nms_iou:g}) over all objects",
        "chosen": {"step": best["step"], "score_threshold": post["score_threshold"]},
        "val": val, "val_recall_at_chosen": val["recall"][f"{post['score_threshold']:g}"],
    }
    if cfg.data.unseen_annotations:
        unseen_ann = _annotations(cfg.data.unseen_annotations, cfg.data.unseen_generate)
        unseen = _samples(unseen_ann)
        thr = [post["score_threshold"]] + ([0.0] if post["score_threshold"] else [])
        report["unseen"] = {"annotations": cfg.data.unseen_annotations,
                            "seed": unseen_ann.info.get("seed"),
                            **recall_table(raw_outputs(net, unseen), unseen, cfg.eval, thr, size)}
        report["unseen_recall_at_chosen"] = report["unseen"]["recall"][f"{post['score_threshold']:g}"]
    trained = {"steps": steps_done, "best_step": best["step"], "train_minutes": round(train_minutes, 2),
               "train_images": len(train_set), "threads": cfg.train.threads}
    _save(net, out, cfg, post, trained)
    report["trained"] = trained
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.close()
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (configs/proposer.yaml); omitted: the defaults")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    args = ap.parse_args(argv)
    report = train(load_proposer_config(args.config, args.set))
    print(json.dumps({k: report[k] for k in report if k.endswith("at_chosen") or k in ("chosen", "trained")}))


if __name__ == "__main__":
    main()
