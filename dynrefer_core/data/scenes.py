"""Procedural region benchmark: photographic-looking scenes of coloured, patterned shapes.

Each scene holds 4-12 objects on a textured background. Every object has a category, a colour, a
surface pattern and a size class; its caption names them and a relation to its nearest neighbour:
"a tiny red striped star left of a green ring". The two halves of the caption need different views:

- the pattern of a tiny object (stripes 3 px apart) is only legible in the tight view (t = 0);
- the neighbour and the relation are outside the region box, so only a context view (t > 0) shows them.
  Objects are placed next to each other and every nearest neighbour is unambiguous, so the neighbour shows
  in the narrow views (t = 0.1, 0.2) that pHASH selection picks for most regions.

Everything is drawn with OpenCV/NumPy from one `numpy.random.Generator`, so a seed fixes the scene.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from PIL import Image

CATEGORIES: tuple[str, ...] = (
    "circle", "ring", "square", "triangle", "star", "cross", "heart", "diamond", "crescent", "arrow",
)
# Hues far apart so that lighting, noise and pattern shading never push one name into another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "orange": (240, 132, 20),
    "yellow": (236, 216, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 210),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checked")
# Diameter ranges in pixels; the gaps between classes keep the size name unambiguous in context.
SIZES: dict[str, tuple[int, int]] = {"tiny": (12, 20), "small": (28, 44), "large": (60, 92)}
SIZE_PROBS: tuple[float, ...] = (0.34, 0.33, 0.33)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ATTRIBUTES: tuple[str, ...] = tuple(COLOURS) + PATTERNS + tuple(SIZES)


def tag_vocabulary() -> list[str]:
    """The tag list of the benchmark: sizes, colours, patterns, categories and relation words."""
    return list(SIZES) + list(COLOURS) + list(PATTERNS) + list(CATEGORIES) + list(RELATIONS)


def attribute_lines(names: list[str]) -> list[str]:
    """OVAD-style attribute lines for plain attribute names: colours as "has color:red" (prompt "the red
    color"), anything else as "is <kind>:<name>" (prompt "the striped")."""
    kinds = {**{c: "has color" for c in COLOURS}, **{p: "is pattern" for p in PATTERNS},
             **{s: "is size" for s in SIZES}}
    return [f"{kinds.get(n, 'is attribute')}:{n}" for n in names]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class SceneConfig:
    """Knobs of the generator; the defaults are the DynRefer-mini benchmark."""

    width: int = 384
    height: int = 384
    min_objects: int = 4
    max_objects: int = 12
    max_overlap: float = 0.3  # intersection / area of the smaller box, so every object stays >= ~70 % visible
    # Where a new object goes: with cluster_prob next to an existing one, at a centre distance of
    # (sum of the two radii) * U(neighbour_spread) + U(neighbour_gap) px, so that the neighbour a caption
    # names shows in the narrow context views (t = 0.1-0.2) that pHASH selection picks (spec 2.4).
    cluster_prob: float = 1.0
    neighbour_spread: tuple[float, float] = (1.0, 1.1)
    neighbour_gap: tuple[float, float] = (1.0, 8.0)
    # Every object's nearest neighbour (by centre) must be nearer than the second nearest by this factor,
    # so that "the" neighbour of a caption is well defined; placements that break it are redrawn.
    neighbour_margin: float = 1.3
    noise_sigma: float = 4.0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not 4 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"object counts ({self.min_objects}, {self.max_objects}) must satisfy 4 <= min <= max")
        if min(self.width, self.height) < 2 * SIZES["large"][1]:
            raise ValueError(f"image {self.width}x{self.height} is too small: each side must be >= "
                             f"{2 * SIZES['large'][1]} px to hold large objects")


@dataclass
class SceneObject:
    """One region: its labels, its visible box (x1, y1, x2, y2) and the neighbour its caption refers to."""

    category: str
    colour: str
    pattern: str
    size: str
    diameter: int
    box: tuple[float, float, float, float]
    neighbour: int = -1
    relation: str = ""

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.pattern} {self.category}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject] = field(default_factory=list)
    jpeg: bytes = b""  # the encoded image, written to disk as is (byte-identical for a seed)

    def caption(self, i: int) -> str:
        """Caption of object i: its attributes and its relation to the nearest neighbour."""
        o = self.objects[i]
        n = self.objects[o.neighbour]
        return f"{o.phrase} {o.relation} {article(n.colour)} {n.colour} {n.category}"

    def tags(self, i: int) -> tuple[list[str], list[str]]:
        """(tag_set1, tag_set2) like the release's parser: subject words, then relation + object words."""
        o = self.objects[i]
        n = self.objects[o.neighbour]
        return [o.size, o.colour, o.pattern, o.category], [o.relation, n.colour, n.category]

    def attributes(self, i: int) -> list[int]:
        """Multi-hot attribute vector over `ATTRIBUTES` (OVAD-style att_vec, no 'ignore' entries)."""
        o = self.objects[i]
        return [int(a in (o.colour, o.pattern, o.size)) for a in ATTRIBUTES]


# ----------------------------------------------------------------------------------------------------
# shapes: soft masks drawn at 4x and averaged down, so edges are antialiased like a photograph's

_SS = 4


def _regular_polygon(k: int, r: float, rot: float, inner: float | None = None) -> np.ndarray:
    pts = []
    n = 2 * k if inner else k
    for j in range(n):
        rr = r * (inner if inner and j % 2 else 1.0)
        a = rot - math.pi / 2 + 2 * math.pi * j / n
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return np.array(pts)


def _rotate(pts: np.ndarray, rot: float) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def shape_mask(category: str, diameter: int, rng: np.random.Generator) -> np.ndarray:
    """Float mask in [0, 1] of side `diameter + 2` with the shape centred, slightly rotated."""
    side = (diameter + 2) * _SS
    m = np.zeros((side, side), np.uint8)
    c = side / 2.0
    r = diameter * _SS / 2.0
    rot = float(rng.uniform(-0.25, 0.25))

    def poly(pts: np.ndarray, value: int = 255) -> None:
        cv2.fillPoly(m, [np.round(pts + c).astype(np.int32)], value, lineType=cv2.LINE_8)

    if category == "circle":
        cv2.circle(m, (int(c), int(c)), int(r), 255, -1)
    elif category == "ring":
        cv2.circle(m, (int(c), int(c)), int(r), 255, -1)
        cv2.circle(m, (int(c), int(c)), int(r * 0.52), 0, -1)
    elif category == "square":
        poly(_rotate(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * r * 0.8, rot))
    elif category == "triangle":
        poly(_regular_polygon(3, r, rot) + np.array([0, r * 0.2]))
    elif category == "star":
        poly(_regular_polygon(5, r, rot, inner=0.42))
    elif category == "cross":
        a, b = r, r * 0.34
        poly(_rotate(np.array([[-a, -b], [a, -b], [a, b], [-a, b]]), rot))
        poly(_rotate(np.array([[-b, -a], [b, -a], [b, a], [-b, a]]), rot))
    elif category == "heart":
        t = np.linspace(0, 2 * math.pi, 60)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) * (r / 17.0)
        poly(_rotate(pts, rot))
    elif category == "diamond":
        poly(_rotate(np.array([[0, -r], [r * 0.62, 0], [0, r], [-r * 0.62, 0]]), rot * 0.5))
    elif category == "crescent":
        cv2.circle(m, (int(c), int(c)), int(r), 255, -1)
        off = _rotate(np.array([[r * 0.45, -r * 0.2]]), rot)[0]
        cv2.circle(m, (int(c + off[0]), int(c + off[1])), int(r * 0.85), 0, -1)
    elif category == "arrow":
        sh, hw = r * 0.28, r * 0.75
        pts = np.array([[-r, -sh], [0.1 * r, -sh], [0.1 * r, -hw], [r, 0], [0.1 * r, hw], [0.1 * r, sh], [-r, sh]])
        poly(_rotate(pts, rot + float(rng.integers(4)) * math.pi / 2))
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    small = cv2.resize(m.astype(np.float32) / 255.0, (diameter + 2, diameter + 2), interpolation=cv2.INTER_AREA)
    return small


def pattern_field(pattern: str, h: int, w: int, diameter: int, rng: np.random.Generator) -> np.ndarray:
    """Float field in [0, 1]: 1 where the pattern's second (dark) colour shows."""
    if pattern == "solid":
        return np.zeros((h, w), np.float32)
    period = max(3.5, diameter / 4.5)  # tiny objects: ~3-4 px, invisible once the whole image is shrunk
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, period)
    if pattern == "striped":
        ang = float(rng.choice([0.0, 0.25, 0.5, 0.75])) * math.pi + float(rng.uniform(-0.1, 0.1))
        u = xx * math.cos(ang) + yy * math.sin(ang) + phase
        return ((u % period) < period * 0.5).astype(np.float32)
    if pattern == "dotted":
        u = (xx + phase) % period - period / 2
        v = (yy + phase) % period - period / 2
        return (u * u + v * v < (period * 0.28) ** 2).astype(np.float32)
    if pattern == "checked":
        u = np.floor((xx + phase) / (period * 0.7))
        v = np.floor((yy + phase) / (period * 0.7))
        return ((u + v) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


# ----------------------------------------------------------------------------------------------------
# background: gradient + multi-scale value noise + faint clutter, desaturated so object colours stay clear


def _value_noise(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    g = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(g, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + h, cell:cell + w]


def background(cfg: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    h, w = cfg.height, cfg.width
    base = rng.uniform(70, 200, 3)
    tint = base + rng.uniform(-50, 50, 3)
    grey_a, grey_b = base.mean(), tint.mean()
    a = 0.35 * base + 0.65 * grey_a  # low saturation: a "floor", "table" or "wall"
    b = 0.35 * tint + 0.65 * grey_b
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = (xx * math.cos(ang) + yy * math.sin(ang))
    g = (g - g.min()) / max(float(np.ptp(g)), 1.0)
    img = a[None, None] * (1 - g[..., None]) + b[None, None] * g[..., None]
    tex = sum(_value_noise(h, w, cell, rng) * wgt for cell, wgt in ((64, 0.5), (16, 0.3), (4, 0.2)))
    img = img * (0.8 + 0.4 * tex[..., None])
    if rng.random() < 0.5:  # wood/fabric-like grain
        freq = rng.uniform(0.05, 0.2)
        grain = np.sin((xx * math.sin(ang) - yy * math.cos(ang)) * freq + 3 * _value_noise(h, w, 32, rng))
        img = img * (1 + 0.06 * grain[..., None])
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 7))):  # clutter: faint grey strokes and blobs that are no object
        col = tuple(int(v) for v in (img.reshape(-1, 3).mean(0) * rng.uniform(0.6, 1.3)).clip(0, 255))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, col, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            cv2.ellipse(img, p1, (int(rng.integers(8, 40)), int(rng.integers(4, 20))), float(rng.uniform(0, 180)),
                        0, 360, col, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), 1.2)


# ----------------------------------------------------------------------------------------------------


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / area


def _centre_distances(boxes: list[tuple[float, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """Box centres (n, 2) and their pairwise distances (n, n), infinite on the diagonal (no self-neighbour)."""
    c = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes])
    d = np.hypot(c[:, None, 0] - c[None, :, 0], c[:, None, 1] - c[None, :, 1])
    np.fill_diagonal(d, np.inf)
    return c, d


def _unambiguous(boxes: list[tuple[float, ...]], margin: float) -> bool:
    """True if each box's nearest neighbour (by centre) is `margin` times nearer than its second nearest."""
    if len(boxes) < 3:
        return True
    two = np.sort(_centre_distances(boxes)[1], axis=1)[:, :2]
    return bool(np.all(two[:, 1] >= margin * two[:, 0]))


def _place(cfg: SceneConfig, d: int, placed: list[tuple[float, ...]], rng: np.random.Generator):
    """Top-left corner for a (d+2)-px patch, near an existing object with probability cluster_prob."""
    side = d + 2
    for _ in range(60):
        if placed and rng.random() < cfg.cluster_prob:
            ref = placed[int(rng.integers(len(placed)))]
            rc = ((ref[0] + ref[2]) / 2, (ref[1] + ref[3]) / 2)
            rr = (ref[2] - ref[0] + d) / 2
            # along one axis (jittered), so "left of" / "above" stay unambiguous
            ang = int(rng.integers(4)) * math.pi / 2 + rng.uniform(-0.35, 0.35)
            dist = rr * rng.uniform(*cfg.neighbour_spread) + rng.uniform(*cfg.neighbour_gap)
            cx, cy = rc[0] + dist * math.cos(ang), rc[1] + dist * math.sin(ang)
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        else:
            x0 = int(rng.integers(2, cfg.width - side - 2))
            y0 = int(rng.integers(2, cfg.height - side - 2))
        if x0 < 2 or y0 < 2 or x0 + side > cfg.width - 2 or y0 + side > cfg.height - 2:
            continue
        box = (x0 + 1.0, y0 + 1.0, x0 + 1.0 + d, y0 + 1.0 + d)
        if (all(_overlap(box, p) <= cfg.max_overlap for p in placed)
                and _unambiguous([*placed, box], cfg.neighbour_margin)):
            return x0, y0
    return None


def _paint(canvas: np.ndarray, labels: np.ndarray, k: int, x0: int, y0: int, obj: SceneObject,
           rng: np.random.Generator) -> None:
    d = obj.diameter
    alpha = shape_mask(obj.category, d, rng)
    h, w = alpha.shape
    # soft drop shadow first, offset down-right
    sh = cv2.GaussianBlur(alpha, (0, 0), max(1.0, d / 14))
    sx, sy = x0 + max(1, d // 14), y0 + max(1, d // 14)
    sh = sh[: canvas.shape[0] - sy, : canvas.shape[1] - sx]
    region = canvas[sy:sy + sh.shape[0], sx:sx + sh.shape[1]]
    region *= (1 - 0.35 * sh[..., None])
    base = np.array(COLOURS[obj.colour], np.float32) + rng.uniform(-14, 14, 3)
    dark = base * 0.38
    pat = pattern_field(obj.pattern, h, w, d, rng)
    fill = base[None, None] * (1 - pat[..., None]) + dark[None, None] * pat[..., None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)  # directional light across the object
    light = 0.88 + 0.2 * ((xx * math.cos(ang) + yy * math.sin(ang)) / max(h, 1))
    fill = np.clip(fill * light[..., None], 0, 255)
    patch = canvas[y0:y0 + h, x0:x0 + w]
    patch[:] = patch * (1 - alpha[..., None]) + fill * alpha[..., None]
    labels[y0:y0 + h, x0:x0 + w][alpha > 0.5] = k


def _neighbours(objects: list[SceneObject]) -> None:
    centres, dist = _centre_distances([o.box for o in objects])
    for i, o in enumerate(objects):
        j = int(np.argmin(dist[i]))
        dx, dy = centres[i] - centres[j]
        if abs(dx) >= abs(dy):
            o.relation = "left of" if dx < 0 else "right of"
        else:
            o.relation = "above" if dy < 0 else "below"
        o.neighbour = j


def generate_scene(rng: np.random.Generator, cfg: SceneConfig | None = None) -> Scene:
    """Draw one scene. The same generator state always gives the same pixels and labels."""
    cfg = cfg or SceneConfig()
    canvas = background(cfg, rng).astype(np.float32)
    labels = np.full((cfg.height, cfg.width), -1, np.int32)
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[SceneObject] = []
    drawn_boxes: list[tuple[float, ...]] = []
    sizes = list(SIZES)
    while len(objects) < n_target:
        size = sizes[int(rng.choice(len(sizes), p=SIZE_PROBS))]
        d = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        spot = _place(cfg, d, drawn_boxes, rng)
        if spot is None:
            if len(objects) >= cfg.min_objects:
                break
            continue
        obj = SceneObject(category=str(rng.choice(CATEGORIES)), colour=str(rng.choice(list(COLOURS))),
                          pattern=str(rng.choice(PATTERNS)), size=size, diameter=d, box=(0, 0, 0, 0))
        _paint(canvas, labels, len(objects), spot[0], spot[1], obj, rng)
        objects.append(obj)
        drawn_boxes.append((spot[0] + 1.0, spot[1] + 1.0, spot[0] + 1.0 + d, spot[1] + 1.0 + d))
    # visible boxes from the label map (later objects occlude earlier ones)
    for k, o in enumerate(objects):
        ys, xs = np.nonzero(labels == k)
        if len(xs) == 0:  # fully hidden cannot happen with max_overlap < 1, but keep the box sane
            o.box = drawn_boxes[k]
        else:
            o.box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    _neighbours(objects)
    canvas += rng.normal(0, cfg.noise_sigma, canvas.shape).astype(np.float32)  # sensor noise
    canvas = canvas * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)  # exposure
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=cfg.jpeg_quality)  # compression artefacts like a real photo
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return Scene(image=img, objects=objects, jpeg=buf.getvalue())


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image `index` of a run with `seed`: independent of how many images are drawn."""
    return np.random.default_rng([int(seed), int(index)])
