import pytest
import torch

from d2_refine.projects.iounet.jitter import apply_deltas, pairwise_iou
from d2_refine.projects.iounet.refine import refine_boxes


def _analytic_iou_fn(targets):
    """A fixed, differentiable 'IoU head': the true IoU with a hidden target box per row."""

    def fn(boxes, rows):
        t = targets[rows]
        lt = torch.maximum(boxes[:, :2], t[:, :2])
        rb = torch.minimum(boxes[:, 2:], t[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        return inter / (area(boxes) + area(t) - inter)

    return fn


def _jittered(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, 2, generator=g) * 200
    targets = torch.cat([targets, targets + 20 + torch.rand(n, 2, generator=g) * 80], 1)
    deltas = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 0.3, 0.8 + torch.rand(n, 2, generator=g) * 0.4], 1)
    boxes = torch.stack([apply_deltas(targets[i : i + 1], deltas[i : i + 1])[0, 0] for i in range(n)])
    return boxes, targets


def test_refinement_increases_predicted_iou():
    boxes, targets = _jittered()
    fn = _analytic_iou_fn(targets)
    res = refine_boxes(boxes, fn, steps=5, step_size=0.5)
    assert torch.isfinite(res.boxes).all() and torch.isfinite(res.ious).all()
    true_before = pairwise_iou(boxes, targets).diagonal()
    true_after = pairwise_iou(res.boxes, targets).diagonal()
    torch.testing.assert_close(res.init_ious, true_before)
    torch.testing.assert_close(res.ious, true_after)
    assert res.ious.mean() > res.init_ious.mean() + 0.05
    # per box: improved, or stopped early with a bounded degradation (Algorithm 2 keeps that last step)
    assert ((res.ious >= res.init_ious - 1e-6) | (res.steps < 5)).all()
    assert (res.steps >= 1).all() and (res.steps <= 5).all()


def test_revert_never_degrades():
    boxes, targets = _jittered(seed=1)
    res = refine_boxes(boxes, _analytic_iou_fn(targets), steps=5, step_size=2.0, revert_on_degrade=True)
    assert (res.ious >= res.init_ious - 0.01 - 1e-6).all()


def test_works_under_no_grad_with_frozen_params_and_leaves_no_grad():
    boxes, targets = _jittered(8)
    lin = torch.nn.Linear(4, 1)
    lin.requires_grad_(False)
    base = _analytic_iou_fn(targets)

    def fn(b, rows):  # frozen parameters inside the predictor
        return base(b, rows) + 0.0 * lin(b / 100)[:, 0]

    with torch.no_grad():
        res = refine_boxes(boxes, fn)
    assert res.ious.mean() > res.init_ious.mean()
    assert lin.weight.grad is None
    assert not res.boxes.requires_grad


def test_early_stop_when_converged():
    boxes, targets = _jittered(4)
    res = refine_boxes(targets.clone(), _analytic_iou_fn(targets), steps=5)
    # at the optimum the gain is ~0: every box stops after one step
    assert (res.steps == 1).all()
    torch.testing.assert_close(res.ious, torch.ones(4))


def test_empty_and_clip():
    res = refine_boxes(torch.zeros((0, 4)), lambda b, r: b.sum(1))
    assert res.boxes.shape == (0, 4) and res.ious.shape == (0,)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    res = refine_boxes(boxes, lambda b, r: b[:, 2] / 100, steps=3, image_size=(60, 55))
    assert res.boxes[0, 2] <= 55 and res.steps[0] == 3


def test_refinement_through_prroi_pool_on_a_fixed_head():
    """A fixed 'head' on PrRoIPool features: channel 0 is the indicator of a hidden target box, so the pooled
    bins integrate to the intersection area and inter / union is a differentiable IoU estimate."""
    from d2_refine.ops import prroi_pool

    stride, size = 4.0, 160
    target = torch.tensor([40.0, 52.0, 112.0, 100.0])
    ys, xs = torch.meshgrid(torch.arange(size // 4) * stride, torch.arange(size // 4) * stride, indexing="ij")
    inside = (xs >= target[0]) & (xs <= target[2]) & (ys >= target[1]) & (ys <= target[3])
    feat = inside.float()[None, None]

    def head(boxes, rows):
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)
        pooled = prroi_pool(feat, rois, 7, 1 / stride)[:, 0]  # K x 7 x 7
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        inter = pooled.mean((1, 2)) * area
        t_area = float(inside.sum()) * stride ** 2
        return inter / (area + t_area - inter)

    boxes = torch.tensor([[30.0, 40.0, 100.0, 90.0], [50.0, 60.0, 125.0, 115.0], [36.0, 50.0, 120.0, 108.0]])
    res = refine_boxes(boxes, head, steps=5, step_size=0.5)
    assert torch.isfinite(res.boxes).all() and torch.isfinite(res.ious).all()
    assert (res.ious > res.init_ious).all()
    true_before = pairwise_iou(boxes, target[None])[:, 0]
    true_after = pairwise_iou(res.boxes, target[None])[:, 0]
    assert (true_after > true_before).all()


def test_returned_ious_are_those_of_the_clipped_boxes():
    """A predictor that prefers boxes reaching further right: refinement moves the right edges past the image,
    the output is clipped, and the IoU returned (the one score x IoU uses) is that of the clipped box."""
    boxes = torch.tensor([[100.0, 20.0, 180.0, 90.0], [10.0, 10.0, 60.0, 60.0]])

    def fn(b, rows):
        return (b[:, 0] + b[:, 2]) / 4.0  # a toy predictor, steep enough to move a box ~10 px per step

    res = refine_boxes(boxes, fn, steps=5, step_size=0.5, image_size=(100, 200))
    assert res.boxes[0, 2] == 200 and res.boxes[1, 2] < 200 and res.boxes.min() >= 0  # row 0 was clipped
    torch.testing.assert_close(res.ious, fn(res.boxes, torch.arange(2)))
    unclipped = refine_boxes(boxes, fn, steps=5, step_size=0.5)
    assert unclipped.boxes[0, 2] > 200 and unclipped.ious[0] > res.ious[0] + 1.0  # before clipping: higher
    torch.testing.assert_close(unclipped.ious[1], res.ious[1])  # an unclipped box keeps its IoU


def _refine_active_subset(boxes, iou_fn, steps, step_size, early_stop, degrade_tol, revert_on_degrade):
    """Algorithm 2 as first written here: each step evaluates only the boxes still moving, found with a nonzero
    (a host synchronisation per step on a GPU) and stops when none is left. The oracle of the fixed-step loop."""
    n = len(boxes)
    out_boxes, taken = boxes.clone(), torch.zeros(n, dtype=torch.int64)
    rows = torch.arange(n)
    cur = boxes.clone().requires_grad_(True)
    q = iou_fn(cur, rows)
    init_q = q.detach().clone()
    out_q, idx = init_q.clone(), torch.arange(n)
    for _ in range(steps):
        (g,) = torch.autograd.grad(q.index_select(0, idx).sum(), cur)
        g = torch.nan_to_num(g.index_select(0, idx), nan=0.0, posinf=0.0, neginf=0.0)
        rows, old, q_old = rows[idx], cur.detach()[idx], q.detach()[idx]
        wh = (old[:, 2:] - old[:, :2]).clamp(min=0).repeat(1, 2)
        cur = (old + step_size * g * wh).requires_grad_(True)
        q = iou_fn(cur, rows)
        gain = q.detach() - q_old
        upd_boxes, upd_q = cur.detach(), q.detach()
        if revert_on_degrade:
            bad = gain < degrade_tol
            upd_boxes, upd_q = torch.where(bad[:, None], old, upd_boxes), torch.where(bad, q_old, upd_q)
        out_boxes[rows], out_q[rows] = upd_boxes, upd_q
        taken[rows] += 1
        idx = torch.nonzero(~((gain.abs() < early_stop) | (gain < degrade_tol)))[:, 0]
        if len(idx) == 0:
            break
    return out_boxes, out_q, init_q, taken


@pytest.mark.parametrize("step_size,revert", [(0.5, False), (2.0, True), (3.0, False)])
def test_fixed_steps_with_a_stop_mask_equal_the_active_subset_loop(step_size, revert):
    """Every step on every box, a stopped box held by a mask: the same boxes, IoUs and step counts as evaluating
    only the moving boxes (boxes stop at different steps here)."""
    boxes, targets = _jittered(48, seed=4)
    fn = _analytic_iou_fn(targets)
    kw = dict(steps=15, step_size=step_size, early_stop=0.001, degrade_tol=-0.01, revert_on_degrade=revert)
    res = refine_boxes(boxes, fn, **kw)
    ref_boxes, ref_q, ref_init, ref_steps = _refine_active_subset(boxes, fn, **kw)
    assert len(ref_steps.unique()) > 1  # boxes stop at different steps
    assert torch.equal(res.steps, ref_steps)
    torch.testing.assert_close(res.boxes, ref_boxes)
    torch.testing.assert_close(res.ious, ref_q)
    torch.testing.assert_close(res.init_ious, ref_init)


def test_padding_rows_take_no_step():
    boxes, targets = _jittered(6, seed=5)
    valid = torch.tensor([True, True, False, True, False, True])
    res = refine_boxes(boxes, _analytic_iou_fn(targets), valid=valid)
    full = refine_boxes(boxes, _analytic_iou_fn(targets))
    assert (res.steps[~valid] == 0).all() and torch.equal(res.boxes[~valid], boxes[~valid])
    torch.testing.assert_close(res.boxes[valid], full.boxes[valid])


def test_the_same_under_inference_mode():
    """Boxes created under inference_mode are inference tensors: the gradient must still be taken."""
    boxes, targets = _jittered(16, seed=6)
    fn = _analytic_iou_fn(targets)
    ref = refine_boxes(boxes, fn)
    with torch.inference_mode():
        res = refine_boxes(boxes.clone(), fn)
    assert (ref.steps > 1).any()
    assert torch.equal(res.steps, ref.steps)
    torch.testing.assert_close(res.boxes, ref.boxes)
