"""Optimisation-based box refinement (IoU-Net paper, Jiang et al., ECCV 2018, Algorithm 2). Torch only.

Gradient ascent of the predicted IoU w.r.t. the box coordinates, for all boxes at once (the loop is over steps only;
a fixed number of them, the stop rule a mask on the device). The IoU predictor is passed in as a function, so any
differentiable pooling can be used; the gradient is taken with ``torch.autograd.grad`` w.r.t. the boxes only, under
``torch.enable_grad``: it works inside ``torch.no_grad()`` evaluation and with frozen parameters, and fills no
parameter's ``.grad``.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import torch

__all__ = ["refine_boxes", "RefineResult"]

#: ``iou_fn(boxes, rows) -> ious``: boxes (Tensor[B, 4], may require grad), rows (Tensor[B] int64: the
#: indices of these boxes among the boxes given to :func:`refine_boxes`, to look up class / image) ->
#: predicted IoUs (Tensor[B]), differentiable w.r.t. boxes.
IoUFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RefineResult(NamedTuple):
    boxes: torch.Tensor  #: Tensor[B, 4] refined boxes (detached)
    ious: torch.Tensor  #: Tensor[B] predicted IoU of the refined boxes (as returned: after clipping)
    init_ious: torch.Tensor  #: Tensor[B] predicted IoU of the input boxes
    steps: torch.Tensor  #: Tensor[B] int64, number of update steps taken per box


def _clip(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    h, w = image_size
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                        boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)


def refine_boxes(boxes: torch.Tensor, iou_fn: IoUFn, steps: int = 5, step_size: float = 0.5,
                 early_stop: float = 0.001, degrade_tol: float = -0.01, revert_on_degrade: bool = False,
                 image_size: Optional[Tuple[int, int]] = None, valid: Optional[torch.Tensor] = None) -> RefineResult:
    """Refine ``boxes`` by gradient ascent of ``iou_fn``.

    Each step moves an active box by ``step_size * grad * (w, h, w, h)`` (ascent in scale-normalised
    coordinates, with its current width and height). A box stops when its IoU gain ``d`` satisfies
    ``|d| < early_stop`` or ``d < degrade_tol``; it keeps the new box even when the gain is negative, unless
    ``revert_on_degrade`` (then a degrading step is undone). At most ``steps`` steps.

    Laid out for the GPU: every step evaluates all B boxes, and the stop rule is a mask on the device (a stopped
    box stays where it is and keeps its result), so nothing in the loop waits for the device. The same under
    ``torch.inference_mode()``, ``torch.no_grad()`` and plain mode: the boxes are copied out of inference mode
    before the gradient is taken (``iou_fn`` must not save inference tensors for backward: clone its features
    outside inference mode, as :class:`~.roi_heads.IoUNetROIHeads` does).

    Args:
        boxes (Tensor[B, 4]): (x0, y0, x1, y1) boxes.
        iou_fn: see :data:`IoUFn` (``rows`` is always ``arange(B)``).
        image_size ((h, w) or None): clip the final boxes to the image when given; the IoUs returned are then
            those of the clipped boxes (predicted again for the boxes that the clipping changed).
        valid (Tensor[B] bool or None): rows to refine; the others (padding) take no step.
    Returns:
        :class:`RefineResult`.
    """
    with torch.inference_mode(False):
        boxes = boxes.detach().clone()  # a normal tensor, also when the caller is in inference mode
        n = len(boxes)
        taken = torch.zeros(n, dtype=torch.int64, device=boxes.device)
        if n == 0:
            empty = boxes.new_zeros((0,))
            return RefineResult(boxes, empty, empty.clone(), taken)
        rows = torch.arange(n, device=boxes.device)
        active = torch.ones(n, dtype=torch.bool, device=boxes.device) if valid is None else valid.clone()
        with torch.enable_grad():
            # ``cur`` (leaf) and ``q``: the last evaluated boxes and their IoUs; ``out_*``: the result so far
            cur = boxes.requires_grad_(True)
            q = iou_fn(cur, rows)
            init_q = q.detach().clone()
            out_boxes, out_q = cur.detach().clone(), init_q.clone()
            for _ in range(steps):
                if q.requires_grad:
                    (g,) = torch.autograd.grad(q.sum(), cur, allow_unused=True, materialize_grads=True)
                    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                else:  # the predictor does not depend on the boxes: nothing to ascend
                    g = torch.zeros_like(cur)
                old, q_old = cur.detach(), q.detach()
                wh = (old[:, 2:] - old[:, :2]).clamp(min=0).repeat(1, 2)
                cur = torch.where(active[:, None], old + step_size * g * wh, old).requires_grad_(True)
                q = iou_fn(cur, rows)
                gain = q.detach() - q_old
                upd_boxes, upd_q = cur.detach(), q.detach()
                if revert_on_degrade:
                    bad = gain < degrade_tol
                    upd_boxes = torch.where(bad[:, None], old, upd_boxes)
                    upd_q = torch.where(bad, q_old, upd_q)
                out_boxes = torch.where(active[:, None], upd_boxes, out_boxes)
                out_q = torch.where(active, upd_q, out_q)
                taken = taken + active.long()
                active = active & ~((gain.abs() < early_stop) | (gain < degrade_tol))
        if image_size is not None:
            clipped = _clip(out_boxes, image_size)
            moved = (clipped != out_boxes).any(dim=1)
            with torch.no_grad():
                out_q = torch.where(moved, iou_fn(clipped, rows).detach(), out_q)
            out_boxes = clipped
    return RefineResult(out_boxes, out_q, init_q, taken)
