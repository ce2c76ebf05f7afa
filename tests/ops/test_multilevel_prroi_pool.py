"""Multi-level Precise RoI Pooling: one call for all FPN levels equals a prroi_pool call per level on the boxes
detectron2's level assignment gives it (forward and both gradients), on the kernels and the reference."""
import math

import pytest
import torch

from d2_refine.ops import _multilevel_prroi_pool_reference, has_ops, multilevel_prroi_pool, prroi_pool
from d2_refine.ops.multilevel_prroi_pool import box_levels
from helpers import cpu_and_cuda, needs_ops

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def _case(device="cpu", dtype=torch.float64, counts=(7, 0, 5), channels=3, size=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(len(counts), channels, int(size * s), int(size * s), generator=g, dtype=dtype).to(device)
            for s in SCALES]
    boxes = []
    for c in counts:
        xy = torch.rand(c, 2, generator=g, dtype=dtype) * size * 0.8
        wh = torch.exp(torch.rand(c, 2, generator=g, dtype=dtype) * math.log(size)) + 1  # 2 px .. the image
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
    return maps, boxes


def _per_level(maps, boxes, output_size, canonical_box_size, canonical_level, aligned):
    """ROIPooler's loop: the level of each box (detectron2's formula), one prroi_pool call per level."""
    flat = torch.cat(boxes)
    images = torch.cat([torch.full((len(b),), i, dtype=flat.dtype, device=flat.device) for i, b in enumerate(boxes)])
    rois = torch.cat([images[:, None], flat], 1)
    area = (flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    level = level.clamp(2, 2 + len(maps) - 1).long() - 2
    out = flat.new_zeros((len(flat), maps[0].shape[1], output_size, output_size))
    for lvl, (m, s) in enumerate(zip(maps, SCALES)):
        rows = torch.nonzero(level == lvl)[:, 0]
        out = out.index_copy(0, rows, prroi_pool(m, rois[rows], output_size, s, aligned))
    return out


def _pool_and_grads(fn, maps, boxes, weights):
    maps = [m.clone().requires_grad_() for m in maps]
    boxes = [b.clone().requires_grad_() for b in boxes]
    out = fn(maps, boxes)
    (out * weights).sum().backward()
    return out, [m.grad for m in maps], [b.grad for b in boxes]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("canonical", [(224, 4), (32, 3)])
def test_equals_one_prroi_pool_call_per_level(device, aligned, canonical):
    maps, boxes = _case(device)
    box_size, level = canonical
    levels = box_levels(torch.cat(boxes), box_size, level, 2, 4)
    assert len(levels.unique()) >= 2  # the case spans several levels
    weights = torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    out, map_grads, box_grads = _pool_and_grads(
        lambda m, b: multilevel_prroi_pool(m, b, 5, SCALES, box_size, level, aligned), maps, boxes, weights)
    ref, ref_map_grads, ref_box_grads = _pool_and_grads(
        lambda m, b: _per_level(m, b, 5, box_size, level, aligned), maps, boxes, weights)
    torch.testing.assert_close(out, ref)
    for a, b in zip(map_grads + box_grads, ref_map_grads + ref_box_grads):
        torch.testing.assert_close(a, b)
    assert sum(float(g.abs().sum()) for g in box_grads) > 0


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_kernel_matches_reference(device):
    maps, boxes = _case(device, seed=2)
    counts = [len(b) for b in boxes]
    args = (counts, list(SCALES), 224.0, 4, 4, 4, False)
    out = multilevel_prroi_pool(maps, boxes, 4, SCALES)
    ref = _multilevel_prroi_pool_reference(maps, torch.cat(boxes), *args)
    torch.testing.assert_close(out, ref)


@needs_ops
def test_backward_gradcheck():
    maps, boxes = _case(counts=(3, 2), channels=2, size=64, seed=3)
    flat = torch.cat(boxes).requires_grad_()
    maps = [m.requires_grad_() for m in maps]

    def fn(*args):
        *ms, b = args
        return multilevel_prroi_pool(list(ms), [b[:3], b[3:]], 3, SCALES, 32, 3)

    assert torch.autograd.gradcheck(fn, (*maps, flat), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_degenerate_boxes_pool_zeros_and_empty_input(device):
    maps, _ = _case(device, counts=(0, 0))
    boxes = [torch.tensor([[10.0, 10.0, 5.0, 30.0], [float("nan"), 1.0, 2.0, 3.0], [4.0, 4.0, 4.0, 9.0]],
                          dtype=torch.float64, device=device), torch.zeros((0, 4), dtype=torch.float64, device=device)]
    out = multilevel_prroi_pool(maps, boxes, 3, SCALES)
    assert out.shape == (3, 3, 3, 3) and torch.equal(out, torch.zeros_like(out))
    empty = multilevel_prroi_pool(maps, [b[:0] for b in boxes], 3, SCALES)
    assert empty.shape == (0, 3, 3, 3)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bad", [(0, math.nan), (2, math.inf), (2, -math.inf), (0, -math.inf), (0, math.inf)])
def test_a_non_finite_coordinate_pools_zeros_whatever_its_sign(device, bad):
    """Whatever the sign of the infinity (which decides the level: +inf the largest, -inf a NaN area), the box pools
    zeros with zero gradients, in the kernel and the reference alike; the other boxes are untouched."""
    maps, boxes = _case(device, counts=(3, 2), channels=2, size=128, seed=7)
    column, value = bad
    broken = [b.clone() for b in boxes]
    broken[1][1, column] = value  # image 1, box 1: row 4 of the flat list
    fns = [lambda m, b: _multilevel_prroi_pool_reference(m, torch.cat(b), [3, 2], list(SCALES), 224.0, 4, 3, 3,
                                                         False)]
    if has_ops():
        fns.append(lambda m, b: multilevel_prroi_pool(m, b, 3, SCALES))
    weights = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    for i, fn in enumerate(fns):
        good, _, _ = _pool_and_grads(fn, maps, boxes, weights)
        out, map_grads, box_grads = _pool_and_grads(fn, maps, broken, weights)
        assert torch.equal(out[4], torch.zeros_like(out[4]))
        if i == 0 and device == "cuda":  # the reference's matrix products on cuBLAS: one box fewer, other kernels
            torch.testing.assert_close(out[:4], good[:4], rtol=0, atol=1e-12)
        else:
            assert torch.equal(out[:4], good[:4])
        assert torch.equal(box_grads[1][1], torch.zeros(4, dtype=torch.float64, device=device))
        assert all(torch.isfinite(g).all() for g in map_grads + box_grads if g is not None)  # None: a level unused


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_a_box_whose_width_overflows_pools_zeros(device):
    """Finite float32 coordinates near the type's largest value, whose difference overflows: level -1, zeros and
    zero gradients, in the kernel and the reference alike (on CUDA its bins were infinite, its output NaN); the
    other boxes are untouched."""
    maps, boxes = _case(device, dtype=torch.float32, counts=(3, 2), channels=2, size=128, seed=7)
    broken = [b.clone() for b in boxes]
    broken[1][1] = torch.tensor([-3e38, 10.0, 3e38, 20.0], device=device)  # x2 - x1 = inf in float32
    assert box_levels(torch.cat(broken), 224, 4, 2, 4).tolist()[4] == -1
    fns = [lambda m, b: _multilevel_prroi_pool_reference(m, torch.cat(b), [3, 2], list(SCALES), 224.0, 4, 3, 3,
                                                         False)]
    if has_ops():
        fns.append(lambda m, b: multilevel_prroi_pool(m, b, 3, SCALES))
    weights = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(2)).to(device)
    for fn in fns:
        good, _, _ = _pool_and_grads(fn, maps, boxes, weights)
        out, map_grads, box_grads = _pool_and_grads(fn, maps, broken, weights)
        assert torch.equal(out[4], torch.zeros_like(out[4]))
        torch.testing.assert_close(out[:4], good[:4], rtol=0, atol=1e-6)
        assert torch.equal(box_grads[1][1], torch.zeros(4, device=device))
        assert all(torch.isfinite(g).all() for g in map_grads + box_grads if g is not None)


@needs_ops
def test_bad_arguments_raise_naming_them():
    maps, boxes = _case(counts=(2, 1))
    with pytest.raises(ValueError, match="one scale per map"):
        multilevel_prroi_pool(maps, boxes, 3, SCALES[:3])
    with pytest.raises(RuntimeError, match="halve from one level"):
        multilevel_prroi_pool(maps, boxes, 3, (1 / 4, 1 / 8, 1 / 8, 1 / 32))
    with pytest.raises(RuntimeError, match="boxes_per_image must hold one count per image"):
        multilevel_prroi_pool(maps, boxes[:1], 3, SCALES)
    with pytest.raises(RuntimeError, match=r"inputs\[1\] must be Tensor\[N, C, H, W\]"):
        multilevel_prroi_pool([maps[0], maps[1][:, :2]] + maps[2:], boxes, 3, SCALES)
    with pytest.raises(ValueError, match=r"multilevel_prroi_pool: output_size must be an int or a pair \(PH, PW\), "
                                         r"got \(2, 2, 2\)"):
        multilevel_prroi_pool(maps, boxes, (2, 2, 2), SCALES)


@needs_ops
def test_opcheck():
    maps, boxes = _case(counts=(3, 2), channels=2, size=64, seed=5)
    flat = torch.cat(boxes).requires_grad_()
    args = ([m.requires_grad_() for m in maps], flat, [3, 2], list(SCALES), 224.0, 4, 3, 3, False)
    torch.library.opcheck(torch.ops.d2_refine.multilevel_prroi_pool, args)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_autocast_runs_in_float32(device):
    maps, boxes = _case(device, dtype=torch.float32, seed=6)
    expected = multilevel_prroi_pool(maps, boxes, 3, SCALES)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = multilevel_prroi_pool([m.bfloat16() for m in maps], boxes, 3, SCALES)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_keep_their_level(device, dtype):
    # the area of a box over 256 x 256 px overflows float16 (65504): the level is found in float32, on the device
    # (CUDA's kernel takes half-precision maps and boxes as they are) as in the reference
    boxes = torch.tensor([[10.0, 20.0, 330.0, 340.0], [0.0, 0.0, 100.0, 60.0], [5.0, 5.0, 505.0, 455.0]],
                         device=device)
    assert box_levels(boxes, 224, 4, 2, 4).tolist() == [2, 0, 3]
    rounded = boxes.to(dtype).float()
    torch.testing.assert_close(box_levels(boxes.to(dtype), 224, 4, 2, 4), box_levels(rounded, 224, 4, 2, 4))
    maps, _ = _case(device, dtype=torch.float32, counts=(3,), channels=2, size=512, seed=7)
    maps = [m.to(dtype) for m in maps]
    out = multilevel_prroi_pool(maps, [boxes.to(dtype)], 3, SCALES)
    expected = multilevel_prroi_pool([m.float() for m in maps], [rounded], 3, SCALES)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_gradient_is_the_same_at_every_call(device):
    # the boxes' gradient adds its bins' terms in a fixed order (no atomic sums on CUDA)
    maps, boxes = _case(device, dtype=torch.float32, counts=(6, 4), channels=8, seed=11)
    weights = torch.randn(10, 8, 7, 7, generator=torch.Generator().manual_seed(3)).to(device)
    grads = [_pool_and_grads(lambda m, b: multilevel_prroi_pool(m, b, 7, SCALES), maps, boxes, weights)[2]
             for _ in range(3)]
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))
