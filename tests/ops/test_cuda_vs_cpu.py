"""The CUDA kernels against the CPU kernels on the same inputs (skipped, with the reason, where CUDA is absent).

The CPU kernels are themselves tested against the pure-PyTorch references (test_prroi_pool.py,
test_iou_guided_nms.py); here every CUDA result is compared with the CPU result of the same op:
- PrRoIPool forward, feature gradient and box gradient, float64 and float32, aligned or not, RoIs of every size
  (below a cell to larger than the map, partly outside it); float16 / bfloat16 on CUDA against float32 on CPU
  within the stated tolerances; RoIs whose bins all take the CUDA table path (>= 2 cells), also with the
  channels split into several table chunks (D2_REFINE_PRROI_TABLE_MB);
- IoU-guided NMS: identical keep sets, order and scores, with a class of more than 256 candidates (more than one
  pass of a thread block) and more than 65,536 candidates in all;
- opcheck (schema, fake, autograd registrations) and torch.compile of both ops on CUDA;
- a bad batch index raises a RuntimeError on either device, also through the op itself (checked in a fresh
  process, so that a crash fails the test instead of ending the run).
"""
import subprocess
import sys

import pytest
import torch

from d2_refine.ops import iou_guided_nms, prroi_pool
from helpers import needs_ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    needs_ops,
]


def _features_and_rois(dtype, num_rois=96, seed=0, channels=8, size=(37, 53)):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = torch.randn(2, channels, h, w, generator=g, dtype=torch.float64)
    # RoI sizes from a quarter of a cell to 1.5x the map, anywhere in [-10, W + 10] x [-10, H + 10]
    wh = torch.exp(torch.empty(num_rois, 2, dtype=torch.float64).uniform_(-1.4, 4.4, generator=g))
    x1 = torch.empty(num_rois, dtype=torch.float64).uniform_(-10, w + 10, generator=g)
    y1 = torch.empty(num_rois, dtype=torch.float64).uniform_(-10, h + 10, generator=g)
    batch = torch.randint(0, 2, (num_rois,), generator=g).double()
    rois = torch.stack([batch, x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], 1)
    return x.to(dtype), rois.to(dtype)


def _pool_with_grads(x, rois, device, aligned, output_size=(7, 5), scale=0.5):
    x = x.detach().to(device).clone().requires_grad_()
    r = rois.detach().to(device).clone().requires_grad_()
    out = prroi_pool(x, r, output_size, scale, aligned=aligned)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=out.dtype)
    out.backward(upstream)
    return out.detach().cpu(), x.grad.cpu(), r.grad.cpu()


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_prroi_pool_forward_and_gradients(dtype, tol, aligned):
    x, rois = _features_and_rois(dtype)
    cpu = _pool_with_grads(x, rois, "cpu", aligned)
    cuda = _pool_with_grads(x, rois, "cuda", aligned)
    for name, a, b in zip(("output", "feature grad", "box grad"), cuda, cpu):
        assert a.dtype == b.dtype == dtype, name
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _large_bin_rois(num_rois, size, seed, dtype):
    """RoIs whose 7 x 5 bins (scale 0.5) are 2 to 9 cells on both sides: the CUDA table path only."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    wh = torch.empty(num_rois, 2, dtype=torch.float64).uniform_(2 * 2 * 7, 2 * 9 * 5, generator=g)
    x1 = torch.empty(num_rois, dtype=torch.float64).uniform_(-20, 2 * w - 20, generator=g)
    y1 = torch.empty(num_rois, dtype=torch.float64).uniform_(-20, 2 * h - 20, generator=g)
    batch = torch.randint(0, 2, (num_rois,), generator=g).double()
    return torch.stack([batch, x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], 1).to(dtype)


@pytest.mark.parametrize("table_mb", [None, "0.01"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_prroi_pool_table_path_vs_cpu(dtype, tol, table_mb, monkeypatch):
    """Large bins (the summed-area-table kernels); "0.01" MiB: a table of a few channels, so the 40 channels are
    processed in several chunks."""
    if table_mb is not None:
        monkeypatch.setenv("D2_REFINE_PRROI_TABLE_MB", table_mb)
    x, _ = _features_and_rois(dtype, channels=40, size=(37, 53))
    rois = _large_bin_rois(64, (37, 53), seed=5, dtype=dtype)
    for aligned in (False, True):
        cpu = _pool_with_grads(x, rois, "cpu", aligned)
        cuda = _pool_with_grads(x, rois, "cuda", aligned)
        for name, a, b in zip(("output", "feature grad", "box grad"), cuda, cpu):
            assert b.abs().max() > 0, name
            scale = b.abs().max().clamp_min(1.0)
            torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_prroi_pool_table_path_benchmark_size_vs_cpu():
    """The op benchmark's case (benchmarks/ops.py, 256 channels, a 200 x 304 map, RoIs of 16-400 px at stride 4),
    fewer RoIs: the mixture of table and direct RoIs the benchmark times."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 200, 304, generator=g)
    size = torch.empty(48, 2).uniform_(16, 400, generator=g)
    x1 = torch.rand(48, generator=g) * (4 * 304 - size[:, 0])
    y1 = torch.rand(48, generator=g) * (4 * 200 - size[:, 1])
    rois = torch.cat([torch.zeros(48, 1), torch.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1)], 1)
    cpu = _pool_with_grads(x, rois, "cpu", True, output_size=(7, 7), scale=0.25)
    cuda = _pool_with_grads(x, rois, "cuda", True, output_size=(7, 7), scale=0.25)
    for name, a, b in zip(("output", "feature grad", "box grad"), cuda, cpu):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


# half precision on CUDA (accumulated in float32) vs float32 on CPU; errors relative to the largest magnitude
# of each result: the inputs themselves are rounded to 11 (float16) or 8 (bfloat16) significant bits
HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prroi_pool_half_precision_vs_cpu_float32(dtype):
    x, rois = _features_and_rois(torch.float32, seed=3)
    # the same rounded inputs on both sides, so the tolerance covers the kernel's arithmetic only
    x, rois = x.to(dtype).float(), rois.to(dtype).float()
    cpu = _pool_with_grads(x, rois, "cpu", aligned=True)
    cuda = _pool_with_grads(x.to(dtype), rois.to(dtype), "cuda", aligned=True)
    tol = HALF_TOL[dtype]
    for name, a, b in zip(("output", "feature grad", "box grad"), cuda, cpu):
        assert a.dtype == dtype, name
        assert torch.isfinite(a.float()).all(), name
        scale = b.abs().max().clamp_min(1e-6)
        err = ((a.float() - b).abs().max() / scale).item()
        assert err <= tol, f"{name}: max error {err:.2e} of the largest magnitude > {tol:.0e}"


def _nms_candidates(num_boxes, num_classes, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_boxes, 2, generator=g, dtype=torch.float64) * 600
    wh = torch.empty(num_boxes, 2, dtype=torch.float64).uniform_(8, 120, generator=g)
    boxes = torch.cat([xy, xy + wh], 1).to(dtype)
    scores = torch.rand(num_boxes, generator=g, dtype=torch.float64).to(dtype)
    ious = torch.rand(num_boxes, generator=g, dtype=torch.float64).to(dtype)
    classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
    return boxes, scores, ious, classes


@pytest.mark.parametrize("guide", ["rank", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_boxes,num_classes", [
    (3000, 2),       # ~1,500 candidates per class: several passes of a 256-thread block per kept box
    (70000, 40),     # > 65,536 candidates in all, ~1,750 per class
])
def test_iou_guided_nms_identical_on_cpu_and_cuda(num_boxes, num_classes, dtype, guide):
    boxes, scores, ious, classes = _nms_candidates(num_boxes, num_classes, seed=num_boxes, dtype=dtype)
    assert torch.bincount(classes).min() > 256
    keep_cpu, scores_cpu = iou_guided_nms(boxes, scores, ious, classes, 0.5, guide)
    keep_cuda, scores_cuda = iou_guided_nms(boxes.cuda(), scores.cuda(), ious.cuda(), classes.cuda(), 0.5, guide)
    assert keep_cuda.is_cuda and keep_cuda.dtype == torch.int64
    assert len(keep_cpu) > num_classes  # the case is not trivial: many boxes kept per class
    assert torch.equal(keep_cuda.cpu(), keep_cpu)
    assert torch.equal(scores_cuda.cpu(), scores_cpu)


def test_opcheck_cuda():
    x, rois = _features_and_rois(torch.float32, num_rois=12, channels=3, size=(9, 11))
    x, rois = x.cuda().requires_grad_(), rois.cuda().requires_grad_()
    for aligned in (False, True):
        torch.library.opcheck(torch.ops.d2_refine.prroi_pool.default, (x, rois, 0.5, 3, 2, aligned))
    boxes, scores, ious, classes = (t.cuda() for t in _nms_candidates(300, 3, seed=4, dtype=torch.float32))
    for guide in ("rank", "weight", "none"):
        torch.library.opcheck(torch.ops.d2_refine.iou_guided_nms.default, (boxes, scores, ious, classes, 0.5, guide))


def test_compile_cuda():
    """torch.compile with the default (inductor) backend: the ops stay opaque calls inside generated code."""
    x, rois = _features_and_rois(torch.float32, num_rois=20, channels=4, size=(15, 17))
    x, rois = x.cuda(), rois.cuda()

    def pool(features, boxes):
        return (prroi_pool(features, boxes, (3, 3), 0.5, aligned=True) ** 2).sum()

    compiled = torch.compile(pool, fullgraph=True)
    xs, rs = x.clone().requires_grad_(), rois.clone().requires_grad_()
    out = compiled(xs, rs)
    out.backward()
    xe, re = x.clone().requires_grad_(), rois.clone().requires_grad_()
    expected = pool(xe, re)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xs.grad, xe.grad)
    torch.testing.assert_close(rs.grad, re.grad)

    boxes, scores, ious, classes = (t.cuda() for t in _nms_candidates(500, 4, seed=5, dtype=torch.float32))

    def nms(b, s, i, c):
        keep, kept = iou_guided_nms(b, s, i, c, 0.5, "weight")
        return b[keep] * 2, kept

    out_boxes, out_scores = torch.compile(nms, fullgraph=True, dynamic=True)(boxes, scores, ious, classes)
    expected_boxes, expected_scores = nms(boxes, scores, ious, classes)
    torch.testing.assert_close(out_boxes, expected_boxes)
    torch.testing.assert_close(out_scores, expected_scores)


_BAD_BATCH_INDEX = """
import sys, torch, d2_refine.ops as ops
device, direct = sys.argv[1], sys.argv[2] == "direct"
x = torch.randn(2, 3, 5, 5, device=device)
rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0], [2.0, 1.0, 1.0, 3.0, 3.0]], device=device)
try:
    if direct:  # the op as registered, without the Python front
        torch.ops.d2_refine.prroi_pool(x, rois, 1.0, 2, 2, False)
    else:
        ops.prroi_pool(x, rois, 2, 1.0)
except RuntimeError as e:
    print("RuntimeError:", str(e).splitlines()[0])
    sys.exit(0)
sys.exit("no error raised")
"""


@pytest.mark.parametrize("path", ["front", "direct"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bad_batch_index_raises_in_a_fresh_process(device, path):
    proc = subprocess.run([sys.executable, "-c", _BAD_BATCH_INDEX, device, path], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "batch index" in proc.stdout, proc.stdout
