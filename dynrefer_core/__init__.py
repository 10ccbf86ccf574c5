"""DynRefer: region-level multimodal understanding via dynamic resolution (CVPR 2025), re-implemented."""
