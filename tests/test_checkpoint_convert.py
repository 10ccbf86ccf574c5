"""python -m dynrefer_core.convert on tiny stand-ins of the three released files, saved by the test."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

from dynrefer_core.config import DynReferConfig
from dynrefer_core.convert import main
from dynrefer_core.modeling.dynrefer import DynRefer
from dynrefer_core.modeling.tokenization import build_word_tokenizer
from test_checkpoint import release_dict

EVA_WIDTH, EVA_HEADS, EVA_LAYERS, EVA_CONTEXT = 128, 2, 2, 16  # EVA-CLIP's rule: heads = width // 64



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    c = DynReferConfig.tiny()
    tokenizer = build_word_tokenizer(["a woman in a uniform", "a flag"], vocab_size=c.language.vocab_size)
    torch.manual_seed(0)
    # 1. A tiny BLIP-2 FlanT5, saved with save_pretrained like Salesforce/blip2-flan-t5-xl (plus its tokenizer).
    t5 = T5Config(vocab_size=c.language.vocab_size, d_model=c.lm_hidden, d_kv=8, d_ff=64, num_layers=2,
                  num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    blip2_config = Blip2Config(
        vision_config=dict(hidden_size=c.vision_width, intermediate_size=c.vision_intermediate,
                           num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
                           image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=c.qformer_hidden, num_hidden_layers=c.qformer_layers,
                            num_attention_heads=c.qformer_heads, intermediate_size=c.qformer_intermediate,
                            encoder_hidden_size=c.vision_width, cross_attention_frequency=2),
        text_config=t5.to_dict(), num_query_tokens=c.num_query_tokens)
    blip2 = Blip2ForConditionalGeneration(blip2_config)
    lm = blip2.language_model  # FlanT5 has its own lm_head: untie it as in the real checkpoint
    lm.lm_head.weight = nn.Parameter(torch.randn_like(lm.shared.weight))
    lm.all_tied_weights_keys.pop("lm_head.weight", None)
    blip2.save_pretrained(root / "blip2")
    tokenizer.save_pretrained(root / "blip2")
    blip2_state = {k: v.clone() for k, v in blip2.state_dict().items()}
    # 2. An EVA-CLIP-format checkpoint: "text." keys (open_clip TextTransformer) and some vision keys.
    W = EVA_WIDTH
    eva = {"text.token_embedding.weight": torch.randn(c.language.vocab_size, W) * 0.1,
           "text.positional_embedding": torch.randn(EVA_CONTEXT, W) * 0.1,
           "text.ln_final.weight": 1 + 0.1 * torch.randn(W), "text.ln_final.bias": 0.1 * torch.randn(W),
           "text.text_projection": torch.randn(W, c.text_embed_dim) * W ** -0.5,
           "text.logit_scale": torch.tensor(4.6), "visual.cls_token": torch.zeros(1, 1, 8)}
    for i in range(EVA_LAYERS):
        p = f"text.transformer.resblocks.{i}."
        for name, shape in {"ln_1": (W,), "ln_2": (W,), "attn.in_proj": (3 * W, W), "attn.out_proj": (W, W),
                            "mlp.c_fc": (4 * W, W), "mlp.c_proj": (W, 4 * W)}.items():
            weight = 1 + 0.1 * torch.randn(W) if len(shape) == 1 else torch.randn(shape) * shape[1] ** -0.5
            sep = "_" if name == "attn.in_proj" else "."  # open_clip's MultiheadAttention: in_proj_weight
            eva[f"{p}{name}{sep}weight"] = weight
            eva[f"{p}{name}{sep}bias"] = 0.1 * torch.randn(shape[0])
    torch.save({"state_dict": eva}, root / "eva_clip_psz14.pt")
    # 3. The DynRefer release (LAVIS format), 4. the CLIP tokenizer stand-in (eos = 1 here).
    release = release_dict(c, seed=1)
    torch.save(release, root / "release.pth")
    tokenizer.save_pretrained(root / "clip_tokenizer")
    (root / "tags.txt").write_text("woman\nuniform\nflag\nmedal\n")
    return {"root": root, "blip2": blip2_state, "eva": eva, "release": release["model"]}


def args(files, out, **override):
    root = files["root"]
    a = {"--release": root / "release.pth", "--blip2": root / "blip2", "--eva-clip": root / "eva_clip_psz14.pt",
         "--clip-tokenizer": root / "clip_tokenizer", "--tags": root / "tags.txt", "--out": out, "--dtype": "fp32"}
    a.update(override)
    return [str(x) for kv in a.items() for x in kv]


def eva_text_reference(eva: dict, ids: list[int]) -> torch.Tensor:
    """EVA-CLIP's text tower written out (causal pre-LN transformer, feature at the EOT token)."""
    e = {k[5:]: v for k, v in eva.items() if k.startswith("text.")}
    L, W = len(ids), EVA_WIDTH
    x = (e["token_embedding.weight"][ids] + e["positional_embedding"][:L])[:, None]  # (L, 1, W)
    mask = torch.full((L, L), float("-inf")).triu(1)
    for i in range(EVA_LAYERS):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(W, EVA_HEADS)
        attn.load_state_dict({k: e[p + "attn." + k] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                               "out_proj.bias")})
        h = F.layer_norm(x, (W,), e[p + "ln_1.weight"], e[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (W,), e[p + "ln_2.weight"], e[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, e[p + "mlp.c_fc.weight"], e[p + "mlp.c_fc.bias"])),
                         e[p + "mlp.c_proj.weight"], e[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x[:, 0], (W,), e["ln_final.weight"], e["ln_final.bias"])
    return x[ids.index(1)] @ e["text_projection"]  # the EOT token (id 1 in this tokenizer)


def test_convert_builds_a_ready_folder(files, tmp_path, capsys):
    assert main(args(files, tmp_path / "out")) == 0
    log = capsys.readouterr().out
    assert "[7/7]" in log and "done" in log
    model = DynRefer.from_pretrained(tmp_path / "out", device="cpu")
    blip2, release = files["blip2"], files["release"]
    state = model.state_dict()
    # BLIP-2 supplies the ViT (+ ln_vision), the query tokens and FlanT5 ...
    assert torch.equal(state["vision.vit.encoder.layers.1.self_attn.qkv.weight"],
                       blip2["vision_model.encoder.layers.1.self_attn.qkv.weight"])
    assert torch.equal(state["vision.vit.post_layernorm.weight"], blip2["vision_model.post_layernorm.weight"])
    assert torch.equal(state["qformer.query_tokens"], blip2["query_tokens"])
    assert torch.equal(state["language.t5.lm_head.weight"], blip2["language_model.lm_head.weight"])
    assert torch.equal(state["language.t5.shared.weight"], blip2["language_model.shared.weight"])
    # ... and the release overrides the Q-Former and t5_proj.
    assert torch.equal(state["qformer.model.encoder.layer.0.attention.attention.query.weight"],
                       release["Qformer.bert.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(state["language.proj.weight"], release["t5_proj.weight"])
    assert model.config.n_views == 3 and model.config.text_encoder.heads == EVA_HEADS
    assert model.vocabulary.tags == ["woman", "uniform", "flag", "medal"]
    # The EVA-CLIP text tower gives the same embeddings as its own math.
    for text in ["a woman", "a flag in a uniform", "uniform"]:
        ids = model.text_encoder.tokenizer(text).input_ids
        assert torch.allclose(model.text_encoder.encode([text])[0], eva_text_reference(files["eva"], ids), atol=1e-5)
    batch = model.text_encoder.encode(["a woman", "a flag in a uniform"])  # padding does not change results
    assert torch.allclose(batch[0], model.text_encoder.encode(["a woman"])[0], atol=1e-5)
    assert torch.allclose(model.tag_embeds, model.text_encoder.encode(model.vocabulary.tags), atol=1e-6)
    result = model.describe(cbook_photo(), [(120, 60, 400, 330)], phrases=["a flag"])[0]
    assert isinstance(result.caption, str) and 0 <= result.similarity[0][1] <= 1


def cbook_photo():
    from matplotlib import cbook

    return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def test_bf16_storage_keeps_trainable_blocks_fp32(files, tmp_path):
    assert main(args(files, tmp_path / "bf16", **{"--dtype": "bf16"})) == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("vision.vit.encoder.layers.0.mlp.fc1.weight").dtype == torch.bfloat16
        assert f.get_tensor("language.t5.shared.weight").dtype == torch.bfloat16
        assert f.get_tensor("align.value_proj.weight").dtype == torch.float32


def _fail(files, tmp_path, capsys, **override) -> str:
    assert main(args(files, tmp_path / "x", **override)) == 1
    return capsys.readouterr().err


def test_bad_inputs_are_refused_clearly(files, tmp_path, capsys):
    root = files["root"]
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1)}}, tmp_path / "other.pth")
    assert "no 'cvem_mlp.0.weight'" in _fail(files, tmp_path, capsys, **{"--release": tmp_path / "other.pth"})

    state = dict(files["release"])
    state["tag_fc.weight"] = torch.zeros(1, 7)
    del state["cem_memory"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    err = _fail(files, tmp_path, capsys, **{"--release": tmp_path / "bad.pth"})
    assert "missing keys: ['cem_memory']" in err and "tag_fc.weight: checkpoint (1, 7) vs model (1, 32)" in err

    torch.save({"model": files["release"], "config": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.pth")
    assert "--trust-pickle" in _fail(files, tmp_path, capsys, **{"--release": tmp_path / "pickled.pth"})
    assert main(args(files, tmp_path / "trusted", **{"--release": tmp_path / "pickled.pth"}) + ["--trust-pickle"]) == 0

    torch.save({"visual.cls_token": torch.zeros(1)}, tmp_path / "novision.pt")
    assert "lacks the text keys" in _fail(files, tmp_path, capsys, **{"--eva-clip": tmp_path / "novision.pt"})
    assert "does not exist" in _fail(files, tmp_path, capsys, **{"--eva-clip": tmp_path / "missing.pt"})
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _fail(files, tmp_path, capsys, **{"--blip2": tmp_path / "empty"})
    assert (root / "blip2" / "config.json").is_file()


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "empty"])
def test_a_corrupt_release_file_is_a_clear_error(files, tmp_path, capsys, damage):
    """A damaged .pth fails at step 1 with exit status 1, saying the file cannot be read, with or without
    --trust-pickle (which is for intact files holding more than tensors, and would not help)."""
    good = (files["root"] / "release.pth").read_bytes()
    data = {"truncated": good[: len(good) // 2], "not-a-checkpoint": b"\x00\x01 these are not tensors" * 40,
            "empty": b""}[damage]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data)
    for extra in ([], ["--trust-pickle"]):
        assert main(args(files, tmp_path / "x", **{"--release": bad}) + extra) == 1
        err = capsys.readouterr().err
        assert f"error: {bad} could not be read as a PyTorch checkpoint" in err, err
        assert "--trust-pickle" not in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- files as LAVIS writes them
def lavis_checkpoint(named: dict[str, torch.Tensor], frozen: set[str], t5: nn.Module) -> dict:
    """What LAVIS's `RunnerBase._save_checkpoint` writes for a model holding these tensors under these names
    and FlanT5 at `t5_model`: state_dict(), minus the frozen parameters named by named_parameters()."""
    model = nn.Module()
    model.t5_model = t5
    for key, value in named.items():
        *path, leaf = key.split(".")
        owner = model
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if key.endswith("position_ids"):
            owner.register_buffer(leaf, value.clone())
        else:
            owner.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=key not in frozen))
    t5.requires_grad_(False)  # the release freezes FlanT5
    requires_grad = {k: p.requires_grad for k, p in model.named_parameters()}
    state = model.state_dict()
    for key, grad in requires_grad.items():
        if not grad:
            del state[key]
    return {"model": state, "optimizer": {}, "scaler": None, "epoch": 4}


@pytest.fixture(scope="module")
def lavis_file(files):
    root = files["root"]
    blip2 = Blip2ForConditionalGeneration.from_pretrained(root / "blip2")
    named = dict(files["release"])
    frozen = {"query_tokens", "ln_vision.weight", "ln_vision.bias", "visual_encoder.cls_token"}
    named.update({"query_tokens": files["blip2"]["query_tokens"],
                  "ln_vision.weight": files["blip2"]["vision_model.post_layernorm.weight"],
                  "ln_vision.bias": files["blip2"]["vision_model.post_layernorm.bias"],
                  "visual_encoder.cls_token": torch.zeros(1, 1, 8)})
    ckpt = lavis_checkpoint(named, frozen, blip2.language_model)
    torch.save(ckpt, root / "lavis_written.pth")
    return ckpt


def test_lavis_writer_keeps_the_tied_t5_embeddings(lavis_file, files):
    state = lavis_file["model"]
    tied = {"t5_model.encoder.embed_tokens.weight", "t5_model.decoder.embed_tokens.weight"}
    assert {k for k in state if k.startswith("t5_model.")} == tied  # every other frozen parameter is gone
    assert not any(k.startswith(("visual_encoder.", "ln_vision", "query_tokens")) for k in state)
    for key in tied:
        assert torch.equal(state[key], files["blip2"]["language_model.shared.weight"])


def test_convert_accepts_a_lavis_written_file(lavis_file, files, tmp_path, capsys):
    assert main(args(files, tmp_path / "out", **{"--release": files["root"] / "lavis_written.pth"})) == 0
    assert "2 tied T5 embedding copies equal BLIP-2's FlanT5 embeddings" in capsys.readouterr().out
    model = DynRefer.from_pretrained(tmp_path / "out", device="cpu")
    assert torch.equal(model.language.proj.weight, files["release"]["t5_proj.weight"])
    # Exported with the aliases, the file has exactly the LAVIS writer's keys (position_ids aside).
    from dynrefer_core.checkpoint import official_state_dict

    exported = official_state_dict(model, tied_embeddings=True)
    assert exported.keys() == set(lavis_file["model"]) - {"Qformer.bert.embeddings.position_ids"}
    assert all(torch.equal(exported[k], v) for k, v in lavis_file["model"].items() if k in exported)


def test_tied_embeddings_of_another_language_model_are_refused(lavis_file, files, tmp_path, capsys):
    state = dict(lavis_file["model"])
    state["t5_model.decoder.embed_tokens.weight"] = state["t5_model.decoder.embed_tokens.weight"] + 0.01
    torch.save({"model": state}, tmp_path / "other_t5.pth")
    err = _fail(files, tmp_path, capsys, **{"--release": tmp_path / "other_t5.pth"})
    assert "t5_model.decoder.embed_tokens.weight differs from this model's T5 input embeddings" in err
    state["t5_model.decoder.embed_tokens.weight"] = torch.zeros(5, 3)
    torch.save({"model": state}, tmp_path / "other_shape.pth")
    err = _fail(files, tmp_path, capsys, **{"--release": tmp_path / "other_shape.pth"})
    assert "t5_model.decoder.embed_tokens.weight: checkpoint (5, 3) vs model" in err


def test_converted_model_sees_the_release_inputs(files, tmp_path):
    """The release's box truncation and ln_vision eps (1e-5) are settings of the converted folder."""
    assert main(args(files, tmp_path / "out")) == 0
    model = DynRefer.from_pretrained(tmp_path / "out", device="cpu")
    assert model.config.box_rounding == "reference"
    assert model.vision.vit.post_layernorm.eps == 1e-5
    assert model.vision.vit.encoder.layers[0].layer_norm1.eps == 1e-6  # the EVA blocks keep theirs
    result = model.describe(cbook_photo(), [(120, 60, 400, 330)])[0]
    assert result.box_rounding == "reference" and result.to_dict()["box_rounding"] == "reference"


def test_convert_takes_the_release_attribute_list(files, tmp_path):
    import json

    ovad = {"attributes": [
        {"id": 1, "name": "maturity:young/baby", "type": "maturity", "is_has_att": "is", "freq_set": "head"},
        {"id": 0, "name": "cleanliness:clean/neat", "type": "cleanliness", "is_has_att": "is"},
        {"id": 2, "name": "skin tone:dark", "type": "skin tone", "is_has_att": "has"}]}
    (tmp_path / "ovad2000.json").write_text(json.dumps(ovad))
    assert main(args(files, tmp_path / "out", **{"--attributes": tmp_path / "ovad2000.json"})) == 0
    model = DynRefer.from_pretrained(tmp_path / "out", device="cpu")
    assert [a.name for a in model.vocabulary.attributes] == ["cleanliness:clean/neat", "maturity:young/baby",
                                                             "skin tone:dark"]
    prompts, groups = model.vocabulary.attribute_prompts()
    assert groups == [4, 16, 2]  # two templates per synonym; young/baby gets six more words (spec 4.0)
    assert prompts[-2:] == ["the dark skin", "the  has dark skin"]
    assert model.attribute_embeds.shape[0] == 22
    sources = json.loads((tmp_path / "out" / "vocab" / "sources.json").read_text())
    assert sources["attributes"] == "ovad2000.json" and sources["tags"] == "tags.txt"
    (tmp_path / "bad.json").write_text(json.dumps({"attributes": [{"name": "x:y"}]}))
    assert main(args(files, tmp_path / "bad", **{"--attributes": tmp_path / "bad.json"})) == 1
