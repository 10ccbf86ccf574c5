"""Pictures of a ViewPlan for people: the nested views on the image, and one tile per view (crop and numbers)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .imageio import ImageSource, load_image
from .planning import ViewPlan

REGION = (255, 64, 64)       # the region b itself
SELECTED = (255, 196, 0)     # chosen views
OTHER = (90, 200, 255)       # candidates not chosen
UNCHOSEN = (200, 200, 200)   # the frame of a view tile not chosen
TEXT_BG = (0, 0, 0, 170)
FRAME = 4                    # px around a view tile
TILE_TEXT = 58               # px of numbers under a view tile's crop


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill) -> None:
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    draw.rectangle((x0 - 3, y0 - 2, x1 + 3, y1 + 2), fill=TEXT_BG)
    draw.text(xy, text, font=font, fill=fill)


def draw_views(image: ImageSource, plan: ViewPlan, *, show_all: bool = True) -> Image.Image:
    """The image with the candidate view boxes b_t outlined and labelled with t; selected views highlighted
    (thick, yellow), others thin (blue, only with ``show_all``), and the region itself in red."""
    base = load_image(image).convert("RGBA")
    W, H = base.size
    scale = max(W, H) / 1024  # line widths and text follow the image size
    lw, font = max(1, round(2 * scale)), _font(max(11, round(16 * scale)))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    views = [c for c in [*plan.candidates, *plan.extra] if show_all or c.selected]
    # Unselected first, so highlighted boxes sit on top.
    for c in sorted(views, key=lambda c: (c.selected, c.t)):
        u1, v1, u2, v2 = c.crop_box
        color = SELECTED if c.selected else OTHER
        draw.rectangle((u1, v1, u2 - 1, v2 - 1), outline=color + ((255 if c.selected else 150),),
                       width=3 * lw if c.selected else lw)
    x1, y1, x2, y2 = plan.box
    draw.rectangle((x1, y1, x2, y2), outline=REGION + (255,), fill=REGION + (50,), width=2 * lw)
    # Labels: selected ones at their box's top-left, others stacked in a legend column to avoid overlap.
    for c in views:
        if c.selected:
            rank = plan.selected_ts.index(c.t)
            above = c.crop_box[1] - font.size - 4 * lw  # just above the box; inside it at the image top
            y = above if above >= 0 else c.crop_box[1] + 3 * lw
            _label(draw, (c.crop_box[0] + 2 * lw, y), f"view {rank}: t={c.t:g}", font, SELECTED + (255,))
    below = y2 + 3 * lw  # the region's label goes under it, away from the view labels above
    y = below if below + font.size < H else y2 - font.size - 3 * lw
    _label(draw, (x1 + 2 * lw, y), "region = view 0 (t=0)", font, REGION + (255,))
    if show_all:
        lines = [f"t={c.t:g}  score {c.score:.1f}" for c in plan.candidates]
        y = 4 * lw
        for c, text in zip(plan.candidates, lines):
            _label(draw, (W - draw.textlength("t=0.1  score 000.0", font=font) - 8 * lw, y), text, font,
                   (SELECTED if c.selected else OTHER) + (255,))
            y += font.size + 6
    return Image.alpha_composite(base, overlay).convert("RGB")


def view_tiles(image: ImageSource, plan: ViewPlan, *, size: int = 180) -> list[Image.Image]:
    """One tile per view in `plan.all_views`: the crop fitted into size x size, then t, score, Hamming to h_0
    and h_t in hex; framed in yellow (with its rank) when the model uses the view.

    Every tile is (size + 2 FRAME) x (size + TILE_TEXT + 2 FRAME), so that galleries and `contact_sheet` line
    them up; the crop keeps its aspect ratio, so a view's shape reads off its tile.
    """
    rgb = load_image(image)
    title, small = _font(15), _font(13)
    tiles = []
    for v in plan.all_views:
        chosen = v is plan.base or v.selected
        if v is plan.base:
            lines = ["t=0: the box itself, view 0", "reference hash h_0"]
        else:
            head = f"t={v.t:g}: chosen, view {plan.selected_ts.index(v.t)}" if v.selected else f"t={v.t:g}"
            lines = [head, f"score {v.score:.1f} · Hamming {v.hamming}"]
        tile = Image.new("RGB", (size + 2 * FRAME, size + TILE_TEXT + 2 * FRAME), SELECTED if chosen else UNCHOSEN)
        tile.paste((255, 255, 255), (FRAME, FRAME, FRAME + size, FRAME + size + TILE_TEXT))
        crop = ImageOps.contain(rgb.crop(v.crop_box), (size, size), Image.Resampling.BICUBIC)
        tile.paste(crop, (FRAME + (size - crop.width) // 2, FRAME + (size - crop.height) // 2))
        draw = ImageDraw.Draw(tile)
        x, y = FRAME + 6, FRAME + size
        draw.text((x, y + 4), lines[0], font=title, fill=(20, 20, 20))
        draw.text((x, y + 23), lines[1], font=small, fill=(20, 20, 20))
        draw.text((x, y + 40), v.hash_hex, font=small, fill=(110, 110, 120))
        tiles.append(tile)
    return tiles


def contact_sheet(image: ImageSource, plan: ViewPlan, *, tile: int = 180, columns: int = 4) -> Image.Image:
    """`view_tiles` in a grid of `columns`, t = 0 first: one picture of why the chosen views won."""
    tiles = view_tiles(image, plan, size=tile)
    pad = 10  # > 2 FRAME: neighbouring frames never touch
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + TILE_TEXT + pad) + pad), (255, 255, 255))
    for i, picture in enumerate(tiles):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + TILE_TEXT + pad)
        sheet.paste(picture, (x - FRAME, y - FRAME))
    return sheet
