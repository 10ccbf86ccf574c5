"""The static-cache beam search (decoder="fast") against transformers' `generate` (decoder="hf"), fp32, CPU:
same token sequences, sequences_scores within 1e-5 (relative and absolute), for every generation setting the
presets use; graph safety of the step (one compiled graph per caption, fixed buffer addresses)."""
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from dynrefer_core.config import DynReferConfig
from dynrefer_core.describe import describe_views
from dynrefer_core.modeling.decoding import BeamSearch, BeamSettings, beam_search, bucket
from dynrefer_core.modeling.dynrefer import DynRefer
from dynrefer_core.modeling.language import LanguageDecoder
from dynrefer_core.views import ViewOptions, load_image, prepare

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "checkpoints" / "mini"

# (num_beams, max_new_tokens, min_length, length_penalty, repetition_penalty, min_new_tokens):
# official config, release demo, code defaults with length_penalty 1, the mini preset, bench_model's
# forced length, and a min_length that bans EOS for a while.
SETTINGS = {
    "official": dict(num_beams=2, max_new_tokens=20, min_length=1, length_penalty=0.0, repetition_penalty=1.5),
    "demo": dict(num_beams=5, max_new_tokens=30, min_length=1, length_penalty=0.0, repetition_penalty=1.5),
    "code_lp1": dict(num_beams=5, max_new_tokens=10, min_length=1, length_penalty=1.0, repetition_penalty=1.0),
    "mini": dict(num_beams=2, max_new_tokens=16, min_length=1, length_penalty=0.0, repetition_penalty=1.0),
    "bench": dict(num_beams=2, max_new_tokens=8, min_length=1, length_penalty=0.0, repetition_penalty=1.5,
                  min_new_tokens=8),
    "min_length": dict(num_beams=2, max_new_tokens=12, min_length=6, length_penalty=1.0, repetition_penalty=1.5),
}


def reference(t5, inputs, mask, setting: dict):
    return t5.generate(inputs_embeds=inputs, attention_mask=mask, do_sample=False, num_return_sequences=1,
                       output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0, **setting)


def assert_same(t5, inputs, mask, setting: dict, cache: dict | None = None, **kwargs):
    """Fast == generate: sequences, sequences_scores, and the number of steps (generate stops early too)."""
    want = reference(t5, inputs, mask, setting)
    cache = {} if cache is None else cache
    got, scores = beam_search(t5, inputs, mask, BeamSettings.resolve(setting), cache=cache, **kwargs)
    assert torch.equal(got, want.sequences), f"{setting}: sequences differ"
    torch.testing.assert_close(scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
    (search,) = cache.values()
    assert int(search.cur_len) - 1 == len(want.scores), "not the same number of steps"
    return want.sequences


@pytest.fixture(scope="module")
def tiny_t5():
    """A random Flan-layout T5 (gated exact GELU, untied lm_head), sharpened so that beams differ and some
    captions end with EOS at the first step, some later, some never."""
    torch.manual_seed(0)
    t5 = LanguageDecoder(DynReferConfig.tiny()).eval().t5
    with torch.no_grad():
        t5.lm_head.weight.mul_(2.0)
        t5.lm_head.weight[1] *= 1.4
    return t5


def tiny_inputs(n: int, seed: int = 1):
    """n encoder inputs of 14 tokens, every other one with 5 padded tokens (controls of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 14, 32, generator=g)[:n]
    mask = torch.ones(n, 14, dtype=torch.long)
    mask[::2, 9:] = 0
    return inputs, mask


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("n", [1, 3, 64])
def test_tiny_t5_same_as_generate(tiny_t5, name, n):
    inputs, mask = tiny_inputs(n)
    assert_same(tiny_t5, inputs, mask, SETTINGS[name])


def test_tiny_t5_ends_early_and_late(tiny_t5):
    """The case set above really holds captions ending at step 1, at a later step, and at max length."""
    inputs, mask = tiny_inputs(64)
    sequences = assert_same(tiny_t5, inputs, mask, SETTINGS["official"])
    first_eos = torch.where((sequences == 1).any(1), (sequences == 1).int().argmax(1), -1)
    assert (first_eos == 1).any() and ((first_eos > 1) & (first_eos < 20)).any() and (first_eos == -1).any()


@pytest.mark.parametrize("n", [3, 5])
def test_padded_bucket_and_encoder_length(tiny_t5, n):
    """The CUDA layout on the CPU: regions padded to a bucket (repeating the last), encoder padded to 30."""
    inputs, mask = tiny_inputs(n, seed=2)
    cache: dict = {}
    for _ in range(2):  # the second call reuses the search (and would replay its graph)
        assert_same(tiny_t5, inputs, mask, SETTINGS["min_length"], pad_batch=True, enc_len=30, cache=cache)
    (search,) = cache.values()
    assert search.B == bucket(n) > n and search.cross.shape[-2] == 30


def test_a_kept_search_follows_weights_changed_in_place():
    """The fused q|k|v and wi_0|wi_1 copies are refreshed when a weight changes in place (an optimizer step,
    e.g. validation during training), so a kept search never decodes with old weights."""
    torch.manual_seed(3)
    t5 = LanguageDecoder(DynReferConfig.tiny()).eval().t5
    inputs, mask = tiny_inputs(3, seed=4)
    cache: dict = {}
    before = assert_same(t5, inputs, mask, SETTINGS["official"], cache=cache)
    with torch.no_grad():
        for block in t5.decoder.block:
            block.layer[0].SelfAttention.k.weight.mul_(-3.0)
            block.layer[2].DenseReluDense.wi_1.weight.mul_(-2.0)
    after = assert_same(t5, inputs, mask, SETTINGS["official"], cache=cache)
    assert len(cache) == 1 and not torch.equal(before, after)


def test_a_kept_search_follows_weights_replaced():
    """A weight replaced by a new tensor (load_state_dict(assign=True), re-tying) is read again, not the old
    tensor the search's views point to."""
    torch.manual_seed(5)
    t5 = LanguageDecoder(DynReferConfig.tiny()).eval().t5
    inputs, mask = tiny_inputs(3, seed=6)
    cache: dict = {}
    before = assert_same(t5, inputs, mask, SETTINGS["official"], cache=cache)
    block = t5.decoder.block[-1]
    block.layer[0].SelfAttention.o.weight = torch.nn.Parameter(block.layer[0].SelfAttention.o.weight * -4.0)
    t5.lm_head.weight = torch.nn.Parameter(t5.lm_head.weight.flip(0).clone())
    after = assert_same(t5, inputs, mask, SETTINGS["official"], cache=cache)
    assert len(cache) == 1 and not torch.equal(before, after)


def test_settings_outside_the_fast_path():
    base = SETTINGS["official"]
    assert BeamSettings.resolve(base) == BeamSettings(2, 20, 1, 0, 0.0, 1.5)
    assert BeamSettings.resolve({**base, "do_sample": False, "num_return_sequences": 1}) is not None
    for other in ({"num_beams": 1}, {"do_sample": True}, {"num_return_sequences": 2}, {"early_stopping": True},
                  {"no_repeat_ngram_size": 3}, {"max_length": 10}):
        assert BeamSettings.resolve({**base, **other}) is None, other
    assert [bucket(n) for n in (1, 3, 8, 9, 64, 65)] == [1, 4, 8, 16, 64, 128]


def test_step_compiles_once_and_keeps_addresses(tiny_t5):
    """fullgraph compile, no recompilation over a whole caption; every buffer keeps its data_ptr()."""
    inputs, mask = tiny_inputs(3)
    settings = BeamSettings.resolve(SETTINGS["min_length"])
    with torch.no_grad():
        hidden = tiny_t5.encoder(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    eager = BeamSearch(tiny_t5, settings, 3, 14)
    eager.load(hidden, mask)
    eager.run()
    search = BeamSearch(tiny_t5, settings, 3, 14)
    search.load(hidden, mask)
    buffers = [*search._state(), search.cross, search.enc_bias]
    ptrs = [b.data_ptr() for b in buffers]
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(search.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(settings.max_new_tokens):
            step()
            assert [b.data_ptr() for b in buffers] == ptrs
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert bool(search.done)
    got, want = search.result(3), eager.result(3)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_fast_falls_back_to_generate_for_greedy(tiny_model):
    z = torch.randn(2, tiny_model.config.num_query_tokens, tiny_model.config.qformer_hidden)
    with torch.no_grad():
        fast = tiny_model.generate_captions(z, ["|", "man,white shirt|"], num_beams=1)
        hf = tiny_model.generate_captions(z, ["|", "man,white shirt|"], decoder="hf", num_beams=1)
    assert fast[0] == hf[0] and torch.equal(fast[1], hf[1])
    with pytest.raises(ValueError, match="decoder"):
        tiny_model.generate_captions(z, ["|", "|"], decoder="vllm")


# ---------------------------------------------------------------------- the bundled model on real regions
@pytest.fixture(scope="module")
def mini():
    """checkpoints/mini on the CPU and its region tokens z with the predicted-tag controls of every example
    box of assets/examples.json."""
    model = DynRefer.from_pretrained(MINI, device="cpu").eval()
    zs, controls = [], []
    for example in json.loads((ROOT / "assets" / "examples.json").read_text()):
        rendered = prepare(load_image(ROOT / "assets" / example["image"]), example["boxes"],
                           ViewOptions().resolve(model.config), model.config.image_size)
        with torch.inference_mode():
            zs.append(model.encode_regions(rendered.pixel_values, rendered.boxes))
        controls += describe_views(model, rendered.pixel_values, rendered.boxes, captions=False).controls
    return model, torch.cat(zs), controls


@pytest.mark.parametrize("name", ["mini", "official", "demo", "code_lp1"])
@pytest.mark.parametrize("n", [1, 3, 64])
def test_mini_model_same_as_generate(mini, name, n):
    model, z, controls = mini
    rows = [i % len(controls) for i in range(n)]
    lm = model.language
    with torch.inference_mode():
        inputs, mask = lm.encoder_inputs(z[rows], [controls[i] for i in rows], model.tokenizer)
        sequences = assert_same(lm.t5, inputs, mask, SETTINGS[name])
        fast = model.generate_captions(z[rows], [controls[i] for i in rows], **SETTINGS[name])
        hf = model.generate_captions(z[rows], [controls[i] for i in rows], decoder="hf", **SETTINGS[name])
    assert fast[0] == hf[0]
    torch.testing.assert_close(fast[1], hf[1], rtol=1e-5, atol=1e-6)
    if n == 64 and name != "code_lp1":  # real captions (10 tokens cut some): ended by EOS, lengths vary
        assert len(set(mask.sum(1).tolist())) > 1
        ends = (sequences == 1).int().argmax(1)
        assert (ends > 1).all() and (ends < SETTINGS[name]["max_new_tokens"]).all() and len(set(ends.tolist())) > 1


def test_mini_describe_fast_equals_hf(mini):
    model = mini[0]
    example = json.loads((ROOT / "assets" / "examples.json").read_text())[0]
    image = load_image(ROOT / "assets" / example["image"])
    fast = model.describe(image, example["boxes"])
    hf = model.describe(image, example["boxes"], decoder="hf")
    assert [r.caption for r in fast] == [r.caption for r in hf] and all(r.caption for r in fast)
    assert [r.caption_score for r in fast] == pytest.approx([r.caption_score for r in hf], rel=1e-5)


def test_check_decoders_script(tmp_path):
    """bench/check_decoders.py end to end on two generated scenes: both decoders agree, the JSON has both rows."""
    import importlib.util

    from dynrefer_core.data.generate import generate

    spec = importlib.util.spec_from_file_location("check_decoders", ROOT / "bench" / "check_decoders.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    annotations = generate(61, 2, tmp_path / "data")
    out = tmp_path / "decoders.json"
    assert check.main(["--checkpoint", str(MINI), "--annotations", str(annotations), "--batch", "8",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["regions_per_call"] for r in rows] == [1, 8] and rows[1]["regions"] == 16
    assert all(r["same_captions"] == r["regions"] and r["max_score_diff"] <= 1e-4 for r in rows)
