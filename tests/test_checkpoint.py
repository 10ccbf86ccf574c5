"""Model folders and the released checkpoint's key names (spec 6.4)."""
import dataclasses
import json
import math
import time

import pytest
import torch

from dynrefer_core.checkpoint import load_official_state_dict, official_state_dict
from dynrefer_core.config import DynReferConfig
from dynrefer_core.modeling.dynrefer import DynRefer


def release_shapes(c: DynReferConfig) -> dict[str, tuple]:
    """The release's trainable keys and shapes, written from spec 6.4 (not from our module names)."""
    C, n, D, H, T = c.vision_width, c.n_views, c.qformer_hidden, c.head_hidden, c.text_embed_dim
    I, QI, L = c.head_intermediate, c.qformer_intermediate, c.lm_hidden
    s = {
        "cvem_align.offset_mask_dw.weight": (C, 2, 3, 3), "cvem_align.offset_mask_dw.bias": (C,),
        "cvem_align.offset_mask.weight": (math.ceil(c.align_groups * 27 / 8) * 8, C),
        "cvem_align.offset_mask.bias": (math.ceil(c.align_groups * 27 / 8) * 8,),
        "cvem_align.value_proj.weight": (C, C), "cvem_align.value_proj.bias": (C,),
        "cvem_align.output_proj.weight": (C, C), "cvem_align.output_proj.bias": (C,),
        "cvem_mlp.0.weight": (C, n * C), "cvem_mlp.0.bias": (C,), "cvem_mlp.2.weight": (C, C), "cvem_mlp.2.bias": (C,),
        "cem_memory": (L,), "attr_t": (), "attr_b": (),
        "Qformer.bert.embeddings.LayerNorm.weight": (D,), "Qformer.bert.embeddings.LayerNorm.bias": (D,),
        "t5_proj.weight": (L, D), "t5_proj.bias": (L,),
    }
    for head in ("tag", "attr"):
        for i in range(c.head_layers):
            p = f"{head}_head.encoder.layer.{i}."
            for part in ("query", "key", "value"):
                s[p + f"crossattention.self.{part}.weight"], s[p + f"crossattention.self.{part}.bias"] = (H, H), (H,)
            s[p + "crossattention.output.dense.weight"], s[p + "crossattention.output.dense.bias"] = (H, H), (H,)
            s[p + "crossattention.output.LayerNorm.weight"] = s[p + "crossattention.output.LayerNorm.bias"] = (H,)
            s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (I, H), (I,)
            s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (H, I), (H,)
            s[p + "output.LayerNorm.weight"] = s[p + "output.LayerNorm.bias"] = (H,)
        s[f"{head}_vision_proj.weight"], s[f"{head}_vision_proj.bias"] = (H, D), (H,)
        s[f"{head}_text_proj.weight"], s[f"{head}_text_proj.bias"] = (H, T), (H,)
        s[f"{head}_fc.weight"], s[f"{head}_fc.bias"] = (1, H), (1,)
    for i in range(c.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % c.cross_attention_freq == 0 else [])
        for block in blocks:
            for part in ("query", "key", "value"):
                width = C if block == "crossattention" and part != "query" else D
                s[p + f"{block}.self.{part}.weight"], s[p + f"{block}.self.{part}.bias"] = (D, width), (D,)
            s[p + f"{block}.output.dense.weight"], s[p + f"{block}.output.dense.bias"] = (D, D), (D,)
            s[p + f"{block}.output.LayerNorm.weight"] = s[p + f"{block}.output.LayerNorm.bias"] = (D,)
        s[p + "intermediate_query.dense.weight"], s[p + "intermediate_query.dense.bias"] = (QI, D), (QI,)
        s[p + "output_query.dense.weight"], s[p + "output_query.dense.bias"] = (D, QI), (D,)
        s[p + "output_query.LayerNorm.weight"] = s[p + "output_query.LayerNorm.bias"] = (D,)
    return s


def release_dict(c: DynReferConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in release_shapes(c).items()}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    return {"model": state, "epoch": 4}


@pytest.fixture(scope="module")
def tiny():
    """This module's own tiny model, which release weights are loaded into (the shared tiny_model is read-only)."""
    torch.manual_seed(0)
    return DynRefer(DynReferConfig.tiny()).eval()


def test_official_preset_has_the_release_keys_and_sizes():
    with torch.device("meta"):
        model = DynRefer(DynReferConfig.official_flant5xl(), compute_tables=False)
    from dynrefer_core.checkpoint import TRAINABLE_PREFIXES, ours_to_release

    ours = {ours_to_release(k): tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith(TRAINABLE_PREFIXES)}
    spec = release_shapes(model.config)
    assert ours == spec
    assert ours["cvem_mlp.0.weight"] == (1408, 4224) and ours["cvem_align.offset_mask.weight"] == (112, 1408)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert trainable == sum(math.prod(s) for s in spec.values())
    assert 120e6 < trainable < 126e6  # spec 3.6: about 123 M trainable
    assert 4.0e9 < sum(p.numel() for p in model.parameters()) < 4.2e9  # about 4.1 B in all


def test_release_dict_round_trip(tiny):
    ckpt = release_dict(tiny.config)
    report = load_official_state_dict(tiny, ckpt)
    assert len(report["loaded"]) == len(release_shapes(tiny.config)) and report["blip2"] == []
    exported = official_state_dict(tiny)
    expected = {k: v for k, v in ckpt["model"].items() if k != "Qformer.bert.embeddings.position_ids"}
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    # The mapped weights really are where the release's forward uses them.
    assert torch.equal(tiny.align.offset_conv.weight, ckpt["model"]["cvem_align.offset_mask_dw.weight"])
    assert torch.equal(tiny.rtc_decoder.logit_bias, ckpt["model"]["attr_b"])
    assert torch.equal(tiny.qformer.model.encoder.layer[0].crossattention.attention.key.weight,
                       ckpt["model"]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(tiny.language.control_memory, ckpt["model"]["cem_memory"])


def test_blip2_extras_are_loaded_when_present(tiny):
    ckpt = release_dict(tiny.config)["model"]
    ckpt["query_tokens"] = torch.ones(tiny.qformer.query_tokens.shape)
    ckpt["ln_vision.weight"] = torch.full((tiny.config.vision_width,), 2.0)
    report = load_official_state_dict(tiny, ckpt)  # a bare dict works too
    assert sorted(report["blip2"]) == ["ln_vision.weight", "query_tokens"]
    assert torch.equal(tiny.vision.vit.post_layernorm.weight, ckpt["ln_vision.weight"])
    both = official_state_dict(tiny, include_blip2=True)
    assert torch.equal(both["query_tokens"], ckpt["query_tokens"]) and "ln_vision.bias" in both


def test_bad_checkpoints_are_refused_naming_every_key(tiny):
    before = {k: v.clone() for k, v in official_state_dict(tiny).items()}
    state = release_dict(tiny.config)["model"]
    del state["cem_memory"]
    del state["tag_fc.bias"]
    state["visual_encoder.blocks.0.norm1.weight"] = torch.zeros(3)
    state["attr_fc.weight"] = torch.zeros(2, 5)
    with pytest.raises(ValueError) as err:
        load_official_state_dict(tiny, {"model": state})
    msg = str(err.value)
    assert "2 missing keys: ['cem_memory', 'tag_fc.bias']" in msg
    assert "1 unexpected keys: ['visual_encoder.blocks.0.norm1.weight']" in msg
    assert "attr_fc.weight: checkpoint (2, 5) vs model (1, 32)" in msg
    after = official_state_dict(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded
    with pytest.raises(ValueError, match="not a state dict"):
        load_official_state_dict(tiny, {"model": {"a": 1}})


def _only_missing(state):
    del state["cem_memory"]
    return "1 missing keys: ['cem_memory']"


def _only_unexpected(state):
    state["visual_encoder.blocks.0.norm1.weight"] = torch.zeros(3)  # a family we do not map
    state["tag_head.encoder.layer.7.output.dense.bias"] = torch.zeros(32)  # a mapped family, a layer we lack
    return "2 unexpected keys: ['tag_head.encoder.layer.7.output.dense.bias', 'visual_encoder.blocks.0.norm1.weight']"


def _only_wrong_shape(state):
    # (32,) would broadcast into (1, 32) if copied: only the shape check stops it.
    state["attr_fc.weight"] = torch.zeros(32)
    return "1 keys with the wrong shape: ['attr_fc.weight: checkpoint (32,) vs model (1, 32)']"


@pytest.mark.parametrize("spoil", [_only_missing, _only_unexpected, _only_wrong_shape],
                         ids=["missing", "unexpected", "wrong-shape"])
def test_a_file_with_one_kind_of_fault_is_refused(tiny, spoil):
    """Each check on its own: a file whose only fault is missing keys, or unexpected keys, or wrong shapes."""
    before = {k: v.clone() for k, v in official_state_dict(tiny).items()}
    state = release_dict(tiny.config, seed=2)["model"]
    expected = spoil(state)
    with pytest.raises(ValueError) as err:
        load_official_state_dict(tiny, {"model": state})
    msg = str(err.value)
    assert expected in msg and msg.count(" keys") == 1, msg
    after = official_state_dict(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded


def test_save_and_load_round_trip(tiny_model, tmp_path):
    from dynrefer_core.checkpoint import FORMAT

    folder = tiny_model.save_pretrained(tmp_path / "tiny")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer", "text_tokenizer", "vocab",
            "text_tables.safetensors"} <= names
    again = DynRefer.from_pretrained(folder, device="cpu")
    assert again.config == tiny_model.config and again.vocabulary == tiny_model.vocabulary and not again.training
    for a, b in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    assert torch.equal(again.tag_embeds, tiny_model.tag_embeds)
    assert again.language.t5.encoder.embed_tokens.weight.data_ptr() == again.language.t5.shared.weight.data_ptr()
    s = tiny_model.config.image_size
    pixel_values = torch.randn(2, 3, 3, s, s)
    boxes = torch.tensor([[0.0, 0, s, s], [10, 10, 60, 70], [20, 5, 40, 50]]).expand(2, 3, 4)
    with torch.inference_mode():
        z1, z2 = tiny_model.encode_regions(pixel_values, boxes), again.encode_regions(pixel_values, boxes)
        assert torch.equal(z1, z2)
        assert tiny_model.generate_captions(z1, ["|", "man|"]) [0] == again.generate_captions(z2, ["|", "man|"])[0]
    # A stale table cache (edited vocabulary) is recomputed rather than trusted.
    (folder / "vocab" / "tags.txt").write_text("person\nflag\n")
    third = DynRefer.from_pretrained(folder, device="cpu")
    assert third.tag_embeds.shape == (2, 32)
    assert torch.allclose(third.tag_embeds, tiny_model.text_encoder.encode(["person", "flag"]), atol=1e-6)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["format"] == FORMAT


def test_broken_folders_are_refused(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks \\['config.json'"):
        DynRefer.from_pretrained(tmp_path)
    folder = tiny_model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["vision_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config.json: missing \\['vision.vit.encoder.layers.2"):
        DynRefer.from_pretrained(folder)


def test_a_hub_id_fails_fast_and_clearly_offline():
    """HF_HUB_OFFLINE=1 (conftest.py): a Hub id missing from the local cache fails at once, naming it."""
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="'dynrefer-core-tests/no-such-model' is neither a local model folder "
                                                "nor a reachable Hugging Face Hub model"):
        DynRefer.from_pretrained("dynrefer-core-tests/no-such-model")
    assert time.perf_counter() - start < 10


def test_minilm_text_tower_is_not_stored(tmp_path):
    config = dataclasses.replace(DynReferConfig.mini(), vision_layers=1, qformer_layers=2)
    from dynrefer_core.vocab import Vocabulary

    vocab = Vocabulary(tags=["dog", "cat"], classes=["dog"], attributes=["is colour:red"])
    model = DynRefer(config, vocabulary=vocab)
    folder = model.save_pretrained(tmp_path / "mini")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("text_encoder.") for k in f.keys())
    assert not (folder / "text_tokenizer").exists()
    again = DynRefer.from_pretrained(folder, device="cpu")
    assert torch.equal(again.tag_embeds, model.tag_embeds)
    norms = again.tag_embeds.norm(dim=-1)
    # MiniLM embeddings are L2-normalised, then scaled to unit RMS per dimension (TextEncoderConfig.output_scale)
    assert config.text_encoder.output_scale == pytest.approx(384 ** 0.5)
    assert torch.allclose(norms, torch.full_like(norms, 384 ** 0.5), atol=1e-4)
