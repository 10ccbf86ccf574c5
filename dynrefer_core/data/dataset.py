"""One loader for the release's annotation format (§5.3): training samples per region, eval batches per image.

Training (spec §1.3): view 0 (t = 0) plus n-1 candidates drawn at random (`plan_views(strategy="random")`),
seeded by (seed, epoch, region index) so a run is reproducible and resumable.
Evaluation: the planner's views (`strategy="phash"` by default, or "fixed"/"random" for ablations).
`collate_regions` stacks samples into the model's forward inputs.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..views import ViewOptions, box_in_view, load_image, prepare
from ..vocab import class_prompt
from .annotations import Region, RegionAnnotations

OBJECT_INSIDE = 0.8  # share of another object's box inside a context view for the object probe to use it


def tag_target(tags: Sequence[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """Multi-hot (V,) over the model's tag vocabulary; tags outside it are dropped (as the release does
    with strings missing from the RAM list)."""
    y = torch.zeros(len(vocabulary))
    for t in tags:
        i = vocabulary.get(t)
        if i is not None:
            y[i] = 1.0
    return y


@dataclass
class RegionBatch:
    """A batch of regions: the model's forward inputs plus the labels the metrics need."""

    pixel_values: torch.Tensor  # (N, n, 3, S, S)
    boxes: torch.Tensor  # (N, n, 4)
    captions: list[str]
    tag_targets: torch.Tensor  # (N, V_tag)
    regions: list[Region] = field(default_factory=list)
    selected_ts: list[list[float]] = field(default_factory=list)
    rtc_texts: list[str] | None = None  # what the region-text loss matches; None: the captions
    # Other annotated objects inside the context views, for the training-only object probe
    # (`RegionDataset(object_classes=...)`): (K, 7) rows (sample i, view k, x1, y1, x2, y2 in view pixels, class).
    context_objects: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        inputs = {"pixel_values": self.pixel_values, "boxes": self.boxes, "captions": self.captions,
                  "tag_targets": self.tag_targets}
        if self.rtc_texts is not None:
            inputs["rtc_texts"] = self.rtc_texts
        return inputs

    def to(self, device: torch.device) -> "RegionBatch":
        objects = None if self.context_objects is None else self.context_objects.to(device)
        return RegionBatch(self.pixel_values.to(device), self.boxes.to(device), self.captions,
                           self.tag_targets.to(device), self.regions, self.selected_ts, self.rtc_texts, objects)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class RegionSample:
    pixel_values: torch.Tensor  # (n, 3, S, S)
    boxes: torch.Tensor  # (n, 4)
    caption: str
    tag_target: torch.Tensor
    region: Region
    selected_ts: list[float]
    rtc_text: str | None = None
    context_objects: torch.Tensor | None = None  # (M, 6): view k, x1, y1, x2, y2 (view pixels), class


def collate_regions(samples: Sequence[RegionSample]) -> RegionBatch:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    rtc_texts = None
    if any(s.rtc_text is not None for s in samples):
        rtc_texts = [s.caption if s.rtc_text is None else s.rtc_text for s in samples]
    objects = None
    if any(s.context_objects is not None for s in samples):
        objects = torch.cat([torch.cat([torch.full((len(s.context_objects), 1), float(i)), s.context_objects], 1)
                             for i, s in enumerate(samples) if s.context_objects is not None])
    return RegionBatch(torch.stack([s.pixel_values for s in samples]), torch.stack([s.boxes for s in samples]),
                       [s.caption for s in samples], torch.stack([s.tag_target for s in samples]),
                       [s.region for s in samples], [s.selected_ts for s in samples], rtc_texts, objects)


class RegionDataset(Dataset):
    """One sample per region: its n views rendered at `image_size`, its caption and tag target.

    `views` (n_views and box_rounding set): `strategy="random"` is the training sampler (each sample seeded
    from `seed`, the epoch and its index; `views.seed` is not used); call `set_epoch(e)` each epoch for fresh,
    reproducible views. Other strategies ("phash", "fixed" with `ts`) give the evaluation views.

    `class_prompt_ratio`: the fraction of regions (with a category) whose region-text loss matches the class
    prompt "the {category}" instead of the caption. Region texts in Visual Genome are mostly such short
    phrases; a generated caption always names a neighbour too, so without them the contrastive decoder never
    learns which object a bare class name refers to (the open-vocabulary recognition prompt).

    `phash_view_ratio` (with `strategy="random"`): the fraction of regions that get the inference views
    (pHASH selection, spec 2) instead of uniformly random ones. The release trains on random views only, but
    pHASH almost always picks t = 0.1 and 0.2 (spec 2.4), which random sampling shows in only 1 of 45 pairs;
    a model trained from scratch on a short budget then learns size and neighbours in views it never gets.

    `object_classes`: also list, per sample, the other annotated regions of the image whose category is one of
    these and which lie at least `OBJECT_INSIDE` inside a context view (k >= 1), with their boxes in that view's
    pixels (`RegionSample.context_objects`), for the trainer's object probe (`train.encoder_object_probe_weight`).
    """

    def __init__(self, annotations: RegionAnnotations, tag_vocabulary: Sequence[str], *, image_size: int,
                 views: ViewOptions, seed: int = 0, class_prompt_ratio: float = 0.0, phash_view_ratio: float = 0.0,
                 object_classes: Sequence[str] | None = None) -> None:
        if not annotations.regions:
            raise ValueError("the annotation file (or split) has no regions")
        if views.n_views is None or views.box_rounding is None:
            raise ValueError("RegionDataset needs resolved view options (ViewOptions.resolve(model.config))")
        self.ann = annotations
        self.regions = annotations.regions
        self.vocab = {t: i for i, t in enumerate(tag_vocabulary)}
        self.image_size, self.views = image_size, views
        self.seed, self.epoch = seed, 0
        strategy = views.strategy
        if not 0.0 <= class_prompt_ratio <= 1.0:
            raise ValueError(f"class_prompt_ratio must lie in [0, 1], got {class_prompt_ratio}")
        self.class_prompt_ratio = class_prompt_ratio
        if not 0.0 <= phash_view_ratio <= 1.0:
            raise ValueError(f"phash_view_ratio must lie in [0, 1], got {phash_view_ratio}")
        if phash_view_ratio > 0 and strategy != "random":
            raise ValueError(f"phash_view_ratio mixes pHASH into random training views; strategy is {strategy!r}")
        self.phash_view_ratio = phash_view_ratio
        self.object_classes = None if object_classes is None else {c: i for i, c in enumerate(object_classes)}
        self._by_image = annotations.by_image() if object_classes is not None else {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def region_texts(self) -> list[str]:
        """Every text a sample can give the region-text loss: the captions and, with `class_prompt_ratio`,
        the class prompts; each once, in region order."""
        texts = [r.caption for r in self.regions]
        if self.class_prompt_ratio > 0:
            texts += [class_prompt(r.category) for r in self.regions if r.category]
        return list(dict.fromkeys(texts))

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index: int) -> RegionSample:
        r = self.regions[index]
        record = self.ann.images[r.image_id]
        image = load_image(record.path)
        options = self.views
        if options.strategy == "random":
            seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
            options = dataclasses.replace(options, seed=seed)
            if self.phash_view_ratio > 0 and random.Random(seed * 31 + 7).random() < self.phash_view_ratio:
                options = dataclasses.replace(options, strategy="phash", seed=None)
        views = prepare(image, [r.box], options, self.image_size)
        plan = views.plans[0]
        rtc_text = None
        if self.class_prompt_ratio > 0 and r.category:
            pick = random.Random((self.seed * 7_368_787 + self.epoch) * 1_000_033 + index).random()
            rtc_text = class_prompt(r.category) if pick < self.class_prompt_ratio else r.caption
        objects = None
        if self.object_classes is not None:
            objects = self.objects_in_views(r, [v.crop_box for v in plan.views])
        return RegionSample(views.pixel_values[0], views.boxes[0], r.caption, tag_target(r.tags, self.vocab), r,
                            list(plan.selected_ts), rtc_text, objects)

    def objects_in_views(self, region: Region, crops: Sequence[Sequence[int]]) -> torch.Tensor:
        """(M, 6) rows (k, x1, y1, x2, y2, class): each other region of the image with a known category that
        lies at least `OBJECT_INSIDE` inside view k >= 1 (crop box (u1, v1, u2, v2)), its box clipped to the
        crop and scaled to the view's `image_size` pixels."""
        rows = []
        for k, crop in enumerate(crops):
            if k == 0:
                continue  # the tight view shows the region itself only
            for o in self._by_image[region.image_id]:
                cls = self.object_classes.get(o.category) if o.category else None
                if o.id == region.id or cls is None:
                    continue
                box, share = box_in_view(o.box, crop, self.image_size)
                if share >= OBJECT_INSIDE:
                    rows.append([k, *box, cls])
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def iter_image_batches(annotations: RegionAnnotations, tag_vocabulary: Sequence[str], *, image_size: int,
                       views: ViewOptions, max_regions: int = 64) -> Iterator[RegionBatch]:
    """Evaluation batches: all regions of an image are prepared together (the image is hashed once), and
    consecutive images are packed into batches of at most `max_regions` regions. With the random strategy,
    image k draws with seed `views.seed` (default 0) + k."""
    vocab = {t: i for i, t in enumerate(tag_vocabulary)}
    pending: list[RegionSample] = []
    for k, (image_id, regions) in enumerate(annotations.by_image().items()):
        image = load_image(annotations.images[image_id].path)
        options = views
        if views.strategy == "random":
            options = dataclasses.replace(views, seed=(views.seed or 0) + k)
        rendered = prepare(image, [r.box for r in regions], options, image_size)
        for i, (r, p) in enumerate(zip(regions, rendered.plans)):
            pending.append(RegionSample(rendered.pixel_values[i], rendered.boxes[i], r.caption,
                                        tag_target(r.tags, vocab), r, list(p.selected_ts)))
        while len(pending) >= max_regions:
            yield collate_regions(pending[:max_regions])
            pending = pending[max_regions:]
    if pending:
        yield collate_regions(pending)
