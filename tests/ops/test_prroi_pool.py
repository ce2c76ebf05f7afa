"""Precise RoI Pooling: kernels vs the pure-PyTorch reference, vs an independent midpoint-rule integral, closed-form
cases (constant and linear maps), gradients (gradcheck on features and box coordinates), degenerate inputs,
registration, mixed precision (autocast, mixed dtypes), the official library's PrRoIPool2D interface."""
import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2_refine.ops import PrRoIPool2D, PrRoIPool2d, _prroi_pool_reference, has_ops, prroi_pool
from helpers import cpu_and_cuda, needs_ops

prroi_module = importlib.import_module("d2_refine.ops.prroi_pool")  # the module, not the function


def _random_rois(num, num_images, extent, max_size, generator, dtype=torch.float64, outside=2.0):
    """Tensor[num, 5] of boxes (x1, y1, x2, y2) reaching up to `outside` px beyond [0, extent]."""
    xy = torch.rand(num, 2, generator=generator, dtype=dtype) * (extent + 2 * outside) - outside
    wh = torch.rand(num, 2, generator=generator, dtype=dtype) * max_size
    index = torch.randint(0, num_images, (num, 1), generator=generator).to(dtype)
    return torch.cat([index, xy, xy + wh], 1)


def _bilinear(plane, x, y):
    """f(x, y) of Precise RoI Pooling (bilinear, F = 0 off the map) for a [C, H, W] plane at points x, y (any shape)."""
    channels, height, width = plane.shape
    x0, y0 = x.detach().floor().long(), y.detach().floor().long()
    tx, ty = x - x0, y - y0
    out = 0
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            value = plane[:, yi.clamp(0, height - 1), xi.clamp(0, width - 1)] * inside
            out = out + wx * wy * value
    return out


def _midpoint(input, rois, output_size, spatial_scale, aligned, samples):
    """Midpoint rule with samples x samples points per bin of the bilinear map: an independent approximation of
    PrRoIPool (error O(samples^-2)), differentiable w.r.t. input and rois by autograd."""
    ph_, pw_ = output_size
    outputs = []
    for k in range(rois.size(0)):
        n = int(rois[k, 0])
        offset = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (rois[k, 1:] * spatial_scale - offset).unbind()
        bw, bh = (x2 - x1).clamp(min=0) / pw_, (y2 - y1).clamp(min=0) / ph_
        t = (torch.arange(samples, dtype=rois.dtype) + 0.5) / samples
        xs = x1 + (torch.arange(pw_, dtype=rois.dtype)[:, None] + t) * bw  # [PW, M]
        ys = y1 + (torch.arange(ph_, dtype=rois.dtype)[:, None] + t) * bh  # [PH, M]
        grid_y = ys[:, :, None, None].expand(ph_, samples, pw_, samples)
        grid_x = xs[None, None].expand(ph_, samples, pw_, samples)
        values = _bilinear(input[n], grid_x, grid_y)  # [C, PH, M, PW, M]
        outputs.append(values.mean(dim=(2, 4)) * ((bw * bh) > 0))
    return torch.stack(outputs)


def _edges(rois, output_size, spatial_scale, aligned=False):
    """All bin edges (scaled) of rois, to keep them off integer lines in gradchecks."""
    ph_, pw_ = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - offset).unbind(1)
    u = torch.arange(pw_ + 1, dtype=rois.dtype) / pw_
    v = torch.arange(ph_ + 1, dtype=rois.dtype) / ph_
    return torch.cat([(x1[:, None] * (1 - u) + x2[:, None] * u).flatten(),
                      (y1[:, None] * (1 - v) + y2[:, None] * v).flatten()])


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forward_matches_reference(device, dtype, aligned, contiguous):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, 17, generator=g, dtype=dtype)
    rois = _random_rois(30, 2, 60, 40, g, dtype=dtype, outside=8)
    if not contiguous:
        x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # channels-last-like strides
        rois = torch.cat([rois, torch.zeros_like(rois)], 1)[:, :5]  # sliced view
        assert not x.is_contiguous() and not rois.is_contiguous()
    x, rois = x.to(device), rois.to(device)
    out = prroi_pool(x, rois, (3, 4), 0.25, aligned)
    expected = _prroi_pool_reference(x.double(), rois.double(), (3, 4), 0.25, aligned)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@needs_ops
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_matches_midpoint_rule(aligned):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = _random_rois(6, 2, 16, 16, g, outside=3)
    out = prroi_pool(x, rois, (2, 3), 0.5, aligned)
    assert out.abs().amax(dim=(1, 2, 3)).min() > 0  # every RoI meets the map
    # the midpoint rule of a piecewise-bilinear map errs by O(M^-2) (erratically: it depends on where the kinks fall)
    assert (out - _midpoint(x, rois, (2, 3), 0.5, aligned, 64)).abs().max() < 1e-3
    assert (out - _midpoint(x, rois, (2, 3), 0.5, aligned, 512)).abs().max() < 2e-5


@needs_ops
def test_coordinate_gradient_matches_midpoint_rule():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 8, 10, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 1.3, 0.7, 7.6, 6.2], [0, -1.4, 2.2, 4.9, 9.3]], dtype=torch.float64)
    weights = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    r1 = rois.clone().requires_grad_()
    (prroi_pool(x, r1, 2, 1.0) * weights).sum().backward()
    r2 = rois.clone().requires_grad_()
    (_midpoint(x, r2, (2, 2), 1.0, False, 512) * weights).sum().backward()
    assert r1.grad[:, 0].abs().max() == 0
    torch.testing.assert_close(r1.grad, r2.grad, atol=5e-3, rtol=0)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("aligned", [False, True])
def test_backward_matches_reference(device, aligned):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 11, 12, generator=g, dtype=torch.float64).to(device)
    rois = _random_rois(25, 2, 48, 40, g, outside=6).to(device)
    weights = torch.randn(25, 4, 3, 3, generator=g, dtype=torch.float64).to(device)
    grads = []
    for fn in (prroi_pool, _prroi_pool_reference):
        xi, ri = x.clone().requires_grad_(), rois.clone().requires_grad_()
        (fn(xi, ri, 3, 0.25, aligned) * weights).sum().backward()
        grads.append((xi.grad, ri.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-9)
    assert grads[0][1][:, 0].abs().max() == 0


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", range(5))
def test_backward_gradcheck_features(device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    rois = _random_rois(5, 2, 7, 6, g, outside=2).to(device)
    assert torch.autograd.gradcheck(lambda t: prroi_pool(t, rois, (2, 3), 1.0), (x,))


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_backward_gradcheck_coordinates(device, aligned, seed):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64).to(device)
    while True:  # bin edges off integer lines (the map's kinks), where the map is differentiable
        rois = _random_rois(4, 2, 14, 12, g, outside=3)
        rois[:, 3:] = torch.maximum(rois[:, 3:], rois[:, 1:3] + 1.0)
        edges = _edges(rois, (2, 3), 0.5, aligned)
        if (edges - edges.round()).abs().min() > 1e-3:
            break
    index, coords = rois[:, :1].to(device), rois[:, 1:].to(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: prroi_pool(x, torch.cat([index, c], 1), (2, 3), 0.5, aligned), (coords,)
    )


@needs_ops
def test_backward_gradcheck_features_and_coordinates_together():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.zeros(2, 1, dtype=torch.float64)
    coords = torch.tensor([[0.33, 0.41, 4.27, 3.62], [-0.71, 1.13, 3.38, 5.57]], dtype=torch.float64,
                          requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, c: prroi_pool(t, torch.cat([index, c], 1), 2, 1.0), (x, coords))


@settings(deadline=None, max_examples=30)
@given(
    c=st.floats(-5, 5),
    x1=st.floats(0, 6), y1=st.floats(0, 5), w=st.floats(0.05, 4), h=st.floats(0.05, 4),
    ph=st.integers(1, 4), pw=st.integers(1, 4),
)
def test_constant_map_gives_constant_and_zero_coordinate_gradient(c, x1, y1, w, h, ph, pw):
    # bins inside [0, W - 1] x [0, H - 1] (W = 11, H = 10: the box ends at most at 10 x 9)
    x = torch.full((1, 2, 10, 11), c, dtype=torch.float64)
    rois = torch.tensor([[0, x1, y1, x1 + w, y1 + h]], dtype=torch.float64, requires_grad=True)
    out = prroi_pool(x, rois, (ph, pw), 1.0)
    torch.testing.assert_close(out, torch.full_like(out, c), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert rois.grad.abs().max() < 1e-9


@settings(deadline=None, max_examples=20)
@given(
    x1=st.floats(-2, 8), y1=st.floats(-2, 8), w=st.floats(0.1, 6), h=st.floats(0.1, 6),
    ph=st.integers(1, 3), pw=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_midpoint_sampling_converges_to_output(x1, y1, w, h, ph, pw, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 9, 10, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, x1, y1, x1 + w, y1 + h]], dtype=torch.float64)
    out = prroi_pool(x, rois, (ph, pw), 1.0)
    # |F| <= 1: the midpoint rule errs by O(M^-2) (not monotonically: it depends on where the kinks fall)
    errors = [(out - _midpoint(x, rois, (ph, pw), 1.0, False, m)).abs().max().item() for m in (16, 256)]
    assert errors[0] <= 2e-2
    assert errors[1] <= 2e-4


@needs_ops
def test_linear_map_closed_form():
    # F[i, j] = j: O = (xs + xe) / 2 and dO/dx1 = s (1 - (pw + 1/2) / PW) for bins inside the map
    height, width, scale, pw_ = 12, 16, 0.5, 4
    x = torch.arange(width, dtype=torch.float64).expand(1, 1, height, width).contiguous()
    rois = torch.tensor([[0, 3.3, 4.1, 25.7, 19.9]], dtype=torch.float64, requires_grad=True)
    out = prroi_pool(x, rois, (3, pw_), scale)
    bw = (25.7 - 3.3) * scale / pw_
    xs = 3.3 * scale + torch.arange(pw_, dtype=torch.float64) * bw
    torch.testing.assert_close(out[0, 0], ((2 * xs + bw) / 2).expand(3, pw_), rtol=1e-12, atol=1e-12)
    for p in range(pw_):
        (grad,) = torch.autograd.grad(out[0, 0, 1, p], rois, retain_graph=True)
        assert grad[0, 1].item() == pytest.approx(scale * (1 - (p + 0.5) / pw_), abs=1e-12)
        assert grad[0, 3].item() == pytest.approx(scale * (p + 0.5) / pw_, abs=1e-12)
        assert abs(grad[0, 2].item()) < 1e-12 and abs(grad[0, 4].item()) < 1e-12


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_degenerate_boxes_give_zero_output_and_gradient(device):
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    rois = torch.tensor(
        [
            [0, 2.0, 2.0, 2.0, 6.0],  # zero width
            [0, 2.0, 5.0, 6.0, 5.0],  # zero height
            [0, 6.0, 6.0, 2.0, 2.0],  # inverted
            [0, 3.0, 3.0, 3.0, 3.0],  # a point
            [0, 20.0, 20.0, 30.0, 30.0],  # fully outside the map (beyond the ramp)
            [0, -9.0, -9.0, -1.5, -2.0],  # fully outside, before the origin
        ],
        dtype=torch.float64, device=device, requires_grad=True,
    )
    out = prroi_pool(x, rois, 3, 1.0)
    assert torch.isfinite(out).all() and out.abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(rois.grad).all() and rois.grad.abs().max() == 0
    assert x.grad.abs().max() == 0


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_boxes_partly_outside_and_bins_smaller_than_a_cell(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64).to(device)
    rois = torch.tensor(
        [[0, -3.0, -2.5, 2.2, 3.1], [0, 4.5, 3.5, 9.0, 8.0], [0, 1.1, 1.2, 1.6, 1.5], [0, 5.9, 4.95, 6.4, 5.3]],
        dtype=torch.float64, device=device,
    )
    out = prroi_pool(x, rois, (7, 7), 1.0)  # last two: bins of 0.07 x 0.04 cells
    torch.testing.assert_close(out, _prroi_pool_reference(x, rois, 7, 1.0), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()
    # the map ramps to zero one cell beyond its border and no further
    edge = prroi_pool(x, torch.tensor([[0, 6.0, 0.0, 7.0, 5.0]], dtype=torch.float64, device=device), 1, 1.0)
    assert edge.abs().max() > 0
    beyond = prroi_pool(x, torch.tensor([[0, 7.0, 0.0, 8.0, 5.0]], dtype=torch.float64, device=device), 1, 1.0)
    assert beyond.abs().max() == 0


def _large_and_small_rois(dtype):
    """RoIs over a 2 x 37 x 45 map at spatial_scale 0.5 (cells 2 px) for 3 x 4 bins: large ones (bins of 7-17
    cells: the CPU kernel's summed-area-table path), partly and far outside the map, next to small ones (bins under
    a cell: its direct path) in the same images. No bin edge lies on an integer line (where the reference's
    autograd, through clamp, counts the kink twice)."""
    return torch.tensor(
        [
            [0, 3.3, 5.1, 81.7, 70.2],  # most of the map
            [1, -20.3, -14.6, 107.9, 89.4],  # beyond every side, by more than the ramp
            [0, -30.7, 10.3, 25.1, 60.9],  # crosses the left border
            [1, 60.2, 40.9, 150.4, 120.3],  # crosses the right and bottom borders, bins partly beyond the ramp
            [0, 95.3, 10.7, 180.5, 60.1],  # right of the map, beyond the ramp (large bins)
            [1, 10.1, -60.3, 80.6, -0.4],  # above the map, within the ramp's reach for the last bin row only
            [0, 40.3, 30.6, 41.9, 31.7],  # tiny: bins of 0.2 x 0.14 cells
            [1, 70.1, 50.2, 84.9, 61.3],  # small: bins of ~1.8 cells
            [0, 0.7, 0.9, 89.25, 73.3],  # the whole map
        ],
        dtype=dtype,
    )


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_large_and_small_rois_match_reference(device, dtype, aligned):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 20, 37, 45, generator=g, dtype=torch.float64) + 0.5  # 20 channels: a partial channel block
    rois = _large_and_small_rois(torch.float64)
    edges = _edges(rois, (3, 4), 0.5, aligned)
    assert (edges - edges.round()).abs().min() > 1e-3
    weights = torch.randn(rois.size(0), 20, 3, 4, generator=g, dtype=torch.float64)
    results = []
    for fn, dt in ((prroi_pool, dtype), (_prroi_pool_reference, torch.float64)):
        xi = x.to(device, dt).clone().requires_grad_()
        ri = rois.to(device, dt).clone().requires_grad_()
        out = fn(xi, ri, (3, 4), 0.5, aligned)
        (out * weights.to(device, dt)).sum().backward()
        results.append([t.detach().double().cpu() for t in (out, xi.grad, ri.grad)])
    tol = (1e-12, 1e-10, 1e-9) if dtype == torch.float64 else (1e-5, 1e-5, 1e-3)
    for got, expected, t in zip(results[0], results[1], tol):
        torch.testing.assert_close(got, expected, rtol=t, atol=t)
    out, _, grad_rois = results[0]
    assert out[4].abs().max() == 0 and grad_rois[4].abs().max() == 0  # beyond the ramp: exactly zero
    assert out[5, :, :2].abs().max() == 0 and out[5, :, 2].abs().max() > 0
    assert out[3, :, 2].abs().max() == 0 and out[3, :, :, 2:].abs().max() == 0  # bins beyond the ramp
    assert out[3, :, :2, :2].abs().amax(dim=(1, 2)).min() > 0


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_gradient_is_the_same_at_every_call(device):
    # the box gradient adds its terms in a fixed order (no atomic sums on CUDA, table and direct RoIs alike)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 20, 37, 45, generator=g).to(device)
    rois = _large_and_small_rois(torch.float32).to(device)
    weights = torch.randn(rois.size(0), 20, 3, 4, generator=g).to(device)
    grads = []
    for _ in range(3):
        r = rois.clone().requires_grad_()
        (prroi_pool(x, r, (3, 4), 0.5) * weights).sum().backward()
        grads.append(r.grad)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", range(3))
def test_backward_gradcheck_large_bins(device, seed):
    # bins of 3-8 cells (the CPU kernel's summed-area-table path), some boxes crossing the border
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(1, 2, 20, 24, generator=g, dtype=torch.float64).to(device)
    while True:
        xy = torch.rand(3, 2, generator=g, dtype=torch.float64) * 8 - 2
        wh = 10 + torch.rand(3, 2, generator=g, dtype=torch.float64) * 6
        rois = torch.cat([torch.zeros(3, 1, dtype=torch.float64), xy, xy + wh], 1)
        edges = _edges(rois, (2, 3), 1.0)
        if (edges - edges.round()).abs().min() > 1e-3:
            break
    index, coords = rois[:, :1].to(device), rois[:, 1:].to(device).requires_grad_()
    features = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t, c: prroi_pool(t, torch.cat([index, c], 1), (2, 3), 1.0), (features, coords)
    )


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_rois(device):
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    rois = torch.zeros(0, 5, device=device, requires_grad=True)
    out = prroi_pool(x, rois, (2, 4), 1.0)
    assert out.shape == (0, 3, 2, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape and x.grad.abs().max() == 0
    assert rois.grad.shape == (0, 5)
    assert _prroi_pool_reference(x, rois, (2, 4), 1.0).shape == (0, 3, 2, 4)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(0, 6), (6, 0), (0, 0)])
def test_a_map_without_cells_pools_zeros_with_zero_gradients(device, shape):
    # no cell to read: zero output and gradients (the box gradient's line integrals must not read the empty map)
    x = torch.zeros(1, 3, *shape, device=device, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.5, 5.0], [0, -1.0, 2.0, 30.0, 40.0]], device=device, requires_grad=True)
    out = prroi_pool(x, rois, (2, 3), 1.0)
    assert out.shape == (2, 3, 2, 3) and out.abs().max() == 0
    out.sum().backward()
    assert x.grad.shape == x.shape and rois.grad.abs().max() == 0


@needs_ops
def test_single_roi_and_list_of_boxes():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 9, generator=g)
    boxes = [torch.tensor([[1.0, 1.5, 6.0, 7.0]]), torch.tensor([[0.5, 0.5, 3.0, 4.0], [2.0, 2.0, 8.0, 5.0]])]
    single = prroi_pool(x, torch.tensor([[0, 1.0, 1.5, 6.0, 7.0]]), 2, 1.0)
    assert single.shape == (1, 3, 2, 2)
    as_list = prroi_pool(x, boxes, 2, 1.0)
    as_tensor = prroi_pool(x, torch.tensor([[0, 1.0, 1.5, 6.0, 7.0], [1, 0.5, 0.5, 3.0, 4.0],
                                            [1, 2.0, 2.0, 8.0, 5.0]]), 2, 1.0)
    torch.testing.assert_close(as_list, as_tensor)
    torch.testing.assert_close(as_list[:1], single)
    b = boxes[1].clone().requires_grad_()
    prroi_pool(x, [boxes[0], b], 2, 1.0).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bad", [2.0, -1.0, 0.5, float("nan")])
def test_batch_index_out_of_range_raises(device, bad):
    x = torch.randn(2, 3, 5, 5, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0], [bad, 1.0, 1.0, 3.0, 3.0]], device=device)
    with pytest.raises(RuntimeError, match=r"batch index.*\[0, N\) with N = 2.*row 1"):
        prroi_pool(x, rois, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"batch index"):
        _prroi_pool_reference(x, rois, 2, 1.0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_a_batch_index_near_an_integer_is_shown_with_every_digit(device):
    """1.0000001 is not an integer: the message must not round it to 1."""
    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.float64)
    rois = torch.tensor([[1.0000001, 1.0, 1.0, 3.0, 3.0]], device=device, dtype=torch.float64)
    for fn in (prroi_pool, _prroi_pool_reference):
        with pytest.raises(RuntimeError, match=r"got 1\.0000001\d* in row 0"):
            fn(x, rois, 2, 1.0)


@needs_ops
def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"rois must be Tensor\[K, 5\]"):
        prroi_pool(x, torch.zeros(3, 4), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"input must be Tensor\[N, C, H, W\]"):
        prroi_pool(x[0], torch.zeros(1, 5), 2, 1.0)
    with pytest.raises(RuntimeError, match="rois must have the dtype of input"):  # the op; the front casts
        torch.ops.d2_refine.prroi_pool(x, torch.zeros(1, 5, dtype=torch.float64), 1.0, 2, 2, False)
    with pytest.raises(TypeError, match="rois must be a floating-point tensor"):
        prroi_pool(x, torch.zeros(1, 5, dtype=torch.int64), 2, 1.0)
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        prroi_pool(x, torch.zeros(1, 5), (0, 2), 1.0)
    for fn in (prroi_pool, _prroi_pool_reference, lambda *a: PrRoIPool2d(a[2], a[3])(*a[:2])):
        with pytest.raises(ValueError, match=r"output_size must be an int or a pair \(PH, PW\), got \(2, 2, 2\)"):
            fn(x, torch.zeros(1, 5), (2, 2, 2), 1.0)
    with pytest.raises(RuntimeError, match="spatial_scale must be positive"):
        prroi_pool(x, torch.zeros(1, 5), 2, 0.0)


@needs_ops
def test_double_backward_raises():
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 3.5]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(prroi_pool(x, rois, 2, 1.0).sum(), rois, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_module_matches_function():
    pool = PrRoIPool2d(3, 0.5, aligned=True)
    assert "output_size=(3, 3)" in repr(pool) and "aligned=True" in repr(pool)
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0]])
    torch.testing.assert_close(pool(x, rois), prroi_pool(x, rois, 3, 0.5, True))


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0]], dtype=torch.float64)
    monkeypatch.setattr(prroi_module, "has_kernel", lambda op, device: False)
    monkeypatch.setattr("d2_refine.ops._library._WARNED", set())
    with pytest.warns(UserWarning, match="pure-PyTorch reference"):
        out = prroi_pool(x, rois, 2, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prroi_pool(x, rois, 2, 1.0)  # no second warning
    torch.testing.assert_close(out, _prroi_pool_reference(x, rois, 2, 1.0))


@needs_ops
def test_opcheck():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.7, 1.1, 9.3, 6.2], [1, -1.0, 2.0, 4.0, 12.5]], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.d2_refine.prroi_pool.default, (x, rois, 0.75, 2, 3, True))
    torch.library.opcheck(torch.ops.d2_refine.prroi_pool.default, (x.detach(), rois.detach(), 0.75, 2, 3, False))
    grad = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.d2_refine._prroi_pool_backward.default,
        (grad, x.detach(), rois.detach(), 0.75, 2, 3, False, True, True),
    )


@needs_ops
def test_compile_fullgraph():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.7, 1.1, 7.3, 6.2], [1, 1.0, 2.0, 4.0, 8.5]], dtype=torch.float64, requires_grad=True)

    def fn(features, boxes):
        return (prroi_pool(features, boxes, (2, 2), 1.0) ** 2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, rois)
    grads = torch.autograd.grad(out, (x, rois))
    expected = fn(x, rois)
    expected_grads = torch.autograd.grad(expected, (x, rois))
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@needs_ops
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cuda(dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 10, 10, generator=g)
    rois = torch.tensor([[0, 1.0, 1.5, 7.0, 8.0], [0, -1.0, 2.0, 4.5, 9.0]])
    expected = prroi_pool(x, rois, 3, 1.0)
    xh, rh = x.cuda().to(dtype).requires_grad_(), rois.cuda().to(dtype).requires_grad_()
    out = prroi_pool(xh, rh, 3, 1.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert torch.isfinite(xh.grad.float()).all() and torch.isfinite(rh.grad.float()).all()


def test_cuda_kernels_registered_when_built_with_cuda():
    if not (has_ops() and torch.cuda.is_available()):
        pytest.skip("needs the compiled library and CUDA")
    for op in ("prroi_pool", "_prroi_pool_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"d2_refine::{op}", "CUDA")


def _pool_case(seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 14, 15, generator=g)
    rois = _random_rois(12, 2, 28, 24, g, dtype=torch.float32, outside=3)
    weights = torch.randn(12, 6, 3, 3, generator=g)
    return x, rois, weights


def _pool_grads(x, rois, weights, fn=lambda f, b: prroi_pool(f, b, 3, 0.5)):
    """Output and gradients w.r.t. the features and the boxes of sum(weights * pool(x, rois))."""
    x, rois = x.detach().requires_grad_(), rois.detach().requires_grad_()
    out = fn(x, rois)
    (out.float() * weights).sum().backward()
    return out, x.grad, rois.grad


# bfloat16 keeps 8 significant bits: the features are rounded by 2^-9 relative, the pooled output (computed in
# float32 from them, then rounded to bfloat16) and its gradients stay within 2e-2 (absolute, for unit-variance
# features and weights) of the float32 results, box gradients within 5e-2 (they are differences of line integrals)
AMP_ATOL, AMP_BOX_ATOL = 2e-2, 5e-2


@pytest.mark.parametrize("use_kernel", [True, False])
def test_autocast_bfloat16_matches_float32(monkeypatch, use_kernel):
    if use_kernel and not has_ops():
        pytest.skip("the compiled op library d2_refine._C is not built")
    if not use_kernel:  # the pure-PyTorch fallback under autocast
        monkeypatch.setattr(prroi_module, "has_kernel", lambda op, device: False)
        monkeypatch.setattr("d2_refine.ops._library._WARNED", {("prroi_pool", "cpu")})
    x, rois, weights = _pool_case()
    conv = torch.nn.Conv2d(6, 6, 1)
    torch.nn.init.dirac_(conv.weight)
    torch.nn.init.zeros_(conv.bias)

    def pool(features, boxes):  # features from an autocast layer (bfloat16), float32 boxes: what AMP training sees
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = conv(features)
            assert f.dtype == torch.bfloat16 and boxes.dtype == torch.float32
            return prroi_pool(f, boxes, 3, 0.5, True)

    out, gx, gr = _pool_grads(x, rois, weights, pool)
    expected, ex, er = _pool_grads(x, rois, weights, lambda f, b: prroi_pool(f, b, 3, 0.5, True))
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.float32 and gr.dtype == torch.float32
    for value in (out, gx, gr):
        assert torch.isfinite(value.float()).all()
    torch.testing.assert_close(out.float(), expected, atol=AMP_ATOL, rtol=0)
    torch.testing.assert_close(gx, ex, atol=AMP_ATOL, rtol=0)
    torch.testing.assert_close(gr, er, atol=AMP_BOX_ATOL, rtol=0)
    assert gr[:, 1:].abs().sum() > 0


@needs_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_kernel_runs_the_op_in_float32(dtype):
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("d2_refine::prroi_pool", key)
    x, rois, weights = _pool_case(8)
    xh = x.to(dtype)
    # the op itself (no Python front): mixed dtypes accepted, computed in float32 from the rounded features
    with torch.autocast("cpu", dtype=dtype):
        out, gx, gr = _pool_grads(xh, rois, weights,
                                  lambda f, b: torch.ops.d2_refine.prroi_pool(f, b, 0.5, 3, 3, False))
    # the upstream gradient reaches the op through the output's cast: rounded to dtype once
    expected, ex, er = _pool_grads(xh.float(), rois, weights.to(dtype).float(), lambda f, b: prroi_pool(f, b, 3, 0.5))
    assert out.dtype == dtype and gx.dtype == dtype and gr.dtype == torch.float32
    torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=0)  # float32 result, rounded once
    torch.testing.assert_close(gx, ex.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(gr, er, atol=0, rtol=0)


def test_mixed_dtypes_without_autocast():
    x, rois, weights = _pool_case(9)
    # float32 features, float64 boxes: computed in float64, returned in float32; gradients in each own dtype
    out, gx, gr = _pool_grads(x, rois.double(), weights)
    expected, ex, er = _pool_grads(x.double(), rois.double(), weights.double())
    assert out.dtype == torch.float32 and gx.dtype == torch.float32 and gr.dtype == torch.float64
    torch.testing.assert_close(out, expected.float())
    torch.testing.assert_close(gr, er)
    # bfloat16 features and boxes on CPU: computed in float32, returned in bfloat16
    xb, rb = x.bfloat16(), rois.bfloat16()
    out, gx, gr = _pool_grads(xb, rb, weights)
    expected, _, _ = _pool_grads(xb.float(), rb.float(), weights)
    assert out.dtype == gx.dtype == gr.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)


@needs_ops
def test_compile_fullgraph_under_autocast():
    x, rois, _ = _pool_case(10)
    conv = torch.nn.Conv2d(6, 4, 1)

    def fn(features, boxes):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return prroi_pool(conv(features), boxes, (2, 3), 0.5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xs, rs = x.clone().requires_grad_(), rois.clone().requires_grad_()
    out = compiled(xs, rs)
    expected = fn(x, rois)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert torch.isfinite(xs.grad).all() and rs.grad[:, 1:].abs().sum() > 0


@needs_ops
def test_opcheck_float32_and_empty():
    x = torch.randn(2, 3, 7, 8, requires_grad=True)
    rois = torch.tensor([[1, 0.7, 1.1, 9.3, 6.2]], requires_grad=True)
    torch.library.opcheck(torch.ops.d2_refine.prroi_pool.default, (x, rois, 0.5, 3, 2, False))
    torch.library.opcheck(torch.ops.d2_refine.prroi_pool.default, (x, rois[:0], 0.5, 3, 2, False))


def test_official_interface_module():
    pool = PrRoIPool2D(3, 4, spatial_scale=0.5)
    assert pool.pooled_height == 3 and pool.pooled_width == 4 and pool.spatial_scale == 0.5
    assert "kernel_size=(3, 4), spatial_scale=0.5" in repr(pool)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 12, 16, generator=g)
    rois = torch.tensor([[0, 1.0, 3.0, 17.0, 20.5], [1, -2.0, 0.5, 9.0, 7.0]])
    # the original convention: no half-pixel shift (aligned=False), rows (batch index, x0, y0, x1, y1)
    torch.testing.assert_close(pool(x, rois), prroi_pool(x, rois, (3, 4), 0.5, aligned=False))
    assert not torch.allclose(pool(x, rois), prroi_pool(x, rois, (3, 4), 0.5, aligned=True))


def test_official_interface_unit_bins_are_2x2_means():
    # with no half-pixel shift, a bin that is exactly the cell [j, j + 1] x [i, i + 1] integrates the bilinear
    # map over it: the mean of the cell's four corner values, i.e. avg_pool2d(kernel 2, stride 1) at (i, j)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 10, 12, generator=g, requires_grad=True)
    stride = 4  # spatial_scale 1/4: box (4 j0, 4 i0, 4 (j0 + 5), 4 (i0 + 5)) covers the cells j0 .. j0 + 4
    rois = torch.tensor([[0, 4.0 * 2, 4.0 * 1, 4.0 * 7, 4.0 * 6], [1, 4.0 * 6, 4.0 * 4, 4.0 * 11, 4.0 * 9]])
    out = PrRoIPool2D(5, 5, 1.0 / stride)(x, rois)
    means = torch.nn.functional.avg_pool2d(x, kernel_size=2, stride=1)
    torch.testing.assert_close(out, torch.stack([means[0, :, 1:6, 2:7], means[1, :, 4:9, 6:11]]))
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("op", ["prroi_pool", "multilevel_prroi_pool"])
def test_deterministic_mode_refuses_only_the_scattered_feature_gradient(device, op):
    """Under ``torch.use_deterministic_algorithms(True)`` the CUDA backward refuses the feature gradient, which it
    scatters with atomics (as torchvision's roi_align backward does), and still gives the box gradient (IoU-Net's
    refinement), which is the same at every call; the CPU backward is deterministic and refuses nothing."""
    from d2_refine.ops import multilevel_prroi_pool

    maps = [torch.randn(1, 2, 16, 16, device=device), torch.randn(1, 2, 8, 8, device=device)]
    boxes = torch.tensor([[1.0, 1.0, 30.0, 22.0], [3.0, 2.0, 60.0, 50.0]], device=device)

    def pool(feats, b):
        if op == "prroi_pool":
            rois = torch.cat([b.new_zeros(len(b), 1), b], dim=1)
            return prroi_pool(feats[0], rois, 2, 0.5)
        return multilevel_prroi_pool(feats, [b], 2, (0.5, 0.25), canonical_box_size=32, canonical_level=2)

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        b = boxes.clone().requires_grad_()
        (g,) = torch.autograd.grad(pool(maps, b).sum(), b)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        feats = [m.clone().requires_grad_() for m in maps]
        out = pool(feats, boxes).sum()
        if device == "cuda":
            with pytest.raises(RuntimeError, match="deterministic"):
                out.backward()
        else:
            out.backward()
            assert feats[0].grad.abs().sum() > 0
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
