"""The from-scratch probes: linear probes that teach the encoder what its decoders cannot ask for yet.

The release fine-tunes a pretrained ViT and Q-Former; a model trained from scratch (DynRefer-mini) first
trains its encoder with these probes (`train.encoder_warmup_steps`), and may keep them on beside the
method's losses (`train.encoder_probe_weight`). `build_objective` gives the trainer what to optimise;
docs/training-from-scratch.md holds the measurements behind each probe.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.ops import roi_align

from .data.annotations import RegionAnnotations
from .data.dataset import RegionBatch, RegionDataset
from .data.sampling import EpochSampler, endless_batches
from .modeling.dynrefer import DynRefer
from .modeling.losses import asymmetric_loss
from .optim import adamw
from .runtime import Ranks
from .train_config import TrainConfig

WARMUP_EPOCHS = 10_000  # the warm-up reads epochs 10000+, so the main phase's epochs are the same with or without it


class EncoderWarmup(torch.nn.Module):
    """Linear probes on the encoder, only for training from scratch: the loss is the tag loss of a probe on
    z (N, Q, D), all query tokens flattened, [+ the tag loss of `context_probe` on the mean of the context
    views' RoI maps X_k, k >= 1] [+ `object_weight` x the cross-entropy of `object_probe` on the category of
    every other object inside the context views, read from the views' token maps RoI-aligned 2 x 2 at its box].

    Why: from scratch the decoders pass almost no gradient for features z does not have yet, so shape and the
    neighbour outside the box never reach z; the release starts from a pretrained encoder and needs none of
    this (measurements: docs/training-from-scratch.md#encoder-warm-up). The probes are not part of the model.
    """

    def __init__(self, model: DynRefer, n_tags: int, context_probe: bool = False, object_classes: int = 0,
                 object_weight: float = 1.0) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.probe = torch.nn.Linear(config.num_query_tokens * config.qformer_hidden, n_tags)
        self.context_probe = torch.nn.Linear(config.vision_width, n_tags) if context_probe else None
        self.object_probe = torch.nn.Linear(4 * config.vision_width, object_classes) if object_classes > 0 else None
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
        config = self.model.config
        targets = tag_targets.to(self.probe.weight.device)
        loss = asymmetric_loss(self.probe(z.float().flatten(1)), targets, gamma_neg=config.tag_gamma_neg)
        if self.context_probe is not None and rois.shape[1] > 1:
            context = rois[:, 1:].float().mean(dim=(1, 3, 4))
            loss = loss + asymmetric_loss(self.context_probe(context), targets, gamma_neg=config.tag_gamma_neg)
        loss = loss * config.tag_loss_weight
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
    """The method's losses plus `weight` x the warm-up probes' loss (`train.encoder_probe_weight`), as a
    `DynReferOutput` with a "probe" part; the controls and z are drawn once and shared by both.

    Why: once the warm-up ends, the encoder learns only what the decoders ask for, and from scratch they do
    not ask for what z lacks, such as the relation (docs/training-from-scratch.md#probes-kept-on).
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


@dataclass
class Objective:
    """What the main phase trains: `module` is the model itself or a `ProbedObjective` around it; `warmup`
    holds the probes when a warm-up or the probed objective uses them."""

    model: DynRefer
    module: torch.nn.Module
    warmup: EncoderWarmup | None = None

    @property
    def saved_probes(self) -> EncoderWarmup | None:
        """The probes that go into the trainer state: those the main phase trains (None if it trains none)."""
        return self.warmup if self.module is not self.model else None

    def inputs(self, batch: RegionBatch) -> dict:
        """`module`'s forward arguments for a batch (the probed objective also takes the other objects)."""
        inputs = batch.model_inputs()
        if self.module is not self.model:
            inputs["context_objects"] = batch.context_objects
        return inputs


def probe_classes(cfg: TrainConfig, annotations: RegionAnnotations) -> list[str] | None:
    """The categories the object probe tells apart, or None when `train.encoder_object_probe_weight` is 0;
    a ValueError when the annotations have no categories."""
    if not cfg.train.encoder_object_probe_weight > 0:
        return None
    if not annotations.categories:
        raise ValueError("train.encoder_object_probe_weight > 0 needs region categories in the annotations "
                         f"({cfg.data.annotations} has none): set it to 0")
    return list(annotations.categories)


def build_objective(cfg: TrainConfig, model: DynRefer, state: dict | None, object_classes: int = 0) -> Objective:
    """The objective of a run: the probes are built when a fresh run warms up or the main phase keeps them
    (`object_classes` categories for the object probe); a resumed run (`state`, the trainer state) gets back
    the probes it saved."""
    loop = cfg.train
    warm = None
    if (state is None and loop.encoder_warmup_steps > 0) or loop.encoder_probe_weight > 0:
        warm = EncoderWarmup(model, len(model.vocabulary.tags), loop.encoder_warmup_context_probe, object_classes,
                             loop.encoder_object_probe_weight).to(model.device)
    if loop.encoder_object_probe_weight > 0 and warm is None:
        raise ValueError("train.encoder_object_probe_weight > 0 is a probe of the encoder warm-up: it needs "
                         "train.encoder_warmup_steps > 0 or train.encoder_probe_weight > 0")
    if not loop.encoder_probe_weight > 0:
        return Objective(model, model, warm)
    if state is not None:
        if "probes" not in state:
            raise ValueError(f"{Path(cfg.out_dir) / 'trainer_state.pt'} holds no probe weights: it was saved by a "
                             "run without train.encoder_probe_weight; resume it with the same config")
        warm.load_probe_state(state["probes"])
    return Objective(model, ProbedObjective(warm, loop.encoder_probe_weight), warm)


def warm_up_encoder(warm: EncoderWarmup, data: RegionDataset, sampler: EpochSampler, cfg: TrainConfig,
                    device: torch.device, log: Callable[[str], None], ranks: Ranks | None = None) -> None:
    """`train.encoder_warmup_steps` steps of the probes' loss alone, at the constant `train.encoder_warmup_lr`,
    with its own AdamW; `log` (rank 0) gets a line first and the mean loss every `train.log_every` steps."""
    loop, ranks = cfg.train, ranks or Ranks()
    steps = loop.encoder_warmup_steps
    net = ranks.wrap(warm, device)
    optimizer = adamw(warm, loop.encoder_warmup_lr, loop)
    if ranks.main:
        probes = "z and one on the mean context RoI map" if warm.context_probe is not None else "z"
        if warm.object_probe is not None:
            probes += (f", plus {warm.object_weight:g} x cross-entropy of an object probe on the other objects in "
                       "the context views")
        log(f"encoder warm-up: {steps} steps at lr {loop.encoder_warmup_lr:g}, tag loss on a linear probe of "
            f"{probes}, then the method's losses")
    running, count = 0.0, 0
    batches = endless_batches(data, sampler, loop.batch_size, cfg.data.num_workers, cfg.seed, epoch=WARMUP_EPOCHS)
    for step, (_, _, batch) in enumerate(batches, start=1):
        batch = batch.to(device)
        loss = net(**batch.model_inputs(), context_objects=batch.context_objects)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(warm.parameters(), loop.grad_clip)
        optimizer.step()
        running, count = running + float(loss.detach()), count + 1
        if ranks.main and (step % loop.log_every == 0 or step == steps):
            log(f"encoder warm-up {step}/{steps} probe loss {running / count:.4f}")
            running, count = 0.0, 0
        if step >= steps:
            break
