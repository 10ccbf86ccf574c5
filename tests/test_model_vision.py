"""RoI-Align of the vision encoder (spec 3.2): output G = S/P, spatial scale 1/P, 2 x 2 samples per bin and
aligned=False, checked against values derived by hand and a bilinear RoI-Align written out here."""
import torch


def bilinear(features: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """features (C, H, W) at (y, x), as Detectron's RoI-Align samples it: zero beyond one cell outside the map,
    clamped to the edge inside that cell."""
    _, h, w = features.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(features.shape[0], dtype=features.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * features[:, y0, x0] + (1 - ly) * lx * features[:, y0, x1]
            + ly * (1 - lx) * features[:, y1, x0] + ly * lx * features[:, y1, x1])


def roi_align_reference(features: torch.Tensor, box, size: int, scale: float, samples: int) -> torch.Tensor:
    """RoI-Align with aligned=False (no half-pixel shift; RoIs narrower than one cell widened to one cell):
    the box is scaled to feature cells, cut into size x size bins, and each bin is the mean of samples x samples
    bilinear samples at the centres of its sub-cells."""
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    bin_w, bin_h = max(x2 - x1, 1.0) / size, max(y2 - y1, 1.0) / size
    out = torch.zeros(features.shape[0], size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            for a in range(samples):
                for b in range(samples):
                    y = y1 + i * bin_h + (a + 0.5) * bin_h / samples
                    x = x1 + j * bin_w + (b + 0.5) * bin_w / samples
                    out[:, i, j] += bilinear(features.double(), y, x)
    return out / samples ** 2


def test_roi_align_of_a_ramp_by_hand(tiny_model):
    """On a map whose value is the column (channel 0) or row (channel 1) index, each bin is the mean of its
    four samples at +-1/4 bin around the bin centre, i.e. the centre x1/P + (j + 1/2) (x2 - x1) / (P G)."""
    vision, c = tiny_model.vision, tiny_model.config
    s, p, g = c.image_size, c.patch_size, c.grid_size
    assert (s, p, g) == (112, 14, 8)
    cols = torch.arange(g, dtype=torch.float32).expand(g, g)
    ramp = torch.stack([cols, cols.T])[None]  # (1, 2, G, G)

    def align(box):
        return vision.roi_align(ramp, torch.tensor([[0.0, *box]]))[0]

    # The whole frame: cells [j, j+1], centres j + 1/2; the last bin's samples (7.25, 7.75) lie beyond the last
    # cell centre and are clamped to it, so it is 7, not 7.5.
    whole = align((0, 0, s, s))
    expected = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.0])
    torch.testing.assert_close(whole[0], expected.expand(g, g), rtol=0, atol=1e-6)
    torch.testing.assert_close(whole[1], expected[:, None].expand(g, g), rtol=0, atol=1e-6)
    # Box (28, 14, 84, 70) px = cells x in [2, 6], y in [1, 5]: bins of 1/2 cell, centres 2.25 + j/2 and 1.25 + i/2.
    part = align((28, 14, 84, 70))
    torch.testing.assert_close(part[0], (2.25 + 0.5 * torch.arange(g)).expand(g, g), rtol=0, atol=1e-6)
    torch.testing.assert_close(part[1], (1.25 + 0.5 * torch.arange(g))[:, None].expand(g, g), rtol=0, atol=1e-6)


BOXES = [(0.0, 0.0, 112.0, 112.0), (7.0, 3.0, 101.0, 90.0), (30.5, 41.0, 52.0, 77.5), (60.0, 5.0, 112.0, 40.0),
         (50.0, 50.0, 55.0, 60.0)]  # off the 14-px cell grid: bins straddle cells; the last is under a cell wide


def test_roi_align_matches_a_written_out_reference(tiny_model):
    """RoI-Align of random maps, one RoI per image (its batch index), against roi_align_reference."""
    c = tiny_model.config
    g = torch.Generator().manual_seed(1)
    features = torch.randn(len(BOXES), 3, c.grid_size, c.grid_size, generator=g)
    rois = torch.tensor([[float(k), *box] for k, box in enumerate(BOXES)])
    out = tiny_model.vision.roi_align(features, rois)
    assert out.shape == (len(BOXES), 3, c.grid_size, c.grid_size)
    for k, box in enumerate(BOXES):
        expected = roi_align_reference(features[k], box, c.grid_size, 1 / c.patch_size, samples=2)
        torch.testing.assert_close(out[k].double(), expected, rtol=0, atol=1e-5, msg=f"box {k}")
        # These boxes tell the release's 2 x 2 samples per bin from one sample at the bin centre.
        one = roi_align_reference(features[k], box, c.grid_size, 1 / c.patch_size, samples=1)
        assert k == 0 or (out[k].double() - one).abs().max() > 1e-2


def test_encoder_roi_aligns_each_view_on_its_own_token_map(tiny_model):
    """VisionEncoder.forward: the ViT token grid of each view image, RoI-aligned with that view's box."""
    vision, c = tiny_model.vision, tiny_model.config
    g = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(len(BOXES), 3, c.image_size, c.image_size, generator=g)
    with torch.inference_mode():
        cls, grid = vision.token_grid(pixel_values)
        cls_again, rois = vision(pixel_values, torch.tensor(BOXES))
    assert rois.shape == (len(BOXES), c.vision_width, c.grid_size, c.grid_size) and torch.equal(cls, cls_again)
    scale = grid.abs().max().double()  # the random tiny ViT's features are small: compare relative to them
    for k, box in enumerate(BOXES):
        expected = roi_align_reference(grid[k], box, c.grid_size, 1 / c.patch_size, samples=2)
        torch.testing.assert_close(rois[k].double() / scale, expected / scale, rtol=0, atol=1e-5, msg=f"view {k}")
