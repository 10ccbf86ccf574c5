"""DynRefer: region-level multimodal understanding via dynamic resolution (CVPR 2025), re-implemented.

    from dynrefer_core import DynRefer, plan_views
    model = DynRefer.from_pretrained("checkpoints/mini")
    results = model.describe("photo.jpg", [(40, 60, 200, 220)], phrases=["a red star"])
"""
from .checkpoint import load_official_state_dict, official_state_dict
from .config import DynReferConfig
from .describe import RegionOutputs, RegionResult, describe_views
from .modeling.dynrefer import DynRefer, DynReferOutput
from .views import (ViewCandidate, ViewOptions, ViewPlan, load_image, plan_views, plan_views_batch, prepare,
                    render_views)
from .vocab import Vocabulary

__all__ = ["DynRefer", "DynReferConfig", "DynReferOutput", "RegionOutputs", "RegionResult", "ViewCandidate",
           "ViewOptions", "ViewPlan", "Vocabulary", "describe_views", "load_image", "load_official_state_dict",
           "official_state_dict", "plan_views", "plan_views_batch", "prepare", "render_views"]
