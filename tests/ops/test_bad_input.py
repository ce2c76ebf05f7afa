"""Fuzzed bad input for both ops (no detectron2 needed): empty sets, zero-area, inverted, off-map, huge and
non-finite boxes, non-finite scores, every accepted dtype and wrong ones. Each call either raises a clear Python
exception or returns a finite result equal to the pure-PyTorch reference on the valid input, never NaN, never a
crash of the process (docs/BAD_INPUT.md lists the cases; d2_refine/ops/README.md the rules)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from d2_refine.ops import (
    _iou_guided_nms_reference,
    _prroi_pool_reference,
    has_ops,
    iou_guided_nms,
    iou_guided_nms_padded,
    prroi_pool,
)
from d2_refine.ops._library import compute_dtype
from helpers import cpu_and_cuda, needs_ops, run_python

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NON_FINITE = [math.nan, math.inf, -math.inf]
# ordinary coordinates around an 8 x 8 map (stride 1 or 2), plus the bad ones: huge, overflowing float32, non-finite
COORD = st.one_of(
    st.floats(-20, 40, allow_nan=False, width=32),
    st.sampled_from([0.0, 4.0, 1e4, -1e4, 1e30, -1e30, 3e38, -3e38, 1e300, *NON_FINITE]),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ prroi_pool


@pytest.mark.parametrize("device", cpu_and_cuda())
@given(
    boxes=st.lists(st.tuples(st.integers(0, 1), COORD, COORD, COORD, COORD), max_size=6),
    feature_dtype=st.sampled_from(FLOATS),
    roi_dtype=st.sampled_from(FLOATS),
    spatial_scale=st.sampled_from([1.0, 0.5]),
    aligned=st.booleans(),
)
@FUZZ
# a box 2.2e-16 high: float32 geometry cannot resolve it (see below)
@example(boxes=[(0, 0.0, 0.0, 0.0, 0.0), (0, 0.0, -2.220446049250313e-16, 1.0, 0.0)], feature_dtype=torch.float32,
         roi_dtype=torch.float32, spatial_scale=1.0, aligned=False)
def test_prroi_pool_fuzzed_boxes(device, boxes, feature_dtype, roi_dtype, spatial_scale, aligned):
    """A finite result equal to the float64 reference, or a ValueError for a box that is not finite in the dtype
    the op computes in (also after scaling, and as width and height). Where the op computes in float32, a box
    thinner than float32 resolves (e.g. 2.2e-16 px high) integrates to 0 there, as in the reference run in float32,
    while float64 gives the average along the line: such a row equals the reference in the op's own dtype."""
    g = torch.Generator().manual_seed(len(boxes))
    features = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64).to(device=device, dtype=feature_dtype)
    rois = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 5).to(device=device, dtype=roi_dtype)
    features.requires_grad_(True)
    rois.requires_grad_(True)
    # the dtype the op computes in: the wider of the two, float32 for half types (CPU) and float32 at least
    # for the check on CUDA's native half path (its geometry is in float32: at::opmath_type)
    dtype = compute_dtype(features, rois)
    scaled = rois.detach().to(dtype)[:, 1:] * spatial_scale - (0.5 if aligned else 0.0)
    extents = scaled[:, 2:] - scaled[:, :2]
    valid = torch.isfinite(scaled).all(1) & torch.isfinite(extents).all(1)
    if not bool(valid.all()):
        row = int((~valid).nonzero()[0, 0])
        with pytest.raises(ValueError, match=rf"prroi_pool: box coordinates must be finite.*rois row {row} "):
            prroi_pool(features, rois, 2, spatial_scale, aligned)
        with pytest.raises(ValueError, match=rf"rois row {row} "):  # the reference, in the same dtype
            _prroi_pool_reference(features.detach().to(dtype), rois.detach().to(dtype), 2, spatial_scale, aligned)
        return
    out = prroi_pool(features, rois, 2, spatial_scale, aligned)
    assert out.dtype == feature_dtype and out.shape == (len(boxes), 3, 2, 2)
    assert torch.isfinite(out).all(), out
    expected = _prroi_pool_reference(features.detach().double(), rois.detach().double(), 2, spatial_scale, aligned)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(out.dtype, 2e-2)
    if dtype != torch.float64:  # float32 geometry (coordinates up to 1e4 and more: bin edges rounded)
        tol = max(tol, 1e-3)
        same_dtype = _prroi_pool_reference(features.detach().to(dtype), rois.detach().to(dtype), 2, spatial_scale,
                                           aligned).double()
        close = lambda a, b: ((a - b).abs() <= tol + tol * b.abs()).flatten(1).all(1)  # noqa: E731
        magnitude = scaled.abs().amax(1, keepdim=True).clamp_min(1)
        thin = ((extents > 0) & (extents < 1e-5 * magnitude)).any(1)  # below float32's resolution, relatively
        unresolved = thin & ~close(out.double(), expected) & close(out.double(), same_dtype)
        expected = torch.where(unresolved[:, None, None, None], same_dtype, expected)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(rois.grad).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("column", [1, 2, 3, 4])
def test_prroi_pool_non_finite_coordinate_raises_value_error(device, bad, column):
    features = torch.randn(1, 2, 6, 6, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0], [0, 1.0, 1.0, 4.0, 4.0]], device=device)
    rois[1, column] = bad
    for fn in (prroi_pool, _prroi_pool_reference):
        with pytest.raises(ValueError, match=r"box coordinates must be finite.*rois row 1 = \(0, "):
            fn(features, rois, 2, 1.0)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_prroi_pool_backward_called_directly_checks_boxes_first(device):
    """The backward op called by itself (no forward to check first) with a non-finite box, without channels and with
    a bad batch index: the same ValueError on both devices (CUDA returned zeros without channels, and checked the
    batch index first)."""
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0], [3, 1.0, math.nan, 4.0, 4.0]], device=device)
    for channels in (0, 2):
        feats = torch.randn(1, channels, 6, 6, device=device)
        g = torch.randn(2, channels, 2, 2, device=device)
        with pytest.raises(ValueError, match="box coordinates must be finite"):
            torch.ops.d2_refine._prroi_pool_backward(g, feats, rois, 1.0, 2, 2, False, True, True)


def test_prroi_pool_overflow_after_scaling_raises_value_error():
    """Finite float32 boxes whose width (3e38 - -3e38) or scaled corner (3e38 * 16) overflows float32."""
    features = torch.randn(1, 2, 6, 6)
    for box, scale in (([0, -3e38, 0, 3e38, 4], 1.0), ([0, 1, 1, 3e38, 4], 16.0)):
        rois = torch.tensor([box], dtype=torch.float32)
        for fn in (prroi_pool, _prroi_pool_reference):
            with pytest.raises(ValueError, match="also after scaling"):
                fn(features, rois, 2, scale)
        # the same box in float64 is fine: a finite (tiny) mean over a huge bin
        assert torch.isfinite(prroi_pool(features.double(), rois.double(), 2, scale)).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_prroi_pool_integer_dtypes_raise_type_error(device, dtype):
    features, rois = torch.randn(1, 2, 6, 6, device=device), torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], device=device)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        prroi_pool(features.to(dtype), rois, 2)
    with pytest.raises(TypeError, match="rois must be a floating-point tensor"):
        prroi_pool(features, rois.to(dtype), 2)


@pytest.mark.parametrize("fn", [prroi_pool, _prroi_pool_reference], ids=["op", "reference"])
@pytest.mark.parametrize("output_size, spatial_scale, message", [
    ((0, 2), 1.0, "output_size must be positive"),
    ((2, -1), 1.0, "output_size must be positive"),
    (2, 0.0, "spatial_scale must be positive"),
    (2, -0.5, "spatial_scale must be positive"),
    (2, math.nan, "spatial_scale must be positive and finite"),
    (2, math.inf, "spatial_scale must be positive and finite"),
])
def test_prroi_pool_bad_size_and_scale_raise(fn, output_size, spatial_scale, message):
    """The reference (the fallback without the compiled library) refuses what the kernels refuse."""
    with pytest.raises(RuntimeError, match=message):
        fn(torch.randn(1, 2, 6, 6), torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]]), output_size, spatial_scale)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(0, 3, 6, 6), (1, 0, 6, 6), (1, 3, 0, 0)],
                         ids=["no-image", "no-channel", "no-pixel"])
def test_prroi_pool_empty_maps(device, shape):
    """Empty batches and maps: zeros of the right shape (no RoI can refer to an image of an empty batch)."""
    features = torch.randn(shape, device=device)
    rois = torch.zeros(0, 5, device=device) if shape[0] == 0 else torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], device=device)
    out = prroi_pool(features, rois, 2)
    assert out.shape == (rois.size(0), shape[1], 2, 2) and not out.any()


@needs_ops
def test_raising_kernels_do_not_kill_the_process():
    """C++ exceptions of both kernels (ValueError / RuntimeError / TypeError) reach Python in a fresh process,
    which then carries on (a C++ runtime that aborts on throw would end it with a signal)."""
    r = run_python("""
        import math, torch
        from d2_refine.ops import prroi_pool, iou_guided_nms
        x = torch.randn(1, 2, 6, 6)
        calls = [
            lambda: torch.ops.d2_refine.prroi_pool(x, torch.tensor([[0, math.nan, 0, 4, 4.0]]), 1.0, 2, 2, False),
            lambda: torch.ops.d2_refine.prroi_pool(x, torch.tensor([[5, 0, 0, 4, 4.0]]), 1.0, 2, 2, False),
            lambda: torch.ops.d2_refine.prroi_pool(x, torch.zeros(1, 5), math.inf, 2, 2, False),
            lambda: torch.ops.d2_refine.iou_guided_nms(torch.zeros(2, 4), torch.ones(2), torch.ones(2),
                                                      torch.zeros(2, dtype=torch.long), math.nan, "rank"),
            lambda: torch.ops.d2_refine.iou_guided_nms(torch.zeros(2, 4), torch.ones(2), torch.ones(2),
                                                      torch.zeros(2), 0.5, "rank"),
        ]
        for call in calls:
            for _ in range(3):
                try:
                    call()
                except (ValueError, RuntimeError, TypeError) as e:
                    print(type(e).__name__, str(e).splitlines()[0][:60])
                else:
                    raise SystemExit("no error")
        print("alive")
    """, detectron2="missing", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "alive", r.stdout
    assert r.stdout.count("ValueError") == 3 * 2 and r.stdout.count("RuntimeError") == 3 * 3, r.stdout


# -------------------------------------------------------------------------------------------- iou_guided_nms

SCORE = st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 1.0, 1e30, -1e30, *NON_FINITE]))


def _expected_nms(boxes, scores, ious, idxs, threshold, guide, dtype):
    """The reference, in the op's compute dtype, on the candidates whose values are finite (the others take no
    part), with its indices mapped back."""
    finite = torch.isfinite(boxes).all(1) & torch.isfinite(scores)
    if guide != "none":
        finite &= torch.isfinite(ious)
    index = finite.nonzero()[:, 0]
    keep, kept = _iou_guided_nms_reference(boxes[index].to(dtype), scores[index].to(dtype), ious[index].to(dtype),
                                           idxs[index], threshold, guide)
    return index[keep], kept


@pytest.mark.parametrize("device", cpu_and_cuda())
@given(
    candidates=st.lists(st.tuples(st.integers(0, 2), SCORE, SCORE, COORD, COORD, COORD, COORD), max_size=10),
    dtypes=st.tuples(*[st.sampled_from(FLOATS)] * 3),
    threshold=st.sampled_from([-0.1, 0.0, 0.3, 0.5, 0.7, 1.0, math.inf]),
    guide=st.sampled_from(["rank", "weight", "none"]),
)
@FUZZ
def test_iou_guided_nms_fuzzed_candidates(device, candidates, dtypes, threshold, guide):
    """Finite kept scores, equal to the reference on the finite candidates; non-finite candidates are dropped."""
    table = torch.tensor(candidates, dtype=torch.float64).reshape(-1, 7)
    idxs = table[:, 0].long().to(device)
    scores, ious, boxes = (t.to(device=device, dtype=d) for t, d in
                           zip((table[:, 1], table[:, 2], table[:, 3:]), dtypes))
    keep, kept_scores = iou_guided_nms(boxes, scores, ious, idxs, threshold, guide)
    assert keep.dtype == torch.int64 and kept_scores.dtype == scores.dtype
    assert torch.isfinite(kept_scores).all(), kept_scores
    assert keep.unique().numel() == keep.numel()
    expected_keep, expected_scores = _expected_nms(boxes.cpu(), scores.cpu(), ious.cpu(), idxs.cpu(), threshold,
                                                   guide, compute_dtype(boxes, scores, ious))
    assert keep.cpu().tolist() == expected_keep.tolist()
    torch.testing.assert_close(kept_scores.cpu(), expected_scores.to(scores.dtype), rtol=0, atol=0)
    _assert_padded_equals_compact(boxes, scores, ious, idxs, threshold, guide, keep, kept_scores)


def _assert_padded_equals_compact(boxes, scores, ious, idxs, threshold, guide, keep, kept_scores):
    """iou_guided_nms_padded: the compact result, then -1 / 0 rows, and its count (on the CUDA kernel the
    non-finite candidates are dropped on the device, not compacted away)."""
    padded_keep, padded_scores, num_kept = iou_guided_nms_padded(boxes, scores, ious, idxs, threshold, guide)
    k = keep.numel()
    assert num_kept.item() == k and padded_keep.numel() == boxes.size(0)
    assert padded_keep[:k].tolist() == keep.tolist() and set(padded_keep[k:].tolist()) <= {-1}
    torch.testing.assert_close(padded_scores[:k], kept_scores, rtol=0, atol=0)
    assert not padded_scores[k:].any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("guide", ["rank", "weight", "none"])
def test_iou_guided_nms_drops_non_finite_candidates(device, guide):
    """A NaN / inf box, score or (ranked-by) IoU neither is kept nor suppresses nor lends its score."""
    nan, inf = math.nan, math.inf
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [nan, 0, 10, 10], [0, 0, inf, 10], [20, 20, 30, 30],
                          [0, 0, 10, 10], [0, 0, 10, 10]], device=device)
    p = torch.tensor([0.5, 0.4, 0.9, 0.9, 0.3, nan, inf], device=device)
    q = torch.tensor([0.5, 0.6, 0.9, 0.9, 0.7, 0.99, 0.99], device=device)
    keep, scores = iou_guided_nms(boxes, p, q, torch.zeros(7, dtype=torch.long, device=device), 0.5, guide)
    # 0 and 1 overlap (IoU 0.68): guide rank keeps 1 (higher q) with p = max(0.4, 0.5); 4 is apart
    expected = {"rank": ([1, 4], [0.5, 0.3]), "weight": ([0, 4], [0.5, 0.3]), "none": ([0, 4], [0.5, 0.3])}[guide]
    assert (keep.tolist(), scores.tolist()) == (expected[0], pytest.approx(expected[1]))
    _assert_padded_equals_compact(boxes, p, q, torch.zeros(7, dtype=torch.long, device=device), 0.5, guide, keep,
                                  scores)
    q_nan = q.clone()
    q_nan[1] = nan  # ranked by q (rank, weight): dropped; guide "none" does not read q
    keep, _ = iou_guided_nms(boxes[:2], p[:2], q_nan[:2], torch.zeros(2, dtype=torch.long, device=device), 0.5, guide)
    assert keep.tolist() == [0]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_iou_guided_nms_bad_dtypes_and_threshold(device):
    boxes, p = torch.zeros(3, 4, device=device), torch.zeros(3, device=device)
    idxs = torch.zeros(3, dtype=torch.long, device=device)
    for name, args in (("boxes", (boxes.long(), p, p)), ("scores", (boxes, p.long(), p)),
                       ("ious", (boxes, p, p.int()))):
        for fn in (iou_guided_nms, _iou_guided_nms_reference):
            with pytest.raises(TypeError, match=f"iou_guided_nms: {name} must be a floating-point tensor"):
                fn(*args, idxs, 0.5)
    for bad in (p, p.bool()):
        with pytest.raises(TypeError, match=r"idxs \(class indices\) must be an integer tensor"):
            iou_guided_nms(boxes, p, p, bad, 0.5)
    for fn in (iou_guided_nms, _iou_guided_nms_reference):
        with pytest.raises(ValueError, match="iou_threshold must be a number, got nan"):
            fn(boxes, p, p, idxs, math.nan)
        with pytest.raises(TypeError, match="iou_threshold must be a number, got None"):
            fn(boxes, p, p, idxs, None)
    if has_ops():
        with pytest.raises(ValueError, match="iou_threshold must be a number, got nan"):
            torch.ops.d2_refine.iou_guided_nms(boxes, p, p, idxs, math.nan, "rank")
