"""IoU-guided NMS: kernels and the vectorised reference vs a plain-Python reading of the IoU-Net paper's
IoU-guided NMS, plain-NMS equivalence with torchvision, edge cases, registration (opcheck, torch.compile)."""
import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import batched_nms, box_iou

from d2_refine.ops import (
    _iou_guided_nms_padded_reference,
    _iou_guided_nms_reference,
    has_ops,
    iou_guided_nms,
    iou_guided_nms_padded,
)
from helpers import cpu_and_cuda, needs_ops

nms_module = importlib.import_module("d2_refine.ops.iou_guided_nms")  # the module, not the function
GUIDES = ["rank", "weight", "none"]


def _iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float("nan")


def _python_iou_guided_nms(boxes, p, q, cls, threshold, guide):
    """Plain-Python reading of IoU-guided NMS: per class, greedy NMS on the ranking key (ties: smaller index first);
    each candidate belongs to the first kept box in ranking order overlapping it above the threshold (a kept box
    to itself); a kept box's score is the max p over its members; sorted by that score (ties: smaller index)."""
    n = len(boxes)
    key = [q[i] if guide == "rank" else p[i] * q[i] if guide == "weight" else p[i] for i in range(n)]
    score = {}
    for c in sorted(set(cls)):
        ranked = sorted((i for i in range(n) if cls[i] == c), key=lambda i: (-key[i], i))
        kept = []
        for i in ranked:
            if not any(_iou(boxes[k], boxes[i]) > threshold for k in kept):
                kept.append(i)
        for k in kept:
            score[k] = p[k]
        if guide == "none":
            continue
        for i in ranked:
            owner = next(k for k in kept if k == i or _iou(boxes[k], boxes[i]) > threshold)
            score[owner] = max(score[owner], p[i])
    keep = sorted(score, key=lambda k: (-score[k], k))
    return keep, [score[k] for k in keep]


def _clustered_candidates(n, num_classes, generator, dtype=torch.float64):
    """Boxes around a few centres (so that many overlap), random p, q and classes."""
    centres = torch.rand(6, 2, generator=generator, dtype=dtype) * 200
    which = torch.randint(0, 6, (n,), generator=generator)
    xy = centres[which] + torch.randn(n, 2, generator=generator, dtype=dtype) * 8
    wh = 20 + torch.rand(n, 2, generator=generator, dtype=dtype) * 40
    boxes = torch.cat([xy, xy + wh], 1)
    p = 0.05 + 0.95 * torch.rand(n, generator=generator, dtype=dtype)
    q = torch.rand(n, generator=generator, dtype=dtype)
    cls = torch.randint(0, num_classes, (n,), generator=generator)
    return boxes, p, q, cls


def _check_against_python(fn, boxes, p, q, cls, threshold, guide):
    keep, scores = fn(boxes, p, q, cls, threshold, guide)
    expected_keep, expected_scores = _python_iou_guided_nms(
        boxes.tolist(), p.tolist(), q.tolist(), cls.tolist(), threshold, guide
    )
    assert keep.dtype == torch.int64 and scores.dtype == p.dtype
    assert keep.cpu().tolist() == expected_keep
    torch.testing.assert_close(scores.cpu(), torch.tensor(expected_scores, dtype=p.dtype), rtol=0, atol=0)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("seed", range(4))
def test_matches_python_reading_on_random_sets(device, guide, seed):
    g = torch.Generator().manual_seed(seed)
    boxes, p, q, cls = _clustered_candidates(150, 3, g)
    threshold = [0.5, 0.3, 0.7, 0.5][seed]
    _check_against_python(
        lambda *a: iou_guided_nms(*(t.to(device) if torch.is_tensor(t) else t for t in a)),
        boxes, p, q, cls, threshold, guide,
    )


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_python_reading_on_random_sets(guide, seed):
    g = torch.Generator().manual_seed(10 + seed)
    boxes, p, q, cls = _clustered_candidates(120, 4, g)
    _check_against_python(_iou_guided_nms_reference, boxes, p, q, cls, 0.5, guide)


@needs_ops
@settings(deadline=None, max_examples=40)
@given(
    n=st.integers(1, 40), num_classes=st.integers(1, 3), seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.3, 0.5, 0.7]), guide=st.sampled_from(GUIDES),
)
def test_property_kernel_equals_python_reading(n, num_classes, seed, threshold, guide):
    g = torch.Generator().manual_seed(seed)
    boxes, p, q, cls = _clustered_candidates(n, num_classes, g)
    _check_against_python(iou_guided_nms, boxes, p, q, cls, threshold, guide)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(20)
    boxes, p, q, cls = (t.to(device) for t in _clustered_candidates(500, 5, g))
    boxes, p, q = boxes.to(dtype), p.to(dtype), q.to(dtype)
    for guide in GUIDES:
        keep, scores = iou_guided_nms(boxes, p, q, cls, 0.5, guide)
        ref_keep, ref_scores = _iou_guided_nms_reference(boxes, p, q, cls, 0.5, guide)
        assert torch.equal(keep, ref_keep)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_guide_none_is_batched_nms(device):
    g = torch.Generator().manual_seed(21)
    boxes, p, q, cls = (t.to(device) for t in _clustered_candidates(400, 4, g))
    keep, scores = iou_guided_nms(boxes, p, q, cls, 0.5, "none")
    expected = batched_nms(boxes, p, cls, 0.5)
    assert torch.equal(keep, expected)
    assert torch.equal(scores, p[expected])


@needs_ops
def test_invariants():
    g = torch.Generator().manual_seed(22)
    boxes, p, q, cls = _clustered_candidates(300, 3, g)
    keep, scores = iou_guided_nms(boxes, p, q, cls, 0.5, "rank")
    assert (scores[:-1] >= scores[1:]).all()  # sorted by updated score
    assert (scores >= p[keep]).all()  # a kept box's score is at least its own p
    iou = box_iou(boxes[keep], boxes[keep])
    same = cls[keep][:, None] == cls[keep][None, :]
    assert not ((iou > 0.5) & same & ~torch.eye(len(keep), dtype=torch.bool)).any()  # kept boxes do not overlap
    # every candidate overlaps a kept box of its class (or is one), and the scores only come from members
    cover = (box_iou(boxes[keep], boxes) > 0.5) & (cls[keep][:, None] == cls[None, :])
    assert cover.any(0).all()
    assert set(scores.tolist()) <= set(p.tolist())


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_iou_equal_to_the_threshold_suppresses_nothing_in_kernel_and_reference(device, dtype):
    # IoU 3 / 10, the threshold 0.3 rounded to the compute dtype: not above it, so both boxes stay
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]], dtype=dtype, device=device)
    args = (boxes, torch.tensor([0.9, 0.8], dtype=dtype, device=device),
            torch.tensor([0.5, 0.6], dtype=dtype, device=device), torch.zeros(2, dtype=torch.int64, device=device))
    assert float(box_iou(boxes[:1], boxes[1:])) == float(torch.tensor(0.3, dtype=dtype))
    for fn in (iou_guided_nms, _iou_guided_nms_reference):
        keep, _ = fn(*args, 0.3)
        assert sorted(keep.tolist()) == [0, 1], fn.__name__


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_and_single(device):
    empty = torch.zeros(0, 4, device=device)
    keep, scores = iou_guided_nms(empty, torch.zeros(0, device=device), torch.zeros(0, device=device),
                                  torch.zeros(0, dtype=torch.int64, device=device), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64 and scores.shape == (0,)
    none = torch.zeros(0, device=device)
    ref_keep, ref_scores = _iou_guided_nms_reference(empty, none, none, none.long(), 0.5)
    assert ref_keep.shape == (0,) and ref_scores.shape == (0,)
    keep, scores = iou_guided_nms(torch.tensor([[1.0, 2.0, 5.0, 6.0]], device=device),
                                  torch.tensor([0.7], device=device), torch.tensor([0.2], device=device),
                                  torch.tensor([3], device=device), 0.5)
    assert keep.tolist() == [0] and scores.tolist() == pytest.approx([0.7])


@needs_ops
def test_paper_example_kept_box_takes_max_score():
    # the best-localised box (highest q) is kept and takes the best classification score of its cluster
    boxes = torch.tensor([[0, 0, 10, 10], [0.5, 0.5, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60.0]])
    p = torch.tensor([0.9, 0.3, 0.6, 0.4])
    q = torch.tensor([0.6, 0.95, 0.7, 0.8])
    keep, scores = iou_guided_nms(boxes, p, q, torch.zeros(4, dtype=torch.int64), 0.5)
    assert keep.tolist() == [1, 3] and scores.tolist() == pytest.approx([0.9, 0.4])
    keep, scores = iou_guided_nms(boxes, p, q, torch.tensor([0, 1, 0, 0]), 0.5)  # box 1 alone in class 1
    assert keep.tolist() == [2, 3, 1] and scores.tolist() == pytest.approx([0.9, 0.4, 0.3])


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_degenerate_boxes_and_mixed_dtypes(device):
    boxes = torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 4, 4], [0, 0, 4, 4.0]], device=device)
    p = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64, device=device)  # computed in float64
    q = torch.tensor([0.9, 0.8, 0.1, 0.2], device=device)
    keep, scores = iou_guided_nms(boxes, p, q, torch.zeros(4, dtype=torch.int32, device=device), 0.5)
    # zero-area boxes (IoU 0/0) never suppress; the identical pair keeps the higher q and takes the higher p
    assert keep.tolist() == [3, 1, 0] and scores.tolist() == [0.8, 0.6, 0.5]  # exactly p's values
    assert scores.dtype == torch.float64 and torch.isfinite(scores).all()


def test_bad_arguments_raise_clear_errors():
    boxes, p = torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match="guide must be one of"):
        iou_guided_nms(boxes, p, p, p.long(), 0.5, "max")
    with pytest.raises(ValueError, match=r"boxes must be Tensor\[N, 4\]"):
        iou_guided_nms(torch.zeros(3, 5), p, p, p.long(), 0.5)
    with pytest.raises(ValueError, match=r"ious must be Tensor\[N\] with N = 3"):
        iou_guided_nms(boxes, p, torch.zeros(2), p.long(), 0.5)
    if has_ops():
        with pytest.raises(RuntimeError, match="guide must be one of"):
            torch.ops.d2_refine.iou_guided_nms(boxes, p, p, p.long(), 0.5, "max")
        with pytest.raises(RuntimeError, match="idxs .* must be an integer tensor"):
            torch.ops.d2_refine.iou_guided_nms(boxes, p, p, p, 0.5, "rank")


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    g = torch.Generator().manual_seed(23)
    boxes, p, q, cls = _clustered_candidates(60, 2, g)
    monkeypatch.setattr(nms_module, "has_kernel", lambda op, device: False)
    monkeypatch.setattr("d2_refine.ops._library._WARNED", set())
    with pytest.warns(UserWarning, match="pure-PyTorch reference"):
        keep, scores = iou_guided_nms(boxes, p, q, cls, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iou_guided_nms(boxes, p, q, cls, 0.5)
    ref_keep, ref_scores = _iou_guided_nms_reference(boxes, p, q, cls, 0.5)
    assert torch.equal(keep, ref_keep) and torch.equal(scores, ref_scores)


@needs_ops
def test_opcheck():
    g = torch.Generator().manual_seed(24)
    boxes, p, q, cls = _clustered_candidates(50, 3, g, dtype=torch.float32)
    for guide in GUIDES:
        torch.library.opcheck(torch.ops.d2_refine.iou_guided_nms.default, (boxes, p, q, cls, 0.5, guide))
    empty = (boxes[:0], p[:0], q[:0], cls[:0], 0.5, "rank")
    torch.library.opcheck(torch.ops.d2_refine.iou_guided_nms.default, empty)
    as_double = (boxes.double(), p.double(), q.double(), cls, 0.5, "weight")
    torch.library.opcheck(torch.ops.d2_refine.iou_guided_nms.default, as_double)


@needs_ops
def test_compile_fullgraph():
    g = torch.Generator().manual_seed(25)
    boxes, p, q, cls = _clustered_candidates(80, 3, g, dtype=torch.float32)

    def fn(b, s, i, c):
        keep, scores = iou_guided_nms(b, s, i, c, 0.5, "weight")
        return b[keep], scores

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    out_boxes, out_scores = compiled(boxes, p, q, cls)
    expected_boxes, expected_scores = fn(boxes, p, q, cls)
    torch.testing.assert_close(out_boxes, expected_boxes)
    torch.testing.assert_close(out_scores, expected_scores)


@pytest.mark.parametrize("call", ["front", "op"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_under_autocast_run_in_float32(call, dtype):
    if call == "op" and not has_ops():
        pytest.skip("the compiled op library d2_refine._C is not built")
    g = torch.Generator().manual_seed(26)
    boxes, p, q, cls = (t.to(dtype) if t.is_floating_point() else t for t in _clustered_candidates(120, 3, g))
    for guide in GUIDES:
        # expected: the float32 computation on the same (rounded) values
        expected_keep, expected_scores = iou_guided_nms(boxes.float(), p.float(), q.float(), cls, 0.5, guide)
        with torch.autocast("cpu", dtype=dtype):
            if call == "front":
                keep, scores = iou_guided_nms(boxes, p, q, cls, 0.5, guide)
            else:
                keep, scores = torch.ops.d2_refine.iou_guided_nms(boxes, p, q, cls, 0.5, guide)
        assert keep.dtype == torch.int64 and scores.dtype == dtype  # kept scores in the dtype of scores
        assert torch.equal(keep, expected_keep)
        assert torch.equal(scores, expected_scores.to(dtype))  # values of p: the round trip is exact


def test_mixed_dtypes_run_in_float32_and_return_scores_dtype():
    g = torch.Generator().manual_seed(27)
    boxes, p, q, cls = _clustered_candidates(100, 2, g, dtype=torch.float32)
    keep, scores = iou_guided_nms(boxes.half(), p, q.bfloat16(), cls, 0.5)
    expected_keep, expected_scores = iou_guided_nms(boxes.half().float(), p, q.bfloat16().float(), cls, 0.5)
    assert torch.equal(keep, expected_keep) and torch.equal(scores, expected_scores)
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("padded", [iou_guided_nms_padded, _iou_guided_nms_padded_reference])
def test_padded_is_the_compact_result_then_padding(device, padded):
    """iou_guided_nms_padded: the kept indices and scores of iou_guided_nms, then -1 and 0 up to N, and their count
    as a device tensor (on CUDA its kernel finds the class segments and the order without a host read)."""
    if padded is iou_guided_nms_padded and not has_ops():
        pytest.skip("the compiled op library d2_refine._C is not built")
    g = torch.Generator().manual_seed(30)
    boxes, p, q, cls = (t.to(device) for t in _clustered_candidates(300, 4, g))
    for guide in GUIDES:
        keep, scores = iou_guided_nms(boxes, p, q, cls, 0.5, guide)
        pkeep, pscores, num = padded(boxes, p, q, cls, 0.5, guide)
        k = len(keep)
        assert pkeep.shape == (300,) and pscores.shape == (300,) and pscores.dtype == p.dtype
        assert num.shape == () and num.dtype == torch.int64 and num.device == boxes.device and int(num) == k
        assert torch.equal(pkeep[:k], keep) and torch.equal(pscores[:k], scores)
        assert (pkeep[k:] == -1).all() and (pscores[k:] == 0).all()
    empty = padded(boxes[:0], p[:0], q[:0], cls[:0], 0.5, "rank")
    assert empty[0].shape == (0,) and int(empty[2]) == 0


@needs_ops
def test_padded_opcheck_and_compile_fullgraph_with_static_shapes():
    g = torch.Generator().manual_seed(31)
    boxes, p, q, cls = _clustered_candidates(60, 3, g, dtype=torch.float32)
    for guide in GUIDES:
        torch.library.opcheck(torch.ops.d2_refine.iou_guided_nms_padded.default, (boxes, p, q, cls, 0.5, guide))

    def fn(b, s, i, c):
        keep, scores, num = iou_guided_nms_padded(b, s, i, c, 0.5, "rank")
        return b[keep.clamp(min=0)], scores, num

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(boxes, p, q, cls), fn(boxes, p, q, cls)):
        torch.testing.assert_close(a, b)
