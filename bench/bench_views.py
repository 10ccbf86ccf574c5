"""Benchmark view planning and rendering against literal loops written from the spec (§1-§2, §1.4).

    .venv/bin/python bench/bench_views.py            # prints two markdown tables
    .venv/bin/python bench/bench_views.py --only render --repeats 2 --torch-threads 1
    .venv/bin/python bench/bench_views.py --example assets/views_example.png

Planning: plan_views per box and plan_views_batch against a per-candidate loop; rendering: render_views
(distinct crops once, on threads, one batched normalisation) with 1 worker and with its default against a
per-view loop (crop -> v2 resize -> to tensor -> normalise). Both literal loops are written independently from
the library, and every result is asserted identical (selected ts, crop boxes, hash bits; torch.equal pixels)
before timing is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as v2F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dynrefer_core.views import (CLIP_MEAN, CLIP_STD, ViewOptions, contact_sheet, draw_views, plan_views, plan_views_batch,
                                 render_views)


def photo_like(width: int = 1024, height: int = 768, seed: int = 0, noise: float = 4.0) -> Image.Image:
    """A procedural outdoor-looking picture: sky, hills, sun, a house, trees, smooth shading and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([110 + 80 * yy / height, 160 + 60 * yy / height, 235 - 20 * yy / height], -1)
    img = np.broadcast_to(sky, (height, width, 3)).copy()
    for k, (color, base_y) in enumerate((((70, 120, 60), 0.55), ((50, 100, 45), 0.68), ((95, 140, 70), 0.8))):
        ridge = base_y * height + 40 * np.sin(xx[0] / width * (3 + k) * np.pi + rng.uniform(0, 6))
        mask = yy > ridge[None, :]
        img[mask] = np.array(color) * (0.8 + 0.4 * rng.random()) + 15 * np.sin(xx[mask] / 23)[:, None]
    sun = (xx - 0.8 * width) ** 2 + (yy - 0.15 * height) ** 2 < (0.06 * width) ** 2
    img[sun] = (255, 236, 160)
    # A house: wall, roof, door, windows.
    hx, hy, hw, hh = int(0.22 * width), int(0.5 * height), int(0.2 * width), int(0.2 * height)
    img[hy:hy + hh, hx:hx + hw] = (200, 170, 140)
    for r in range(int(0.12 * height)):
        img[hy - r, hx - 10 + r:hx + hw + 10 - r] = (150, 50, 40)
    img[hy + hh // 3:hy + hh, hx + hw // 2 - 15:hx + hw // 2 + 15] = (90, 60, 40)
    for wx in (hx + 25, hx + hw - 65):
        img[hy + 25:hy + 65, wx:wx + 40] = (170, 210, 240)
    # Trees: trunks and round crowns.
    for cx in rng.uniform(0.5, 0.95, 4) * width:
        cy, r = rng.uniform(0.55, 0.7) * height, rng.uniform(0.04, 0.08) * width
        img[int(cy):int(cy + 1.6 * r), int(cx - r / 6):int(cx + r / 6)] = (90, 60, 35)
        crown = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        img[crown] = np.array((40, 110 + rng.integers(0, 50), 40)) + 20 * np.sin(xx[crown] / 5 + yy[crown] / 7)[:, None]
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.2)
    img += rng.normal(0, noise, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def random_boxes(n: int, width: int, height: int, seed: int) -> list[tuple[float, float, float, float]]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        w, h = rng.uniform(8, width * 0.6), rng.uniform(8, height * 0.6)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append((float(x), float(y), float(x + w), float(y + h)))
    return boxes


def literal_plan(image: Image.Image, box, n_views: int = 3):
    """The spec followed literally, one candidate at a time: returns (selected ts, crop boxes, hash bits)."""
    W, H = image.size
    gray = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    b = np.array(box, dtype=np.float32)
    full = np.array([0, 0, W, H], dtype=np.float32)
    ts = [0.0] + [(k + 1) / 10 for k in range(10)]
    crops, hashes = [], []
    for t in ts:
        b_t = b + (full - b) * t
        c = np.clip(b_t, 0, [W, H, W, H]).astype(np.int64)
        c[2], c[3] = max(c[2], c[0] + 1), max(c[3], c[1] + 1)  # boxes here are never thinner than 1 px
        region = cv2.resize(gray[c[1]:c[3], c[0]:c[2]], (224, 224))
        coeffs = cv2.dct(region)[0:8, 0:8]
        mean = coeffs.mean()
        hashes.append(np.array([1 if v > mean else 0 for v in coeffs.ravel()], dtype=np.int8))
        crops.append(tuple(int(v) for v in c))
    scores = [int((hashes[0] ^ hashes[k]).sum()) / ts[k] for k in range(1, 11)]
    chosen: list[int] = []
    for _ in range(n_views - 1):
        best = max((k for k in range(10) if k not in chosen), key=lambda k: (scores[k], -k))
        chosen.append(best)
    return [0.0] + [ts[k + 1] for k in chosen], crops, np.stack(hashes).astype(bool)


def literal_render(image: Image.Image, plans, size: int = 224) -> torch.Tensor:
    """The reference's transform, one view at a time: (N, n, 3, S, S)."""
    rgb = np.asarray(image)
    regions = []
    for plan in plans:
        views = []
        for view in plan.views:
            u1, v1, u2, v2 = view.crop_box
            crop = Image.fromarray(rgb[v1:v2, u1:u2])
            x = v2F.resize(crop, [size, size], interpolation=InterpolationMode.BICUBIC)
            x = v2F.to_dtype(v2F.to_image(x), torch.float32, scale=True)
            views.append(v2F.normalize(x, list(CLIP_MEAN), list(CLIP_STD)))
        regions.append(torch.stack(views))
    return torch.stack(regions)


def same(plan, literal) -> bool:
    ts, crops, hashes = literal
    ours = [plan.base, *plan.candidates]
    return (plan.selected_ts == ts and [v.crop_box for v in ours] == crops
            and np.array_equal(np.stack([v.hash_bits.ravel() for v in ours]), hashes))


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", type=Path, help="write a draw_views + contact_sheet picture here and exit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("plan", "render"), help="run one of the two tables")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    image = photo_like()
    if args.example:
        image = photo_like(noise=0.0)  # no sensor noise: the README picture stays small
        plan = plan_views(image, (300, 330, 420, 470))
        views, sheet = draw_views(image, plan), contact_sheet(image, plan)
        scale = sheet.height / views.height
        views = views.resize((round(views.width * scale), sheet.height), Image.Resampling.LANCZOS)
        out = Image.new("RGB", (views.width + sheet.width, sheet.height), (30, 30, 34))
        out.paste(views, (0, 0))
        out.paste(sheet, (views.width, 0))
        args.example.parent.mkdir(parents=True, exist_ok=True)
        # 256 colours keep the picture sharp at a fraction of the size (it lives in the repository).
        out.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.example, optimize=True)
        print(f"wrote {args.example} ({out.width}x{out.height}); selected_ts={plan.selected_ts}")
        return

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; image {image.width}x{image.height}; best of {args.repeats}\n")
    if args.only in (None, "plan"):
        bench_planning(image, args.repeats)
    if args.only in (None, "render"):
        bench_rendering(image, args.repeats)


def bench_planning(image: Image.Image, repeats: int) -> None:
    print("| boxes | literal loop ms/region | plan_views ms/region | plan_views_batch ms/region "
          "| single speed-up | batch speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (10, 100):
        boxes = random_boxes(n, image.width, image.height, seed=n)
        literal = [literal_plan(image, b) for b in boxes]
        single = [plan_views(image, b) for b in boxes]
        batch = plan_views_batch(image, boxes, ViewOptions(n_views=3))
        assert all(same(p, lit) for p, lit in zip(single, literal)), "plan_views differs from the literal loop"
        assert all(same(p, lit) for p, lit in zip(batch, literal)), "plan_views_batch differs from the literal loop"
        t_lit = best_of(lambda: [literal_plan(image, b) for b in boxes], repeats) / n * 1e3
        t_one = best_of(lambda: [plan_views(image, b) for b in boxes], repeats) / n * 1e3
        t_bat = best_of(lambda: plan_views_batch(image, boxes, ViewOptions(n_views=3)), repeats) / n * 1e3
        print(f"| {n} | {t_lit:.2f} | {t_one:.2f} | {t_bat:.2f} | {t_lit / t_one:.1f}x | {t_lit / t_bat:.1f}x |")
    print()


def bench_rendering(image: Image.Image, repeats: int) -> None:
    workers = min(8, os.cpu_count() or 1)
    print(f"| boxes | views (distinct) | literal loop ms/region | render_views 1 worker ms/region "
          f"| render_views {workers} workers ms/region | 1-worker speed-up | {workers}-worker speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (10, 100):
        plans = plan_views_batch(image, random_boxes(n, image.width, image.height, seed=n), ViewOptions(n_views=3))
        expected = literal_render(image, plans)
        for w in (1, workers):
            assert torch.equal(render_views(image, plans, workers=w).pixel_values, expected), \
                f"render_views(workers={w}) differs from the literal loop"
        n_views = sum(len(p.views) for p in plans)
        n_distinct = len({v.crop_box for p in plans for v in p.views})
        t_lit = best_of(lambda: literal_render(image, plans), repeats) / n * 1e3
        t_one = best_of(lambda: render_views(image, plans, workers=1), repeats) / n * 1e3
        t_all = best_of(lambda: render_views(image, plans, workers=workers), repeats) / n * 1e3
        print(f"| {n} | {n_views} ({n_distinct}) | {t_lit:.2f} | {t_one:.2f} | {t_all:.2f} | {t_lit / t_one:.1f}x "
              f"| {t_lit / t_all:.1f}x |")
    print()


if __name__ == "__main__":
    main()
