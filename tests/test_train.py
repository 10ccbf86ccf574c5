"""Training: schedule, parameter groups, a few real steps of the tiny config, reproducibility and resume."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dynrefer_core import optim
from dynrefer_core import scratch_probes as P
from dynrefer_core import train as T
from dynrefer_core.data.generate import generate
from dynrefer_core.data.sampling import EpochSampler
from dynrefer_core.train_config import DataConfig, GenerateConfig, ModelConfig, TrainConfig, TrainLoopConfig


def test_warmup_really_warms_up_then_cosine():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, warmup_start_lr=0.0, max_steps=110)
    assert optim.lr_at(0, **kw) == 0.0  # starts at warmup_start_lr, not at the peak (the release's no-op)
    assert optim.lr_at(5, **kw) == pytest.approx(5e-4)
    assert optim.lr_at(10, **kw) == pytest.approx(1e-3)
    assert optim.lr_at(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way down the cosine
    assert optim.lr_at(110, **kw) == pytest.approx(1e-5)
    lrs = [optim.lr_at(s, **kw) for s in range(111)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_groups_follow_the_release():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)
            self.ln_final = torch.nn.LayerNorm(4)
            self.query = torch.nn.Parameter(torch.zeros(1, 2, 4))
            self.scale = torch.nn.Parameter(torch.zeros(()))
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    m = M()
    decay, no_decay = optim.param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(m.fc.weight), id(m.query)}
    assert ids(no_decay) == {id(m.fc.bias), id(m.ln_final.weight), id(m.ln_final.bias), id(m.scale)}


def test_config_overrides_and_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"lr": 0.1}}))
    cfg = T.load_config(p, ["train.max_steps=7", "model.overrides={n_views: 2}"])
    assert cfg.train.lr == 0.1 and cfg.train.max_steps == 7 and cfg.model.overrides == {"n_views": 2}
    assert cfg.train.batch_size == TrainLoopConfig().batch_size
    with pytest.raises(ValueError, match="unknown config keys"):
        T.load_config(p, ["train.lrate=1"])


def test_config_values_are_typed(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config keys \['train.lrate', 'seeed'\]; known: seed, out_dir"):
        T.load_config(None, ["train.lrate=1", "seeed=1"])
    for bad, message in [("train.lr=abc", "train.lr must be a number, got 'abc'"),
                         ("train.max_steps=2.5", "train.max_steps must be int"),
                         ("train.val_meteor=1", "train.val_meteor must be bool"),
                         ("train.betas=[0.9, x]", r"train.betas\[1\] must be a number"),
                         ("data.generate={seed: 1}", r"data.generate lacks \['num_images'\]"),
                         ("train=5", "train must be a mapping")]:
        with pytest.raises(ValueError, match=message):
            T.load_config(None, [bad])
    cfg = T.load_config(None, ["train.lr=1e-3", "train.grad_clip=2", "data.generate={seed: 3, num_images: 5}"])
    assert cfg.train.lr == 1e-3 and cfg.train.grad_clip == 2.0  # YAML reads 1e-3 as a string
    assert cfg.data.generate == GenerateConfig(seed=3, num_images=5, split="all", workers=1)
    with pytest.raises(ValueError, match="lr must be a number"):
        dataclasses.replace(cfg.train, lr="fast")


@pytest.mark.parametrize("path", ["configs/mini.yaml", "checkpoints/mini/train_config.yaml",
                                  "bench/results/mini_trained_1view/train_config.yaml"])
def test_shipped_configs_load_and_saved_ones_round_trip(path):
    file = Path(__file__).parents[1] / path
    cfg = T.load_config(file)
    assert cfg.model.dynrefer_config().vision_stem == "conv" and cfg.train.encoder_probe_weight == 1.0
    if path.endswith("train_config.yaml"):  # what train() writes: the same file again
        assert yaml.safe_dump(cfg.to_dict(), sort_keys=False) == file.read_text()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinydata")
    generate(21, 10, out)
    return out / "annotations.json"


def tiny_cfg(data, out, **train):
    loop = dict(max_steps=4, batch_size=4, lr=1e-3, warmup_steps=2, log_every=1, eval_every=4, save_every=2,
                val_regions=4, threads=1)
    return TrainConfig(out_dir=str(out), data=DataConfig(annotations=str(data)), model=ModelConfig(preset="tiny"),
                       train=TrainLoopConfig(**{**loop, **train}))


def _log_losses(out):
    lines = (out / "train_log.txt").read_text().splitlines()
    return [ln.split(" | ")[0].split("grad_norm")[1] for ln in lines if "grad_norm" in ln]


@pytest.mark.slow
def test_tiny_training_runs_logs_saves_and_reproduces(tiny_data, tmp_path):
    last = T.train(tiny_cfg(tiny_data, tmp_path / "a", calibrate_tag_threshold=True))
    out = tmp_path / "a"
    assert (out / "trainer_state.pt").is_file() and (out / "train_config.yaml").is_file()
    log = (out / "train_log.txt").read_text()
    assert "step 4/4" in log and "val@4" in log and "caption" in log and "rtc" in log
    assert math.isfinite(last["loss"]) and "val_tag_f1" in last
    thr = json.loads((out / "config.json").read_text())["tag_threshold"]
    assert f"-> {thr} (val tag F1" in log and 0.1 <= thr <= 0.95
    T.train(tiny_cfg(tiny_data, tmp_path / "b", calibrate_tag_threshold=True))
    assert _log_losses(out) == _log_losses(tmp_path / "b")  # same seed, same numbers
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_resume_continues_exactly(tiny_data, tmp_path, dtype):
    from dynrefer_core.runtime import cpu_has_native_bf16

    if dtype == "bf16" and not cpu_has_native_bf16():
        pytest.skip("bf16 on this CPU falls back to fp32 (configs/mini.yaml trains in bf16 where it can)")
    T.train(tiny_cfg(tiny_data, tmp_path / "full", eval_every=0, dtype=dtype))
    # the same 4-step run, interrupted after step 2 (state saved there), then resumed
    T.train(tiny_cfg(tiny_data, tmp_path / "half", eval_every=0, dtype=dtype), stop_after=2)
    assert torch.load(tmp_path / "half" / "trainer_state.pt", weights_only=False)["step"] == 2
    T.train(tiny_cfg(tiny_data, tmp_path / "half", eval_every=0, dtype=dtype), resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact
    assert "resumed from" in (tmp_path / "half" / "train_log.txt").read_text()
    assert ("dtype torch.bfloat16" in (tmp_path / "full" / "train_log.txt").read_text()) == (dtype == "bf16")
    assert _log_losses(tmp_path / "full")[2:] == _log_losses(tmp_path / "half")[2:]


def test_text_encoder_cache_embeds_each_new_text_once():
    from dynrefer_core.config import DynReferConfig
    from dynrefer_core.modeling.text import TextEncoder
    from dynrefer_core.modeling.tokenization import build_word_tokenizer

    torch.manual_seed(0)
    encoder = TextEncoder(DynReferConfig.tiny(), build_word_tokenizer(["ab c", "dddd"], 64), cache=True)
    batch_sizes = []
    encoder.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    first = encoder.encode(["ab", "c", "ab"])
    second = encoder.encode(["c", "dddd"])
    assert batch_sizes == [2, 1]  # "ab" and "c" together, then "dddd" alone
    assert torch.equal(first[0], first[2]) and torch.equal(second[0], first[1])
    encoder.use_cache(False)
    assert torch.equal(encoder.encode(["ab", "c"]), first[:2]) and batch_sizes == [2, 1, 2]
    assert encoder.encode([]).shape == (0, 32)


@pytest.mark.slow
def test_resume_is_bit_exact_mid_epoch_and_at_the_epochs_end(tiny_data, tmp_path):
    kw = dict(eval_every=0, batch_size=8, max_steps=7, save_every=100)  # 6 steps an epoch (52 regions)
    T.train(tiny_cfg(tiny_data, tmp_path / "full", **kw))
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    for stop, epoch in [(3, 0), (6, 0)]:
        T.train(tiny_cfg(tiny_data, tmp_path / f"at{stop}", **kw), stop_after=stop)
        state = torch.load(tmp_path / f"at{stop}" / "trainer_state.pt", weights_only=False)
        assert (state["epoch"], state["batch_in_epoch"]) == (epoch, stop)
        T.train(tiny_cfg(tiny_data, tmp_path / f"at{stop}", **kw), resume=True)
        resumed = load_file(str(tmp_path / f"at{stop}" / "model.safetensors"))
        assert [k for k in full if not torch.equal(full[k], resumed[k])] == [], f"resumed after step {stop}"
        assert _log_losses(tmp_path / "full")[stop:] == _log_losses(tmp_path / f"at{stop}")[stop:]


def test_region_texts_hold_every_text_a_sample_can_give(tiny_data):
    """The trainer embeds these up front, so that no text is first embedded mid-run (see the test above)."""
    from dynrefer_core.config import DynReferConfig
    from dynrefer_core.data.annotations import load_annotations
    from dynrefer_core.data.dataset import RegionDataset
    from dynrefer_core.views import ViewOptions

    train_ann = load_annotations(tiny_data).split("train")
    views = ViewOptions(strategy="random").resolve(DynReferConfig.tiny())
    ds = RegionDataset(train_ann, ["red"], image_size=112, views=views, class_prompt_ratio=0.5)
    texts = ds.region_texts()
    given = {ds[i].rtc_text for i in range(len(ds))}
    assert len(texts) == len(set(texts)) and given <= set(texts)
    assert any(t.startswith("the ") for t in given) and {r.caption for r in train_ann.regions} <= set(texts)


@pytest.mark.slow
def test_encoder_warm_up_trains_the_encoder_only_then_the_method_takes_over(tiny_data, tmp_path):
    from dynrefer_core.data.annotations import load_annotations
    from dynrefer_core.data.dataset import RegionDataset
    from dynrefer_core.views import ViewOptions

    cfg = tiny_cfg(tiny_data, tmp_path / "w", encoder_warmup_steps=3, encoder_warmup_lr=1e-2, log_every=1)
    train_ann = load_annotations(tiny_data).split("train")
    torch.manual_seed(0)
    model = T.build_model(cfg, train_ann).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = RegionDataset(train_ann, model.vocabulary.tags, image_size=model.config.image_size,
                       views=ViewOptions(strategy="random").resolve(model.config))
    lines = []
    warm = P.EncoderWarmup(model, len(model.vocabulary.tags))
    P.warm_up_encoder(warm, ds, EpochSampler(len(ds), 0), cfg, torch.device("cpu"), lines.append)
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"fusion", "qformer"} <= changed <= {"vision", "align", "fusion", "qformer"}  # the encoder only
    assert "probe" not in " ".join(model.state_dict())  # the probe is not part of the model
    assert lines[0].startswith("encoder warm-up: 3 steps") and lines[-1].startswith("encoder warm-up 3/3")

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train_log.txt").write_text("an older run\n")
    T.train(cfg)  # in a run: the warm-up is logged before the method's steps, and the run completes
    log = (tmp_path / "w" / "train_log.txt").read_text()
    assert "an older run" not in log  # a fresh run starts a fresh log
    assert log.index("encoder warm-up 3/3") < log.index("step 1/4") and "step 4/4" in log


def test_context_probe_trains_the_vit_through_the_context_views(tiny_data, tmp_path):
    """With the release's alignment init (m = 0) the context RoI maps get no gradient through z (only the
    context views' CLS tokens do); the context probe reaches them directly, and its loss adds to z's."""
    from dynrefer_core.data.annotations import load_annotations
    from dynrefer_core.data.dataset import RegionDataset, collate_regions
    from dynrefer_core.views import ViewOptions

    cfg = tiny_cfg(tiny_data, tmp_path / "w")
    train_ann = load_annotations(tiny_data).split("train")
    torch.manual_seed(0)
    model = T.build_model(cfg, train_ann).train()
    assert model.config.align_modulation_init == 0.0  # tiny keeps the release's init
    ds = RegionDataset(train_ann, model.vocabulary.tags, image_size=model.config.image_size,
                       views=ViewOptions(strategy="random").resolve(model.config))
    batch = collate_regions([ds[i] for i in range(4)])
    inputs = batch.model_inputs()
    torch.manual_seed(1)
    plain = P.EncoderWarmup(model, len(model.vocabulary.tags))
    both = P.EncoderWarmup(model, len(model.vocabulary.tags), context_probe=True)
    both.probe.load_state_dict(plain.probe.state_dict())
    with torch.no_grad():
        assert float(both(**inputs)) > float(plain(**inputs)) > 0

    rois = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        rois.append(out)

    hook = model.vision.roi_align.register_forward_hook(keep)
    plain(**inputs).backward()
    both(**inputs).backward()
    hook.remove()
    n, v = inputs["pixel_values"].shape[:2]
    g_plain, g_both = (r.grad.reshape(n, v, -1).abs().sum(dim=(0, 2)) for r in rois)
    assert g_plain[0] > 0 and torch.all(g_plain[1:] == 0)  # z: the reference map only
    assert torch.all(g_both[1:] > 0) and both.context_probe.weight.grad.abs().sum() > 0
    assert "probe" not in " ".join(model.state_dict())


@pytest.mark.slow
def test_probe_loss_kept_in_the_main_phase_adds_to_the_methods_losses_and_resumes(tiny_data, tmp_path):
    from dynrefer_core.data.annotations import load_annotations
    from dynrefer_core.data.dataset import RegionDataset, collate_regions
    from dynrefer_core.views import ViewOptions

    # the objective: the model's own three losses on the same draw, plus weight x the probes' loss
    cfg = tiny_cfg(tiny_data, tmp_path / "o")
    train_ann = load_annotations(tiny_data).split("train")
    torch.manual_seed(0)
    model = T.build_model(cfg, train_ann).eval()  # no dropout: both paths see the same features
    ds = RegionDataset(train_ann, model.vocabulary.tags, image_size=model.config.image_size,
                       views=ViewOptions(strategy="random").resolve(model.config))
    inputs = collate_regions([ds[i] for i in range(4)]).model_inputs()
    warm = P.EncoderWarmup(model, len(model.vocabulary.tags), context_probe=True)
    with torch.no_grad():
        torch.manual_seed(5)
        plain = model(**inputs)
        torch.manual_seed(5)
        probed = P.ProbedObjective(warm, 0.5)(**inputs)
        probe = float(warm(**inputs))
    assert set(probed.losses) == {"caption", "tag", "rtc", "probe"}
    for k in ("caption", "tag", "rtc"):
        assert torch.allclose(probed.losses[k], plain.losses[k], atol=1e-6)
    assert float(probed.losses["probe"]) == pytest.approx(0.5 * probe, rel=1e-5) and probe > 0
    assert float(probed.loss) == pytest.approx(float(plain.loss) + 0.5 * probe, rel=1e-5)

    # in training: the part is logged, the probes (not in the model) are saved, and --resume is exact
    kw = dict(eval_every=0, encoder_warmup_steps=2, encoder_warmup_context_probe=True, encoder_probe_weight=0.5)
    T.train(tiny_cfg(tiny_data, tmp_path / "full", **kw))
    assert "probe" in (tmp_path / "full" / "train_log.txt").read_text().split("grad_norm")[-1]
    assert "probe" not in " ".join(load_file(str(tmp_path / "full" / "model.safetensors")))
    T.train(tiny_cfg(tiny_data, tmp_path / "half", **kw), stop_after=2)
    state = torch.load(tmp_path / "half" / "trainer_state.pt", weights_only=False)
    assert set(state["probes"]) == {"probe.weight", "probe.bias", "context_probe.weight", "context_probe.bias"}
    T.train(tiny_cfg(tiny_data, tmp_path / "half", **kw), resume=True)
    assert _log_losses(tmp_path / "full")[2:] == _log_losses(tmp_path / "half")[2:]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    T.train(tiny_cfg(tiny_data, tmp_path / "plain", eval_every=0), stop_after=2)
    with pytest.raises(ValueError, match="holds no probe weights"):
        T.train(tiny_cfg(tiny_data, tmp_path / "plain", **kw), resume=True)


def test_object_probe_reads_the_other_objects_in_the_context_views(tiny_data, tmp_path):
    from dynrefer_core.data.annotations import load_annotations
    from dynrefer_core.data.dataset import RegionDataset, collate_regions
    from dynrefer_core.views import ViewOptions

    cfg = tiny_cfg(tiny_data, tmp_path / "w")
    train_ann = load_annotations(tiny_data).split("train")
    classes = list(train_ann.categories)
    torch.manual_seed(0)
    model = T.build_model(cfg, train_ann).eval()
    ds = RegionDataset(train_ann, model.vocabulary.tags, image_size=model.config.image_size,
                       views=ViewOptions(strategy="random").resolve(model.config), object_classes=classes)
    batch = collate_regions([ds[i] for i in range(4)])
    assert len(batch.context_objects) > 0
    inputs = batch.model_inputs()
    plain = P.EncoderWarmup(model, len(model.vocabulary.tags))
    probed = P.EncoderWarmup(model, len(model.vocabulary.tags), object_classes=len(classes), object_weight=2.0)
    probed.probe.load_state_dict(plain.probe.state_dict())
    with torch.no_grad():
        z, rois, grid = probed.encode(inputs["pixel_values"], inputs["boxes"])
        assert grid.shape == rois.shape  # the whole token map of every view, (N, n, C, G, G)
        ce = float(probed.object_loss(grid, batch.context_objects))
        assert float(probed(**inputs, context_objects=batch.context_objects)) == pytest.approx(
            float(plain(**inputs)) + 2.0 * ce, rel=1e-5)
    with pytest.raises(ValueError, match="context_objects"):
        probed(**inputs)

    # the object loss alone trains the ViT, through the context views only (view 0 holds no other objects)
    z, rois, grid = probed.encode(inputs["pixel_values"], inputs["boxes"])
    grid.retain_grad()
    probed.object_loss(grid, batch.context_objects).backward()
    per_view = grid.grad.abs().sum(dim=(0, 2, 3, 4))
    assert per_view[0] == 0 and torch.all(per_view[1:] > 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    assert probed.object_probe.weight.grad.abs().sum() > 0

    # in training: logged, its weights saved with the other probes; refused where no warm-up probe runs
    kw = dict(eval_every=0, encoder_warmup_steps=2, encoder_object_probe_weight=1.0, encoder_probe_weight=0.5)
    T.train(tiny_cfg(tiny_data, tmp_path / "full", **kw))
    log = (tmp_path / "full" / "train_log.txt").read_text()
    assert "object probe" in log and "step 4/4" in log
    state = torch.load(tmp_path / "full" / "trainer_state.pt", weights_only=False)
    assert {"object_probe.weight", "object_probe.bias"} <= set(state["probes"])
    assert state["probes"]["object_probe.weight"].shape[0] == len(classes)
    with pytest.raises(ValueError, match="probe of the encoder warm-up"):
        T.train(tiny_cfg(tiny_data, tmp_path / "none", encoder_object_probe_weight=1.0))
