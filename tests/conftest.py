"""Test-wide settings (never reach a model hub, never phone home) and the fixtures every module shares.

Shared fixtures are read-only: a test that trains, loads weights or changes the config builds its own model.
`tiny_model` checks at the end of the session that no test changed it.
"""
import os

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}.items():
    os.environ[_name] = _value

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The models under test are tiny: one thread avoids thread-pool overhead dominating on a 2-core machine.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SCENES_SEED, SCENES_IMAGES = 11, 10  # 10 images: image 8 is in val, image 9 in test, the rest in train


def _snapshot(model) -> dict:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.fixture(scope="session")
def tiny_model():
    """The random tiny DynRefer (seed 0) in eval mode. Read-only: checked unchanged at the end of the session."""
    from dynrefer_core.config import DynReferConfig
    from dynrefer_core.modeling.dynrefer import DynRefer

    torch.manual_seed(0)
    model = DynRefer(DynReferConfig.tiny()).eval()  # eval: the heads' dropout is off
    before, config, vocabulary = _snapshot(model), model.config, model.vocabulary
    yield model
    after = _snapshot(model)
    changed = sorted(k for k in before if k not in after or not torch.equal(before[k], after[k]))
    assert not changed, f"a test changed the shared tiny_model's tensors {changed[:5]}: build your own model"
    assert model.config == config and model.vocabulary == vocabulary, "a test changed the shared tiny_model"
    assert not model.training and all(p.grad is None for p in model.parameters()), \
        "a test trained the shared tiny_model: build your own model"


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """annotations.json of 10 generated DynRefer-mini scenes (seed 11; train, val and test images). Read-only."""
    from dynrefer_core.data.generate import generate

    return generate(seed=SCENES_SEED, num_images=SCENES_IMAGES, out=tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="session")
def bundled_model():
    """The model shipped in checkpoints/mini, on the CPU. Read-only."""
    from dynrefer_core.modeling.dynrefer import DynRefer

    return DynRefer.from_pretrained(ROOT / "checkpoints" / "mini", device="cpu")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, scenes):
    """(folder, annotations): a random tiny model with the scenes' tokenizer and vocabulary, saved as the
    trainer saves one, and the scenes it was built for. Read-only: copy the folder to change it."""
    from dynrefer_core import train as T
    from dynrefer_core.data.annotations import load_annotations

    cfg = T.load_config(None, ["model.preset=tiny"])
    model = T.build_model(cfg, load_annotations(scenes).split("train"))
    return model.save_pretrained(tmp_path_factory.mktemp("tiny_ckpt") / "ckpt"), scenes


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
    """A random SamModel at 64 px and its processor, saved like a Hub folder (nothing is downloaded)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig, SamPromptEncoderConfig,
                                                           SamVisionConfig)

    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                      patch_size=8, output_channels=16, global_attn_indexes=[1], mlp_dim=64,
                                      num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                 mlp_dim=32, iou_head_hidden_dim=16))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam")
    SamModel(config).save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(folder)
    return folder
