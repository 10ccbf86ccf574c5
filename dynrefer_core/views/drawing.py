"""Pictures of a ViewPlan for people: the nested views on the image, and a contact sheet of the crops."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .imageio import ImageSource, load_image
from .planning import ViewCandidate, ViewPlan

REGION = (255, 64, 64)       # the region b itself
SELECTED = (255, 196, 0)     # chosen views
OTHER = (90, 200, 255)       # candidates not chosen
TEXT_BG = (0, 0, 0, 170)


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


def contact_sheet(image: ImageSource, plan: ViewPlan, *, tile: int = 180, columns: int = 4) -> Image.Image:
    """The crops of the base view and every candidate in a grid, each with t, hash hex, Hamming to h_0 and
    score; the selected views are framed."""
    rgb = load_image(image)
    views: list[ViewCandidate] = [plan.base, *plan.candidates, *plan.extra]
    font, small = _font(15), _font(13)
    pad, text_h = 10, 58
    rows = -(-len(views) // columns)
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), (30, 30, 34))
    draw = ImageDraw.Draw(sheet)
    for i, v in enumerate(views):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + text_h + pad)
        sheet.paste(rgb.crop(v.crop_box).resize((tile, tile), Image.Resampling.BICUBIC), (x, y))
        chosen = v is plan.base or v.selected
        if chosen:
            rank = plan.selected_ts.index(v.t)
            draw.rectangle((x - 4, y - 4, x + tile + 3, y + tile + text_h - 2), outline=SELECTED, width=4)
            _label(draw, (x + 4, y + 4), f"view {rank}", small, SELECTED)
        title = "t=0 (region)" if v is plan.base else f"t={v.t:g}"
        draw.text((x, y + tile + 4), title, font=font, fill=SELECTED if chosen else (235, 235, 235))
        if v is not plan.base:
            draw.text((x + tile, y + tile + 4), f"score {v.score:.1f}", font=font, anchor="ra",
                      fill=(235, 235, 235))
        draw.text((x, y + tile + 23), f"hash {v.hash_hex}", font=small, fill=(180, 180, 190))
        draw.text((x, y + tile + 40), f"Hamming {v.hamming}/64", font=small, fill=(180, 180, 190))
    return sheet
