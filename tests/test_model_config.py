"""DynReferConfig: presets, JSON round trip, clear errors."""
import dataclasses

import pytest

from dynrefer_core.config import DynReferConfig, LanguageConfig, TextEncoderConfig


def test_official_sizes_match_the_release():
    c = DynReferConfig.official_flant5xl()
    assert (c.n_views, c.image_size, c.patch_size, c.vision_width, c.vision_layers) == (3, 224, 14, 1408, 39)
    assert (c.align_groups, c.qformer_hidden, c.qformer_layers, c.qformer_intermediate) == (4, 768, 12, 3072)
    assert (c.cross_attention_freq, c.num_query_tokens, c.head_hidden, c.head_layers) == (2, 32, 256, 2)
    assert (c.head_heads, c.head_intermediate, c.text_embed_dim, c.lm_hidden) == (4, 1024, 1024, 2048)
    assert c.grid_size == 16 and c.freeze_vision and c.freeze_language and c.freeze_query_tokens
    assert (c.language.num_beams, c.language.max_new_tokens, c.language.repetition_penalty) == (2, 20, 1.5)
    assert c.text_encoder == TextEncoderConfig()  # EVA-CLIP-like: 768 wide, 12 layers, 77 tokens


@pytest.mark.parametrize("preset", ["official_flant5xl", "tiny", "mini"])
def test_json_round_trip(preset, tmp_path):
    config = getattr(DynReferConfig, preset)()
    config.save(tmp_path / "c.json")
    again = DynReferConfig.load(tmp_path / "c.json")
    assert again == config and isinstance(again.language, LanguageConfig)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="image_size=100 is not a multiple of patch_size=14"):
        dataclasses.replace(DynReferConfig.tiny(), image_size=100)
    with pytest.raises(ValueError, match="align_groups"):
        dataclasses.replace(DynReferConfig.tiny(), align_groups=5)
    with pytest.raises(ValueError, match="unknown DynReferConfig fields \\['colour'\\]"):
        DynReferConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="384"):
        dataclasses.replace(DynReferConfig.mini(), text_embed_dim=256)


def test_runtime_choices():
    import torch

    from dynrefer_core import runtime

    cpu = torch.device("cpu")
    assert runtime.choose_dtype(cpu) == torch.float32
    with pytest.warns(UserWarning, match="fp16 is refused"):
        assert runtime.choose_dtype(cpu, "fp16") == torch.float32
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        runtime.choose_dtype(cpu, "fp8")
    if not torch.cuda.is_available():
        assert runtime.choose_device() == cpu
        with pytest.raises(ValueError, match="CUDA is not available"):
            runtime.choose_device("cuda")


def test_cpu_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from dynrefer_core import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.choose_dtype(cpu, "bf16") == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert runtime.choose_dtype(cpu, "bf16") == torch.float32
    assert runtime.choose_dtype(cpu) == torch.float32  # never bf16 unless asked for
