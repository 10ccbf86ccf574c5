"""draw_views, view_tiles and contact_sheet draw what the plan says."""
import numpy as np

from dynrefer_core.views import contact_sheet, draw_views, plan_views, view_tiles
from dynrefer_core.views.drawing import OTHER, REGION, SELECTED, UNCHOSEN


def scene():
    img = np.full((300, 400, 3), 40, np.uint8)
    img[120:170, 150:230] = (200, 200, 200)
    return img


def test_draw_views_outlines_selected_views_and_region():
    img = scene()
    plan = plan_views(img, (150, 120, 230, 170), n_views=3)
    out = np.asarray(draw_views(img, plan))
    assert out.shape == img.shape
    for c in plan.candidates:
        u1, v1, u2, v2 = c.crop_box
        left_edge = out[(v1 + v2) // 2, u1].tolist()
        if c.selected:
            assert left_edge == list(SELECTED)
        elif c.t < 1.0:
            assert left_edge != [40, 40, 40]  # drawn (blended blue)
    x1, y1, x2, y2 = (int(v) for v in plan.box)
    assert out[(y1 + y2) // 2, x1].tolist() == list(REGION)
    only_selected = np.asarray(draw_views(img, plan, show_all=False))
    unselected = next(c for c in plan.candidates if not c.selected and c.t < 1.0)
    u1, v1, u2, v2 = unselected.crop_box
    assert only_selected[(v1 + v2) // 2, u1].tolist() == [40, 40, 40]
    assert OTHER != SELECTED


def test_contact_sheet_has_a_tile_per_view():
    img = scene()
    plan = plan_views(img, (150, 120, 230, 170), n_views=3)
    sheet = contact_sheet(img, plan, tile=100, columns=4)
    assert sheet.size == (4 * 110 + 10, 3 * (100 + 58 + 10) + 10)
    arr = np.asarray(sheet)
    # The first tile is the base view (selected, framed); the frame is 4 px outside the tile.
    assert arr[10 + 50, 10 - 3].tolist() == list(SELECTED)
    # The region crop is the grey square, so the base tile's centre is grey.
    assert arr[10 + 50, 10 + 50].tolist() == [200, 200, 200]


def test_view_tiles_one_per_view_chosen_ones_framed():
    img = scene()
    plan = plan_views(img, (150, 120, 230, 170), n_views=3, strategy="fixed", ts=[0.35, 1.0])  # 0.35: off the grid
    tiles = view_tiles(img, plan, size=100)
    assert len(tiles) == 12  # t = 0, the ten candidates, the off-grid 0.35
    assert {t.size for t in tiles} == {(108, 166)}
    chosen = [np.asarray(t)[50, 1].tolist() == list(SELECTED) for t in tiles]
    assert chosen == [v is plan.base or v.selected for v in plan.all_views] and sum(chosen) == 3
    assert all(np.asarray(t)[50, 1].tolist() == list(UNCHOSEN) for t, c in zip(tiles, chosen) if not c)
    assert np.asarray(tiles[0])[4 + 50, 4 + 50].tolist() == [200, 200, 200]  # the region crop: the grey square
