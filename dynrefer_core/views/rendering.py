"""Turn a ViewPlan into model input (spec §1.4): each crop resized to SxS, CLIP-normalised, box mapped into it."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .geometry import map_box_to_view
from .imageio import ImageSource, load_image
from .planning import ViewOptions, ViewPlan, plan_views_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_WORKERS = 8  # past ~8 threads the resizes are limited by memory bandwidth, not cores
MIN_CROPS_FOR_THREADS = 4  # one plan (3 views) renders faster in a plain loop than a pool can start


@dataclass
class RenderedViews:
    """pixel_values (N, n, 3, S, S) normalised; boxes (N, n, 4) region box per view in S-pixel coordinates;
    crops: the S x S PIL images (N lists of n); plans: the ViewPlans they were rendered from (`prepare`)."""

    pixel_values: torch.Tensor
    boxes: torch.Tensor
    crops: list[list[Image.Image]]
    plans: list[ViewPlan] = field(default_factory=list)
    box_rounding: str = "exact"


def prepare(image: ImageSource, boxes: Sequence[Sequence[float]], views: ViewOptions, size: int, *,
            workers: int | None = None) -> RenderedViews:
    """The CPU side of describing regions: plan the views of every box of one image and render them at
    S = ``size`` (``views`` resolved for the model: n_views and box_rounding set; ``workers``: the threads
    hashing and rendering, see render_views)."""
    if views.box_rounding is None:
        raise ValueError("ViewOptions.box_rounding is not set: resolve the options for a model first")
    pil = load_image(image)
    return render_views(pil, plan_views_batch(pil, boxes, views, workers=workers), size,
                        box_rounding=views.box_rounding, workers=workers)


def render_views(image: ImageSource, plans: ViewPlan | Sequence[ViewPlan], size: int = 224, *,
                 box_rounding: str = "exact", workers: int | None = None) -> RenderedViews:
    """Crop the views of each plan from ``image`` (converted once) and build the model inputs.

    The crop is resized as a PIL image with torchvision's v2 ``resize`` (bicubic, aspect not kept), exactly the
    reference's path (its v2 ``Resize`` receives PIL crops, so PIL's antialiased bicubic does the work).
    ``box_rounding``: "exact" gives spec §1.4's exact mapping (view 0 = [0, 0, S, S]); "reference" truncates like
    the reference's torchvision int64 box resize (see ``geometry.map_box_to_view``).

    Speed without changing a value: each distinct crop box is rendered once (views repeated across regions, such
    as the whole-image t=1 view, share the tensor values and the same PIL crop object), and the distinct crops
    are rendered by ``workers`` threads (default ``min(8, os.cpu_count())``; PIL's resize releases the GIL).
    """
    plan_list = [plans] if isinstance(plans, ViewPlan) else list(plans)
    pil = load_image(image)
    W, H = pil.size
    for p in plan_list:
        if tuple(p.image_size) != (W, H):
            raise ValueError(f"plan was made for a {p.image_size[0]}x{p.image_size[1]} image but this image is "
                             f"{W}x{H}: plan and render the same image")
    if not plan_list:
        return RenderedViews(torch.empty(0, 0, 3, size, size), torch.empty(0, 0, 4), [], [], box_rounding)
    views = [p.views for p in plan_list]
    n = len(views[0])
    if any(len(v) != n for v in views):
        raise ValueError(f"plans have {sorted({len(v) for v in views})} views: render plans with the same n_views "
                         f"together (they are stacked into one (N, n, 3, S, S) tensor)")

    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers} must be >= 1 (1 renders in a plain loop)")

    # Crop boxes of all (region, view) pairs, flat; each distinct one is rendered once, in first-seen order.
    keys = [tuple(int(c) for c in v.crop_box) for row in views for v in row]
    index: dict[tuple[int, int, int, int], int] = {}
    for key in keys:
        index.setdefault(key, len(index))
    distinct = list(index)

    # Worker threads only crop and resize (PIL releases the GIL there) into one uint8 buffer; torch's own
    # intra-op threads would multiply with ours, so the float conversion runs once, batched, below.
    pixels = np.empty((len(distinct), size, size, 3), dtype=np.uint8)

    def render(k: int) -> Image.Image:
        crop = TF.resize(pil.crop(distinct[k]), [size, size], interpolation=InterpolationMode.BICUBIC)
        pixels[k] = np.asarray(crop)
        return crop

    n_workers = min(MAX_WORKERS, os.cpu_count() or 1) if workers is None else workers
    if min(n_workers, len(distinct)) <= 1 or len(distinct) < MIN_CROPS_FOR_THREADS:
        rendered = [render(k) for k in range(len(distinct))]
    else:
        with ThreadPoolExecutor(min(n_workers, len(distinct)), thread_name_prefix="render_views") as pool:
            rendered = list(pool.map(render, range(len(distinct))))  # map keeps index order: deterministic

    # The reference's to_image -> to_dtype(scale) -> normalize, on all crops at once: every op is elementwise
    # per (channel, byte value), so batching them changes no value.
    x = torch.from_numpy(pixels)
    if len(distinct) < len(keys):
        x = x[torch.tensor([index[key] for key in keys])]
    x = TF.to_dtype(x.permute(0, 3, 1, 2).contiguous(), torch.float32, scale=True)
    pixel_values = TF.normalize(x, list(CLIP_MEAN), list(CLIP_STD), inplace=True)

    flat_crops = [rendered[index[key]] for key in keys]
    crops = [flat_crops[i * n:(i + 1) * n] for i in range(len(plan_list))]
    boxes = torch.from_numpy(np.stack([map_box_to_view(np.array(row[0].crop_box), np.array(v.crop_box), size,
                                                       box_rounding) for row in views for v in row]))
    return RenderedViews(pixel_values.view(len(plan_list), n, 3, size, size), boxes.view(len(plan_list), n, 4),
                         crops, plan_list, box_rounding)
