"""Box proposals for dense captioning: an image in, boxes with objectness scores out.

    proposer = load_proposer("checkpoints/proposer")            # the FCOS proposer trained on our scenes
    proposer = load_proposer("sam:facebook/sam-vit-base")        # SAM automatic masks, for photos
    proposer = load_proposer("file:test_grit.json")              # boxes someone else computed
    props = proposer("photo.jpg")                                 # Proposals(boxes (K, 4) x1y1x2y2 px, scores (K,))

Three implementations of one `Proposer` protocol, so the captioner never asks where its boxes came from:
- `TrainedProposer`: a folder written by `python -m dynrefer_core.proposer_train` (weights + config.json);
- `SamProposer`: transformers' `mask-generation` pipeline; masks -> boxes -> NMS -> cap;
- `FileProposals`: the release's GRiT file (COCO-style, `extra_info.grit_result.score` per box) or a plain
  JSON `{"<file_name>": [[x1, y1, x2, y2, score], ...]}`.
Every proposer returns boxes clipped to the image, sorted by descending score, at most `max_proposals`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, masks_to_boxes, nms

from .views.imageio import load_image


@dataclass
class Proposals:
    """Boxes (K, 4) as float x1, y1, x2, y2 in image pixels and their scores (K,), best first."""

    boxes: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).reshape(-1)
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.scores)

    def to_list(self) -> list[list[float]]:
        """[[x1, y1, x2, y2, score], ...]: the plain JSON form `FileProposals` reads back."""
        return [[*map(float, b), float(s)] for b, s in zip(self.boxes.tolist(), self.scores.tolist())]


class Proposer(Protocol):
    """Anything that maps an image (path, bytes, PIL image or array, as `load_image` takes) to `Proposals`."""

    def __call__(self, image: Any) -> Proposals: ...


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Boxes clamped to the image rectangle [0, width] x [0, height]."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, *, size: tuple[int, int] | None,
                nms_iou: float | None = 0.5, min_size: float = 2.0, score_threshold: float = 0.0,
                max_proposals: int | None = 30) -> Proposals:
    """The one clean-up every proposer shares: clip to `size` (width, height; None: no clipping), drop boxes
    narrower or lower than `min_size` px and scores below `score_threshold`, NMS at `nms_iou` (None: none),
    sort by score, keep at most `max_proposals` (None: all).

    Why one function: the three proposers then differ only in where the raw boxes come from.
    """
    p = Proposals(boxes, scores)
    boxes, scores = p.boxes, p.scores
    if size is not None:
        boxes = clip_boxes(boxes, *size)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    keep &= scores >= score_threshold
    boxes, scores = boxes[keep], scores[keep]
    order = nms(boxes, scores, nms_iou) if nms_iou is not None else torch.argsort(scores, descending=True)
    if max_proposals is not None:
        order = order[:max_proposals]
    return Proposals(boxes[order], scores[order])


def masks_to_proposals(masks: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> Proposals:
    """Binary masks (N, H, W) -> their tight boxes in pixel-edge coordinates; empty masks are dropped.

    torchvision's `masks_to_boxes` gives the last pixel's index as x2/y2; + 1 makes a 1-pixel mask 1 px wide,
    the convention of our annotations.
    """
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).bool()
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if masks.ndim != 3 or len(masks) != len(scores):
        raise ValueError(f"masks must be (N, H, W) with one score each; got {tuple(masks.shape)} and {len(scores)}")
    nonempty = masks.flatten(1).any(1)
    masks, scores = masks[nonempty], scores[nonempty]
    if not len(masks):
        return Proposals(torch.zeros(0, 4), torch.zeros(0))
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1
    return Proposals(boxes, scores)


def box_recall(proposals: Sequence[torch.Tensor], truths: Sequence[torch.Tensor], *, iou: float = 0.5,
               max_proposals: int | None = 30) -> float:
    """The share of ground-truth boxes (over all images) that one of the image's first `max_proposals`
    proposals covers at IoU >= `iou`. Proposals are in score order; truths (M, 4) x1y1x2y2."""
    found = total = 0
    for props, gts in zip(proposals, truths, strict=True):
        gts = torch.as_tensor(gts, dtype=torch.float32).reshape(-1, 4)
        props = torch.as_tensor(props, dtype=torch.float32).reshape(-1, 4)[:max_proposals]
        total += len(gts)
        if len(gts) and len(props):
            found += int((box_iou(gts, props).max(1).values >= iou).sum())
    if total == 0:
        raise ValueError("no ground-truth boxes: recall is undefined")
    return found / total


# ----------------------------------------------------------------------------------------- the proposer we train


class TrainedProposer:
    """The FCOS proposer of a folder written by `dynrefer_core.proposer_train` (model.safetensors + config.json).

    `score_threshold`, `nms_iou` and `max_proposals` default to the values chosen on the val split and stored
    in config.json.
    """

    def __init__(self, folder: str | Path, *, device: str | None = None, score_threshold: float | None = None,
                 nms_iou: float | None = None, max_proposals: int | None = None) -> None:
        from safetensors.torch import load_file

        from .proposer_net import ProposerNetConfig, build_net
        from .runtime import choose_device

        folder = Path(folder)
        cfg_path, weights = folder / "config.json", folder / "model.safetensors"
        for p in (cfg_path, weights):
            if not p.is_file():
                raise ValueError(f"{folder} is not a trained proposer folder: {p.name} is missing")
        self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if self.config.get("kind") != "fcos-proposer":
            raise ValueError(f"{cfg_path} is not a proposer config (kind {self.config.get('kind')!r})")
        self.device = choose_device(device)
        self.net = build_net(ProposerNetConfig.from_dict(self.config["net"]))
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        self.net.load_state_dict(state)
        self.net.to(self.device).eval()
        post = self.config.get("postprocess", {})
        self.score_threshold = post.get("score_threshold", 0.0) if score_threshold is None else score_threshold
        self.nms_iou = post.get("nms_iou", 0.5) if nms_iou is None else nms_iou
        self.max_proposals = post.get("max_proposals", 30) if max_proposals is None else max_proposals

    def __call__(self, image: Any) -> Proposals:
        return self.batch([image])[0]

    @torch.no_grad()
    def batch(self, images: Sequence[Any]) -> list[Proposals]:
        """Proposals for several images in one forward pass (faster than one call each)."""
        from .proposer_net import image_tensor

        pils = [load_image(im) for im in images]
        outs = self.net([image_tensor(im).to(self.device) for im in pils])
        return [postprocess(o["boxes"].cpu(), o["scores"].cpu(), size=im.size, nms_iou=self.nms_iou,
                            score_threshold=self.score_threshold, max_proposals=self.max_proposals)
                for o, im in zip(outs, pils)]


# ------------------------------------------------------------------------------------------------------ SAM


class SamProposer:
    """SAM's automatic mask generation (transformers' `mask-generation` pipeline): a grid of point prompts,
    masks filtered by predicted IoU and stability, then masks -> boxes -> NMS -> at most `max_proposals`.

    `model` is a hub id (e.g. facebook/sam-vit-base) or a folder with a saved SamModel and its processor.
    `points_per_side` points per image side (SAM's default grid is 32 x 32), `points_per_batch` prompts per
    forward pass (memory against speed), `nms_iou` None: no NMS (the pipeline's own box NMS is set to it too).
    Why NMS on boxes: SAM returns part, object and group masks for the
    same thing; its own mask NMS keeps near-duplicates whose boxes coincide.
    """

    def __init__(self, model: str | Path, *, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95, nms_iou: float | None = 0.7,
                 max_proposals: int = 30, min_size: float = 4.0, device: str | None = None) -> None:
        from transformers import pipeline

        from .runtime import choose_device

        dev = choose_device(device)
        try:
            self.pipe = pipeline("mask-generation", model=str(model), device=dev)
        except OSError as e:
            raise ValueError(f"cannot load SAM from {str(model)!r} (a hub id needs the network or the hub cache; "
                             f"a folder needs a saved SamModel and processor): {e}") from None
        self.points_per_side, self.points_per_batch = points_per_side, points_per_batch
        self.pred_iou_thresh, self.stability_score_thresh = pred_iou_thresh, stability_score_thresh
        self.nms_iou, self.max_proposals, self.min_size = nms_iou, max_proposals, min_size

    def __call__(self, image: Any) -> Proposals:
        im = load_image(image)
        out = self.pipe(im, points_per_crop=self.points_per_side, points_per_batch=self.points_per_batch,
                        pred_iou_thresh=self.pred_iou_thresh, stability_score_thresh=self.stability_score_thresh,
                        crops_nms_thresh=1.0 if self.nms_iou is None else self.nms_iou)
        masks = np.stack([np.asarray(m, dtype=bool) for m in out["masks"]]) if len(out["masks"]) else \
            np.zeros((0, im.height, im.width), bool)
        raw = masks_to_proposals(masks, torch.as_tensor(out["scores"], dtype=torch.float32).reshape(-1))
        return postprocess(raw.boxes, raw.scores, size=im.size, nms_iou=self.nms_iou, min_size=self.min_size,
                           max_proposals=self.max_proposals)


# --------------------------------------------------------------------------------------------------- files


class FileProposals:
    """Proposals read from a file, looked up by the image's file name.

    Two layouts: the release's GRiT file (`test_grit.json`: COCO-style images + annotations, each annotation a
    predicted box, `bbox` x1y1x2y2 or its polygon, with `extra_info.grit_result.score`), or a plain JSON
    `{"<file_name>": [[x1, y1, x2, y2, score], ...]}`. Keys match a path's full string or its file name.
    Boxes are kept as the file has them (sorted, clipped when the image size is known); `nms_iou` and
    `max_proposals` (both None by default) apply the shared clean-up.
    """

    def __init__(self, path: str | Path, *, nms_iou: float | None = None, max_proposals: int | None = None,
                 score_threshold: float = 0.0) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"proposal file {self.path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"proposal file {self.path} is not valid JSON: {e}") from None
        self.sizes: dict[str, tuple[int, int]] = {}
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            self.table = self._grit(data)
        else:
            self.table = self._plain(data)
        self.nms_iou, self.max_proposals, self.score_threshold = nms_iou, max_proposals, score_threshold

    def _grit(self, data: dict) -> dict[str, list[list[float]]]:
        from .data.annotations import annotation_box

        names = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        self.sizes = {str(im["file_name"]): (int(im["width"]), int(im["height"])) for im in data["images"]
                      if im.get("width") and im.get("height")}
        table: dict[str, list[list[float]]] = {n: [] for n in names.values()}
        for a in data["annotations"]:
            grit = (a.get("extra_info") or {}).get("grit_result")
            if not isinstance(grit, dict) or "score" not in grit:
                raise ValueError(f"annotation {a.get('id')} in {self.path} has no extra_info.grit_result.score: "
                                 "not a GRiT proposal file (use an annotation file as ground truth instead)")
            if int(a["image_id"]) not in names:
                raise ValueError(f"annotation {a.get('id')} in {self.path} names image {a['image_id']}, "
                                 "which is not in its images")
            table[names[int(a["image_id"])]].append([*annotation_box(a, self.path), float(grit["score"])])
        return table

    def _plain(self, data: Any) -> dict[str, list[list[float]]]:
        if not isinstance(data, dict):
            raise ValueError(f"proposal file {self.path} must hold a JSON object: GRiT's COCO-style file or "
                             '{"<file_name>": [[x1, y1, x2, y2, score], ...]}')
        for name, rows in data.items():
            if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != 5 for r in rows):
                raise ValueError(f"proposal file {self.path}: the value of {name!r} must be a list of "
                                 "[x1, y1, x2, y2, score] rows")
        return {str(k): [[float(v) for v in r] for r in rows] for k, rows in data.items()}

    def key(self, image: Any) -> str:
        """The file's key for `image`: a path's full string or its file name (PIL images keep their file's path)."""
        src = getattr(image, "filename", None) if isinstance(image, Image.Image) else image
        if not isinstance(src, (str, Path)) or not str(src):
            raise ValueError(f"FileProposals looks boxes up by file name: pass the image's path, not a "
                             f"{type(image).__name__}")
        for k in (str(src), Path(src).name):
            if k in self.table:
                return k
        raise ValueError(f"image {str(src)!r} is not in the proposal file {self.path} ({len(self.table)} images)")

    def __call__(self, image: Any) -> Proposals:
        key = self.key(image)
        rows = torch.tensor(self.table[key], dtype=torch.float32).reshape(-1, 5)
        return postprocess(rows[:, :4], rows[:, 4], size=self._size(image, key), nms_iou=self.nms_iou,
                           min_size=0.0, score_threshold=self.score_threshold, max_proposals=self.max_proposals)

    def _size(self, image: Any, key: str) -> tuple[int, int] | None:
        if key in self.sizes:
            return self.sizes[key]
        if isinstance(image, Image.Image):
            return image.size
        if isinstance(image, (str, Path)) and Path(image).is_file():
            with Image.open(image) as im:  # reads the header only
                return im.size
        return None


def load_proposer(spec: str | Path, **kwargs: Any) -> Proposer:
    """A proposer from a string: `sam:<model id or folder>`, `file:<path>`, or a trained proposer's folder.
    `kwargs` go to the class (e.g. max_proposals=, device=)."""
    spec = str(spec)
    if spec.startswith("sam:"):
        return SamProposer(spec[4:], **kwargs)
    if spec.startswith("file:"):
        return FileProposals(spec[5:], **kwargs)
    if Path(spec).is_dir():
        return TrainedProposer(spec, **kwargs)
    raise ValueError(f"proposer {spec!r}: expected a trained proposer folder, 'sam:<model id or folder>' or "
                     "'file:<path>'")
