"""IoU-Net inference for one image (IoU-Net paper, Jiang et al., ECCV 2018; stages in the order of the
reproduction). Torch / torchvision / d2_refine.ops only.

Box-head outputs -> candidates -> IoU-guided NMS (or plain class-wise NMS) -> optimisation-based refinement
of the best boxes -> score x predicted IoU -> top-k. Every stage can be switched off; with all of them off
this is detectron2's ``fast_rcnn_inference_single_image``.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from torchvision.ops import batched_nms

from .refine import refine_boxes

__all__ = ["iounet_inference_single_image", "NMS_MODES"]

#: ``MODEL.IOU_NET.NMS_TEST`` -> the ranking key of :func:`d2_refine.ops.iou_guided_nms`, or None for detectron2's
#: class-wise NMS on the cls score ("plain")
NMS_MODES = {"iou_guided": "rank", "iou_guided_score_x_iou": "weight", "plain": None}

#: ``iou_fn(boxes) -> ious``: boxes (Tensor[B, 4]) -> decoded IoUs of every class (Tensor[B, K], or
#: Tensor[B, 1] class-agnostic), differentiable w.r.t. the boxes.
AllClassIoUFn = Callable[[torch.Tensor], torch.Tensor]


def _clip(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    h, w = image_size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def _at_class(ious: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    if ious.shape[1] == 1:
        return ious[:, 0]
    return ious.gather(1, classes.view(-1, 1))[:, 0]


def iounet_inference_single_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    iou_fn: AllClassIoUFn,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    topk: int = 100,
    nms: str = "iou_guided",
    refine: bool = True,
    pre_refine: int = 100,
    refine_kwargs: Optional[dict] = None,
    score_times_iou: bool = True,
) -> Dict[str, torch.Tensor]:
    """
    Args:
        boxes (Tensor[R, K * 4] or Tensor[R, 4]): regressed boxes of the R proposals (class-specific or not).
        scores (Tensor[R, K + 1]): softmax scores, background last.
        image_size ((h, w)): to clip boxes.
        iou_fn: the IoU head on boxes of this image (see :data:`AllClassIoUFn`).
        score_thresh: candidates need a class score >= score_thresh.
        nms_thresh: IoU threshold of the NMS.
        topk: detections kept (< 0: all).
        nms: one of :data:`NMS_MODES`. "iou_guided" (the paper's, ranked by predicted IoU) and
            "iou_guided_score_x_iou" (ranked by cls score x IoU) run on candidates (proposal, class) whose box is
            the one regressed for the proposal's argmax class; "plain" is detectron2's class-wise NMS on
            class-specific boxes.
        refine: refine the ``pre_refine`` best boxes after NMS (kwargs of :func:`refine_boxes`).
        score_times_iou: final score = score x predicted IoU (clamped to [0, 1]) of the final box, the one output
            (refined boxes are clipped to the image first).
    Returns:
        dict with "boxes" (Tensor[D, 4]), "scores" (Tensor[D]), "classes" (Tensor[D] int64), "ious"
        (Tensor[D], predicted IoU of the final box, or None when no stage needed it), "refine_steps"
        (Tensor[D'] steps of the refined boxes), "refine_gain" (Tensor[D'] IoU gain of the refined boxes).
    """
    if nms not in NMS_MODES:
        raise ValueError(f"MODEL.IOU_NET.NMS_TEST must be one of {tuple(NMS_MODES)}, got {nms!r}")
    # Laid out for the GPU: one nonzero to find the candidates and one read of the number of detections at the end
    # are the only host synchronisations (plus torchvision's NMS on the "plain" path); the rest has sizes known on
    # the host (IoU-guided NMS padded to the candidates, refinement on a fixed set of boxes).
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)  # the others are no candidate
    boxes = boxes.masked_fill(~valid[:, None], 0.0)
    scores = scores[:, :-1].masked_fill(~valid[:, None], float("-inf"))
    num_classes = scores.shape[1]
    # R x (K or 1) x 4; the row count from the tensor, not len(), so that a torch.jit.trace does not freeze it
    boxes = _clip(boxes.reshape(boxes.shape[0], boxes.shape[1] // 4, 4), image_size)
    ious: Optional[torch.Tensor] = None
    empty = boxes.new_zeros((0,))
    num: Optional[torch.Tensor] = None  # number of real rows (on the device) when the rows are padded

    if NMS_MODES[nms] is not None:
        from d2_refine.ops import iou_guided_nms_padded

        cand = torch.nonzero(scores >= score_thresh)  # (proposal, class), the same rows as a per-proposal filter
        r, k = cand[:, 0], cand[:, 1]
        # a candidate's box is the one regressed for its proposal's argmax class
        fg_cls = scores.max(dim=1).indices[r] if boxes.shape[1] > 1 else torch.zeros_like(r)
        cand_boxes, cand_scores = boxes[r, fg_cls], scores[r, k]
        with torch.no_grad():
            cand_ious = iou_fn(cand_boxes) if len(r) else boxes.new_zeros((0, num_classes))
        cand_ious = cand_ious[:, 0] if cand_ious.shape[1] == 1 else cand_ious.gather(1, k[:, None])[:, 0]
        keep, kept_scores, num = iou_guided_nms_padded(cand_boxes, cand_scores, cand_ious, k, nms_thresh,
                                                       guide=NMS_MODES[nms])
        limit = max(topk, pre_refine if refine else 0) if topk >= 0 else len(keep)
        keep, scores = keep[:limit].clamp(min=0), kept_scores[:limit]
        boxes, classes, ious = cand_boxes[keep], k[keep], cand_ious[keep]
    else:
        inds = torch.nonzero(scores > score_thresh)  # detectron2's filter
        boxes = boxes[inds[:, 0], 0 if boxes.shape[1] == 1 else inds[:, 1]]
        scores, classes = scores[inds[:, 0], inds[:, 1]], inds[:, 1]
        keep = batched_nms(boxes, scores, classes, nms_thresh)
        if topk >= 0:
            keep = keep[: max(topk, pre_refine if refine else 0)]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if (refine or score_times_iou) and len(boxes):
            with torch.no_grad():
                ious = _at_class(iou_fn(boxes), classes)
        elif refine or score_times_iou:
            ious = empty
    rank = torch.ones_like(scores, dtype=torch.long).cumsum(0) - 1  # an arange whose length a trace keeps dynamic
    real = None if num is None else rank < num

    steps, gain = empty.long(), empty
    if refine and len(boxes):
        n = min(pre_refine, len(boxes))
        refined_classes = classes[:n]

        def fn(b, rows):
            return _at_class(iou_fn(b), refined_classes[rows])

        res = refine_boxes(boxes[:n], fn, image_size=image_size, valid=None if real is None else real[:n],
                           **(refine_kwargs or {}))
        boxes = torch.cat([res.boxes, boxes[n:]])
        ious = torch.cat([res.ious, ious[n:]])
        steps, gain = res.steps, res.ious - res.init_ious
    if score_times_iou and ious is not None:
        scores = scores * ious.clamp(0.0, 1.0)
    if real is not None:
        scores = scores.masked_fill(~real, float("-inf"))  # padding last
    order = torch.argsort(scores, descending=True, stable=True)
    if real is not None and torch.jit.is_tracing():  # int(num) would be a constant of the trace
        order = order[real[order]]
        order = order if topk < 0 else order[:topk]
        real_count = len(order)
    else:
        real_count = len(order) if num is None else int(num)  # the one read of a device value per image
        order = order[: real_count if topk < 0 else min(real_count, topk)]
    refined = min(len(steps), real_count)
    out = {"boxes": boxes[order], "scores": scores[order], "classes": classes[order],
           "ious": None if ious is None else ious[order].clamp(0.0, 1.0),
           "refine_steps": steps[:refined], "refine_gain": gain[:refined]}
    return out
