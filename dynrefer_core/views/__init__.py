"""Nested views around a region and their selection (DynRefer spec §1-§2)."""
from .drawing import contact_sheet, draw_views, view_tiles
from .geometry import CANDIDATE_TS, box_in_view, crop_boxes, region_box, view_boxes
from .hashing import HASH_NAMES, dct_hash, gray_float32, hash_hex
from .imageio import ImageLoadError, load_image
from .planning import STRATEGIES, TASKS, BoxError, ViewCandidate, ViewOptions, ViewPlan, plan_views, plan_views_batch
from .rendering import CLIP_MEAN, CLIP_STD, RenderedViews, prepare, render_views

__all__ = ["BoxError", "CANDIDATE_TS", "CLIP_MEAN", "CLIP_STD", "HASH_NAMES", "STRATEGIES", "TASKS", "ImageLoadError", "RenderedViews",
           "ViewCandidate", "ViewOptions", "ViewPlan", "box_in_view", "contact_sheet", "crop_boxes", "dct_hash", "draw_views",
           "gray_float32", "hash_hex", "load_image", "plan_views", "plan_views_batch", "prepare", "region_box", "render_views", "view_boxes",
           "view_tiles"]
