"""Benchmark DynRefer.describe(): regions/s and per-region latency for 1, 8 and 64 regions, peak memory.

    python bench/bench_model.py --preset tiny                              # CPU, random tiny model
    python bench/bench_model.py --preset official --random-weights         # GPU, bf16, ~4.1 B params
    python bench/bench_model.py --analytic                                 # parameter count / memory only
    python bench/bench_model.py --checkpoint checkpoints/mini --device cpu --decoders-only  # fast vs hf captions

Decoders: the caption stage is also timed with both decoders ("hf" = transformers' generate, "fast" = our
static-cache beam search) on the same region tokens z and controls, interleaved run by run so that a loaded
machine slows both alike; the captions are asserted equal in fp32 (in bf16 the table gives the share that
agrees). A trained checkpoint (`--checkpoint`) decodes its real
captions (natural lengths) on assets/scenes; random presets force `max_new_tokens` steps.

The official preset is built from its config with random weights (nothing is downloaded): timing does not
depend on the weight values, except through caption length, so decoding is forced to exactly
`max_new_tokens` steps (min_new_tokens = max_new_tokens) for every preset; real captions stop earlier.
Physical floors printed next to the measurements: the ViT FLOPs per region (2 * ViT params * tokens *
views) and the bytes of T5 weights read per decoding step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynrefer_core import runtime  # noqa: E402
from dynrefer_core.config import DynReferConfig  # noqa: E402
from dynrefer_core.modeling.dynrefer import DynRefer  # noqa: E402

PHOTO_FALLBACK_SIZE = (640, 480)


def photo():
    try:
        from matplotlib import cbook

        return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except Exception:  # a random image is as good for timing
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (*PHOTO_FALLBACK_SIZE[::-1], 3), dtype=np.uint8))


def boxes_for(n: int, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """n varied boxes covering small to large regions, deterministic."""
    g = torch.Generator().manual_seed(n)
    out = []
    for _ in range(n):
        w, h = (0.1 + 0.8 * torch.rand(2, generator=g)).tolist()
        x, y = torch.rand(2, generator=g).tolist()
        x1, y1 = x * (1 - w) * width, y * (1 - h) * height
        out.append((x1, y1, x1 + w * width, y1 + h * height))
    return out


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def analytic(config: DynReferConfig) -> str:
    """Parameter counts per block and weight memory, from a model built on the meta device."""
    with torch.device("meta"):
        model = DynRefer(config, compute_tables=False)
    blocks = [("ViT + ln_vision (frozen)", model.vision), ("alignment", model.align), ("fusion MLP", model.fusion),
              ("Q-Former + queries", model.qformer), ("tag decoder", model.tag_decoder),
              ("region-text decoder", model.rtc_decoder), ("T5 (frozen)", model.language.t5),
              ("t5_proj + cem_memory", [model.language.proj, model.language.control_memory]),
              ("text encoder (frozen)", model.text_encoder)]
    rows = ["| block | parameters |", "|---|---:|"]
    for name, block in blocks:
        n = sum(count(b) if isinstance(b, torch.nn.Module) else b.numel() for b in block) \
            if isinstance(block, list) else count(block)
        rows.append(f"| {name} | {n / 1e6:,.1f} M |")
    total, trainable = count(model), sum(p.numel() for p in model.trainable_parameters())
    frozen = total - trainable
    rows.append(f"| **total** | **{total / 1e9:.3f} B** ({trainable / 1e6:.1f} M trainable) |")
    tables = (4585 + 80 + 474) * config.text_embed_dim * 4  # RAM tags, COCO prompts, OVAD prompts, fp32
    rows += ["", f"- weights, all bf16: {total * 2 / 2**30:.2f} GiB",
             f"- weights as placed by `place()` on CUDA (frozen towers bf16, trainable blocks fp32): "
             f"{(frozen * 2 + trainable * 4) / 2**30:.2f} GiB",
             f"- text tables for the RAM vocabulary (4585 tags + 80 classes + 474 attribute prompts): "
             f"{tables / 2**20:.0f} MiB",
             f"- ViT work per region ({config.n_views} views): "
             f"{2 * count(model.vision) * (config.grid_size**2 + 1) * config.n_views / 1e12:.2f} TFLOP"]
    return "\n".join(rows)


def build(preset: str, device: torch.device) -> DynRefer:
    config = DynReferConfig.tiny() if preset == "tiny" else DynReferConfig.official_flant5xl()
    torch.manual_seed(0)
    with device:  # build where it will run: the official preset is 16 GB in fp32
        model = DynRefer(config)
    return model.place(device).eval()


def compare_decoders(model: DynRefer, image, n: int, repeats: int, batch_size: int, force_length: bool) -> dict:
    """Caption stage (generate_captions on fixed z and controls) with decoder "hf" and "fast", interleaved;
    median ms per call of `n` regions (chunks of `batch_size`), and the captions asserted equal."""
    from PIL import Image

    from dynrefer_core.describe import describe_views
    from dynrefer_core.views import ViewOptions, load_image, prepare

    image = load_image(image)
    width, height = image.size if isinstance(image, Image.Image) else Image.open(image).size
    rendered = prepare(image, boxes_for(n, width, height), ViewOptions().resolve(model.config), model.config.image_size)
    with torch.inference_mode(), model.autocast():
        z = model.encode_regions(rendered.pixel_values.to(model.device), rendered.boxes.to(model.device))
    controls = describe_views(model, rendered.pixel_values, rendered.boxes, captions=False).controls
    extra = {"min_new_tokens": model.config.language.max_new_tokens} if force_length else {}

    def captions(decoder: str) -> tuple[list[str], float]:
        t0 = time.perf_counter()
        texts = []
        with torch.inference_mode(), model.autocast():
            for start in range(0, n, batch_size):
                texts += model.generate_captions(z[start:start + batch_size], controls[start:start + batch_size],
                                                 decoder=decoder, **extra)[0]
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return texts, (time.perf_counter() - t0) * 1000

    times: dict[str, list[float]] = {"hf": [], "fast": []}
    texts = {d: captions(d)[0] for d in times}  # warm-up (and, on CUDA, graph capture)
    agree = sum(a == b for a, b in zip(texts["hf"], texts["fast"])) / n
    if agree < 1 and model.compute_dtype == torch.float32:  # bf16: different kernels may flip near-ties
        raise AssertionError(f"decoders disagree in fp32: {texts['hf'][:3]} vs {texts['fast'][:3]}")
    for _ in range(repeats):
        for decoder in times:
            got, ms = captions(decoder)
            assert got == texts[decoder], f"{decoder} changed its captions between runs"
            times[decoder].append(ms)
    hf, fast = statistics.median(times["hf"]), statistics.median(times["fast"])
    return {"n": n, "hf_ms": hf, "fast_ms": fast, "example": texts["fast"][0], "agree": agree,
            "ratios": sorted(h / f for h, f in zip(times["hf"], times["fast"]))}


def decoder_table(model: DynRefer, image, sizes: list[int], repeats: int, batch_size: int, force_length: bool) -> None:
    print("\n## Caption stage, decoder \"hf\" (generate) vs \"fast\" (static-cache beam search)\n")
    print("| regions | hf ms / region | fast ms / region | hf regions / s | fast regions / s | speed-up (median) |"
          " speed-up per run (min..max) | same captions | example caption |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in sizes:
        r = compare_decoders(model, image, n, repeats, batch_size, force_length)
        print(f"| {n} | {r['hf_ms'] / n:.2f} | {r['fast_ms'] / n:.2f} | {1000 * n / r['hf_ms']:.1f} | "
              f"{1000 * n / r['fast_ms']:.1f} | {r['hf_ms'] / r['fast_ms']:.2f}x | "
              f"{r['ratios'][0]:.2f}..{r['ratios'][-1]:.2f} | {r['agree']:.0%} | {r['example']} |")


def measure(model: DynRefer, image, n: int, repeats: int, batch_size: int) -> dict:
    from PIL import Image

    width, height = Image.open(image).size if isinstance(image, (str, Path)) else image.size
    boxes = boxes_for(n, width, height)
    steps = model.config.language.max_new_tokens
    kwargs = dict(phrases=["a person", "a red car"], batch_size=batch_size, min_new_tokens=steps)
    model.describe(image, boxes, **kwargs)  # warm-up (kernels, allocator)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = model.describe(image, boxes, **kwargs)
        runs.append((time.perf_counter() - t0) * 1000)
        stages = results[0].timings  # of the last run
    total = statistics.median(runs)
    peak = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else None
    return {"n": n, "total_ms": total, "per_region_ms": total / n, "regions_s": 1000 * n / total, "stages": stages,
            "peak_gib": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "official"], default="tiny")
    parser.add_argument("--random-weights", action="store_true", help="required for --preset official")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--sizes", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="regions per forward pass")
    parser.add_argument("--analytic", action="store_true", help="only print the official preset's sizes")
    parser.add_argument("--checkpoint", default=None, help="a trained model (checkpoints/mini) instead of a preset")
    parser.add_argument("--decoders-only", action="store_true", help="only the fast-vs-hf caption comparison")
    args = parser.parse_args(argv)

    print("## Official preset (FlanT5-XL), computed on the meta device\n")
    print(analytic(DynReferConfig.official_flant5xl()))
    if args.analytic:
        return 0
    device = runtime.choose_device(args.device)
    if args.preset == "official":
        if not args.random_weights:
            print("error: --preset official needs --random-weights (this script never downloads weights)",
                  file=sys.stderr)
            return 2
        if device.type != "cuda":
            print("error: the official preset (~4.1 B parameters, 16 GB to build in fp32) is benchmarked on a GPU "
                  "only; on CPU use --preset tiny", file=sys.stderr)
            return 2
    if args.checkpoint:
        model = DynRefer.from_pretrained(args.checkpoint, device=device).eval()
        examples = Path(__file__).resolve().parents[1] / "assets"
        image = examples / "scenes" / "s2026_000000.jpg"
    else:
        model, image = build(args.preset, device), photo()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.decoders_only:
        print(f"\n{args.checkpoint or args.preset} on {device}, {torch.get_num_threads()} torch threads")
        decoder_table(model, image, sizes, args.repeats, args.batch_size, force_length=not args.checkpoint)
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} torch threads)"
    c = model.config
    label = args.checkpoint or f"preset {args.preset}"
    print(f"\n## describe() — {label}, {name}, {str(model.compute_dtype).replace('torch.', '')}, "
          f"{c.n_views} views of {c.image_size}px, {c.language.num_beams} beams x {c.language.max_new_tokens} "
          f"tokens, {len(model.vocabulary.tags)} tags\n")
    print("| regions | total ms | ms / region | regions / s | views ms | vision ms | heads ms | caption ms |"
          " peak GPU GiB | ViT TFLOP/s | T5 GB/s per step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    vit_flop = 2 * count(model.vision) * (c.grid_size**2 + 1) * c.n_views
    decoder_bytes = sum(p.numel() * p.element_size() for n, p in model.language.t5.named_parameters()
                        if not n.startswith("encoder."))
    for n in sizes:
        r = measure(model, image, n, args.repeats, args.batch_size)
        s = r["stages"]
        chunks = -(-n // args.batch_size)
        vit_tflops = n * vit_flop / (s["vision"] / 1000) / 1e12
        t5_gbs = chunks * c.language.max_new_tokens * decoder_bytes / (s["caption"] / 1000) / 1e9
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "–"
        print(f"| {n} | {r['total_ms']:.0f} | {r['per_region_ms']:.1f} | {r['regions_s']:.1f} | {s['views']:.0f} | "
              f"{s['vision']:.0f} | {s['heads']:.0f} | {s['caption']:.0f} | {peak} | {vit_tflops:.3g} | {t5_gbs:.3g} |")
    print(f"\nFloors: ViT {vit_flop / 1e12:.3g} TFLOP per region; the T5 decoder reads "
          f"{decoder_bytes / 1e9:.3g} GB of weights per decoding step (per batch of up to {args.batch_size} regions, "
          "times the beams' KV traffic).")
    decoder_table(model, image, sizes, args.repeats, args.batch_size, force_length=not args.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
