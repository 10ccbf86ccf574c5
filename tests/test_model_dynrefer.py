"""The tiny DynRefer end to end on the CPU: losses, gradients, decoders (describe() is in test_describe.py)."""
import dataclasses

import pytest
import torch
from matplotlib import cbook

from dynrefer_core.config import DynReferConfig
from dynrefer_core.modeling.dynrefer import DynRefer
from dynrefer_core.vocab import Vocabulary

PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # a real 512x600 photo shipped with matplotlib


def batch(model, n=4):
    g = torch.Generator().manual_seed(0)
    s = model.config.image_size
    pixel_values = torch.randn(n, 3, 3, s, s, generator=g)
    boxes = torch.tensor([[0.0, 0, s, s], [20, 25, 80, 90], [30, 12, 62, 60]]).expand(n, 3, 4).clone()
    captions = ["a man in a white shirt", "a red car on the street", "a black dog", "a green tree"][:n]
    tags = torch.zeros(n, len(model.vocabulary.tags))
    for i, name in enumerate(["man", "car", "dog", "tree"][:n]):
        tags[i, model.vocabulary.tags.index(name)] = 1
    return pixel_values, boxes, captions, tags


def test_forward_backward_and_losses_decrease():
    torch.manual_seed(0)
    model = DynRefer(DynReferConfig.tiny()).train()
    pixel_values, boxes, captions, tags = batch(model)
    controls = ["man|", "|", "dog,black dog|", "|"]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    history = []
    for _ in range(8):
        out = model(pixel_values, boxes, captions, tags, controls=controls)
        assert set(out.losses) == {"caption", "tag", "rtc"}
        assert all(torch.isfinite(v) for v in out.losses.values())
        assert torch.allclose(out.loss, sum(out.losses.values()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.losses.items()})
    for key in ("caption", "tag", "rtc"):
        assert history[-1][key] < history[0][key], (key, [h[key] for h in history])
    assert model.align.offset_mask.weight.grad.abs().sum() > 0  # the alignment module learns


def test_frozen_towers_get_no_gradient():
    import dataclasses

    config = dataclasses.replace(DynReferConfig.tiny(), freeze_vision=True, freeze_language=True,
                                 freeze_query_tokens=True)
    model = DynRefer(config).train()
    assert not model.vision.training and not model.language.t5.training
    out = model(*batch(model, 2), controls=["|", "|"])
    out.loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.language.t5.parameters())
    assert model.qformer.query_tokens.grad is None
    assert model.language.proj.weight.grad is not None and model.language.control_memory.grad is not None
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_sampled_controls_come_from_tags_and_caption(tiny_model):
    tags = torch.zeros(2, len(tiny_model.vocabulary.tags))
    tags[0, tiny_model.vocabulary.tags.index("dog")] = 1
    torch.manual_seed(3)
    controls = [c for _ in range(20) for c in tiny_model.sample_controls(tags, ["a brown dog", "a red car"])]
    words = {w for c in controls for w in c[:-1].split(",") if w}
    assert all(c.endswith("|") for c in controls)
    assert words <= {"dog", "brown dog", "red car", "car"} and "dog" in words


def test_decoders_shapes_and_calibration(tiny_model):
    pixel_values, boxes, *_ = batch(tiny_model)
    with torch.inference_mode():
        z = tiny_model.encode_regions(pixel_values, boxes)
        assert z.shape == (4, tiny_model.config.num_query_tokens, tiny_model.config.qformer_hidden)
        assert tiny_model.tag_scores(z).shape == (4, len(tiny_model.vocabulary.tags))
        s = tiny_model.text_scores(z, ["a dog", "a car", "sky"])
        probs = tiny_model.match_probabilities(z, tiny_model.text_encoder.encode(["a dog", "a car", "sky"]))
        rtc = tiny_model.rtc_decoder
        assert torch.allclose(probs, torch.sigmoid(s * rtc.logit_scale.exp() + rtc.logit_bias))
        assert tiny_model.classify(z).shape == (4, 80)
        assert torch.allclose(tiny_model.classify(z, ["Dog", "car"]), tiny_model.text_scores(z, ["the dog", "the car"]))
        assert tiny_model.attribute_scores(z).shape == (4, len(tiny_model.vocabulary.attributes))


def test_bad_inputs_are_refused(tiny_model):
    pixel_values, boxes, captions, tags = batch(tiny_model)
    with pytest.raises(ValueError, match="expected \\(N, 3, 3, 112, 112\\)"):
        tiny_model.encode_regions(pixel_values[:, :2], boxes[:, :2])
    with pytest.raises(ValueError, match="tag_targets"):
        tiny_model(pixel_values, boxes, captions, tags[:, :5])
    with pytest.raises(ValueError, match="3 captions for 4 regions"):
        tiny_model(pixel_values, boxes, captions[:3], tags)


def test_custom_vocabulary():
    vocab = Vocabulary(tags=["person", "uniform", "flag"], classes=["person", "chair"])
    m = DynRefer(DynReferConfig.tiny(), vocabulary=vocab)
    assert m.tag_embeds.shape == (3, 32) and m.class_embeds.shape == (2, 32)
    r = m.describe(PHOTO, [(120, 60, 400, 330)], tag_threshold=0.0)[0]
    assert {n for n, _ in r.tags} == {"person", "uniform", "flag"} and r.category in {"person", "chair"}
    with pytest.raises(ValueError, match="duplicate tag names"):
        Vocabulary(tags=["a", "a"], classes=["b"])


def test_identical_captions_can_count_as_matches():
    import dataclasses

    torch.manual_seed(0)
    model = DynRefer(DynReferConfig.tiny()).eval()
    pixel_values, boxes, _, tags = batch(model, 2)
    captions = ["a black dog", "a black dog"]
    plain = model(pixel_values, boxes, captions, tags, controls=["|", "|"]).losses["rtc"]
    model.config = dataclasses.replace(model.config, rtc_same_caption_positive=True)
    merged = model(pixel_values, boxes, captions, tags, controls=["|", "|"]).losses["rtc"]
    # Off-diagonal pairs flip from negative to positive labels; with b = -10 that raises the loss.
    assert merged.item() > plain.item() + 1.0


def test_region_text_loss_can_match_other_texts_than_the_captions(tiny_model):
    pixel_values, boxes, captions, tags = batch(tiny_model, 2)
    controls = ["|", "|"]
    plain = tiny_model(pixel_values, boxes, captions, tags, controls=controls)
    same = tiny_model(pixel_values, boxes, captions, tags, controls=controls, rtc_texts=captions)
    prompts = tiny_model(pixel_values, boxes, captions, tags, controls=controls, rtc_texts=["the man", "the car"])
    assert torch.equal(plain.losses["rtc"], same.losses["rtc"])
    assert not torch.equal(plain.losses["rtc"], prompts.losses["rtc"])
    assert torch.equal(plain.losses["caption"], prompts.losses["caption"])  # captions still train the LM
    with pytest.raises(ValueError, match="1 region-text texts for 2 regions"):
        tiny_model(pixel_values, boxes, captions, tags, controls=controls, rtc_texts=["the man"])


def test_tag_focusing_exponent_is_configurable():
    import dataclasses

    torch.manual_seed(0)
    model = DynRefer(DynReferConfig.tiny()).eval()
    pixel_values, boxes, captions, tags = batch(model, 2)
    release = model(pixel_values, boxes, captions, tags, controls=["|", "|"]).losses["tag"]
    model.config = dataclasses.replace(model.config, tag_gamma_neg=1.0)
    softer = model(pixel_values, boxes, captions, tags, controls=["|", "|"]).losses["tag"]
    # Random logits put most negatives near p = 0.5: (p_m)^1 mutes them far less than (p_m)^7.
    assert softer.item() > 5 * release.item()


def test_fusion_position_table_makes_token_order_visible():
    from dynrefer_core.modeling.fusion import ViewFusion
    from dynrefer_core.modeling.vision import sincos_position_embedding

    torch.manual_seed(0)
    grid, c = 4, 16
    cls, maps = torch.randn(2, 3, c), torch.randn(2, 3, c, grid, grid)
    shuffled = maps.flatten(3)[..., torch.randperm(grid * grid)].reshape(maps.shape)
    plain, placed = ViewFusion(c, 3), ViewFusion(c, 3, grid, position_embedding=True)
    placed.mlp.load_state_dict(plain.mlp.state_dict())
    assert placed.position_embedding.shape == (1 + grid * grid, c)
    assert torch.equal(placed.position_embedding.data, sincos_position_embedding(grid, c))
    added = placed(cls, maps) - plain(cls, maps)
    assert torch.allclose(added, placed.position_embedding.detach().expand(2, -1, -1), atol=1e-6)
    # Without the table the token set is the same after shuffling the map; with it, it is not.
    same_set = lambda a, b: torch.allclose(a.sort(dim=1).values, b.sort(dim=1).values, atol=1e-6)  # noqa: E731
    assert same_set(plain(cls, maps), plain(cls, shuffled))
    assert not same_set(placed(cls, maps), placed(cls, shuffled))
    assert DynRefer(DynReferConfig.mini()).fusion.position_embedding is not None
    assert DynReferConfig.official_flant5xl().fusion_position_embedding is False  # the release has none
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(4, 10)


def test_conv_stem_gives_the_same_token_grid_and_round_trips(tmp_path):
    from dynrefer_core.modeling.vision import ConvStem

    torch.manual_seed(0)
    config = dataclasses.replace(DynReferConfig.tiny(), vision_stem="conv")
    net = DynRefer(config).eval()
    stem = net.vision.vit.embeddings.patch_embedding
    assert isinstance(stem, ConvStem)
    s, g, c = config.image_size, config.grid_size, config.vision_width
    pixels = torch.randn(2, 3, s, s)
    assert stem(pixels).shape == (2, c, g, g)
    # A token sees its own P x P patch and, through the 3 x 3 convolution, P/2 px around it: changing the
    # top-left patch changes the top-left 2 x 2 tokens and no other.
    changed = pixels.clone()
    changed[:, :, :config.patch_size, :config.patch_size] += 1.0
    diff = (stem(changed) - stem(pixels)).abs().sum(dim=(0, 1))
    assert diff[:2, :2].gt(0).all() and diff[2:].eq(0).all() and diff[:, 2:].eq(0).all()
    # From scratch the stem keeps its fan-in initialisation (std 0.02 would shrink the signal layer by layer).
    first = stem.layers[0].weight.detach().clone()
    assert net.init_from_scratch() is net
    assert torch.equal(stem.layers[0].weight, first)
    assert net.vision.vit.encoder.layers[0].mlp.fc1.weight.std() < 0.03
    inputs = batch(net, n=2)
    with torch.inference_mode():
        z = net.encode_regions(inputs[0], inputs[1])
        again = DynRefer.from_pretrained(net.save_pretrained(tmp_path / "stem"), device="cpu")
        assert again.config.vision_stem == "conv"
        assert torch.equal(again.encode_regions(inputs[0], inputs[1]), z)
    with pytest.raises(ValueError, match="vision_stem='conv' needs an even patch_size"):
        dataclasses.replace(DynReferConfig.tiny(), vision_stem="conv", patch_size=7, image_size=63).validate()
    with pytest.raises(ValueError, match="use 'linear' or 'conv'"):
        dataclasses.replace(DynReferConfig.tiny(), vision_stem="cnn").validate()
