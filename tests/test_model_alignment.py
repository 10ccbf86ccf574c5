"""The alignment module (spec 3.3) against torchvision's deform_conv2d as an independent reference."""
import math

import pytest
import torch
from torchvision.ops import deform_conv2d

from dynrefer_core.modeling.alignment import AlignmentModule


def _randomise_offsets(module: AlignmentModule, scale: float = 0.3) -> None:
    torch.nn.init.normal_(module.offset_mask.weight, std=scale)
    torch.nn.init.normal_(module.offset_mask.bias, std=scale)


def test_official_shapes():
    with torch.device("meta"):
        m = AlignmentModule(1408, 4)
    assert m.offset_conv.weight.shape == (1408, 2, 3, 3)
    assert m.offset_mask.weight.shape == (112, 1408)  # ceil(4*9*3/8)*8
    assert m.value_proj.weight.shape == m.output_proj.weight.shape == (1408, 1408)


def test_zero_init_gives_all_zero_maps():
    torch.manual_seed(0)
    m = AlignmentModule(16, 4)
    out = m(torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5))
    assert torch.count_nonzero(out) == 0  # m = 0 everywhere and zero output bias: no residual


def test_modulation_init_starts_as_a_3x3_mean_of_the_projected_context():
    torch.manual_seed(0)
    c, g = 8, 2
    m = AlignmentModule(c, g, modulation_init=1 / 9)
    offsets, modulation = m.offsets_and_modulation(torch.randn(1, c, 5, 5), torch.randn(1, c, 5, 5))
    assert torch.count_nonzero(offsets) == 0 and torch.allclose(modulation, torch.full_like(modulation, 1 / 9))
    context = torch.randn(1, c, 5, 5)
    value = m.value_proj(context.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    mean = torch.nn.functional.avg_pool2d(value, 3, stride=1, padding=1, count_include_pad=True)
    expected = m.output_proj(mean.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(m(context, torch.randn(1, c, 5, 5)), expected, atol=1e-5)
    out = m(context.requires_grad_(), torch.randn(1, c, 5, 5))
    out.sum().backward()
    assert context.grad.abs().sum() > 0  # unlike the release's init, the ViT gets gradient at step 0
    assert AlignmentModule(c, g).offset_mask.bias.abs().sum() == 0  # default: as released


def test_matches_torchvision_deform_conv2d():
    torch.manual_seed(0)
    b, c, g, h, w = 2, 16, 4, 6, 7
    m = AlignmentModule(c, g)
    _randomise_offsets(m)
    context, reference = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    ours = m(context, reference)

    # Reference: depthwise deform_conv2d with all-one 3x3 weights on V, offset groups = G.
    value = m.value_proj(context.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    offsets, modulation = m.offsets_and_modulation(context, reference)  # (B,H,W,G,9,2) as (dx,dy), (B,H,W,G,9)
    # DCNv4 tap k = (x index k//3, y index k%3); torchvision kernel index = ky*3 + kx.
    order = [j * 3 + i for i in range(3) for j in range(3)]  # torchvision position of DCNv4 tap k
    tv_offset = torch.zeros(b, g, 9, 2, h, w)
    tv_mask = torch.zeros(b, g, 9, h, w)
    for k in range(9):
        tv_offset[:, :, order[k], 0] = offsets[..., k, 1].permute(0, 3, 1, 2)  # dy
        tv_offset[:, :, order[k], 1] = offsets[..., k, 0].permute(0, 3, 1, 2)  # dx
        tv_mask[:, :, order[k]] = modulation[..., k].permute(0, 3, 1, 2)
    sampled = deform_conv2d(value, tv_offset.reshape(b, g * 18, h, w), torch.ones(c, 1, 3, 3), padding=1,
                            mask=tv_mask.reshape(b, g * 9, h, w))
    expected = m.output_proj(sampled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_integer_offset_moves_the_sample_and_zero_pads():
    # One group, value = identity, modulation 1 on the centre tap only, offset dx = +1: out(y, x) = V(y, x+1).
    m = AlignmentModule(4, 1)
    with torch.no_grad():
        for proj in (m.value_proj, m.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
        m.offset_mask.weight.zero_()
        bias = torch.zeros(m.offset_mask.bias.shape)
        centre = 4  # tap (i=1, j=1)
        bias[2 * centre] = 1.0        # dx of the centre tap
        bias[18 + centre] = 1.0       # its modulation
        m.offset_mask.bias.copy_(bias)
    x = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    out = m(x, torch.zeros_like(x))
    assert torch.allclose(out[..., :2], x[..., 1:])
    assert torch.count_nonzero(out[..., 2]) == 0  # sampled at x = 3, outside the map


def test_offset_conv_halves_see_view_then_reference():
    """Conv2d(2C -> C, groups=C) on concat[X_k, R]: outputs 0..C/2-1 depend only on X_k."""
    torch.manual_seed(0)
    m = AlignmentModule(8, 4)
    x, r = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    f1 = m.offset_conv(torch.cat([x, r], 1))
    f2 = m.offset_conv(torch.cat([x, r + 1.0], 1))
    assert torch.allclose(f1[:, :4], f2[:, :4])
    assert not torch.allclose(f1[:, 4:], f2[:, 4:])


def test_gradients_reach_offsets_once_modulation_is_nonzero():
    torch.manual_seed(0)
    m = AlignmentModule(8, 2)
    _randomise_offsets(m, 0.1)
    m(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)).sum().backward()
    assert m.offset_mask.weight.grad.abs().sum() > 0
    assert m.offset_conv.weight.grad.abs().sum() > 0


def test_mismatched_shapes_are_refused():
    m = AlignmentModule(8, 2)
    with pytest.raises(ValueError, match="differ"):
        m(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="divisible"):
        AlignmentModule(10, 4)
    assert math.ceil(4 * 27 / 8) * 8 == 112
