"""IoU-guided NMS (Jiang et al., ECCV 2018, Algorithm 1), batched per class like torchvision's ``batched_nms``."""
import math
from typing import Tuple

import torch
from torch import Tensor

from ._library import compute_dtype, has_kernel, warn_fallback

__all__ = ["iou_guided_nms", "iou_guided_nms_padded"]

_GUIDES = ("rank", "weight", "none")


def _check(boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, guide: str) -> None:
    if guide not in _GUIDES:
        raise ValueError(f"iou_guided_nms: guide must be one of {_GUIDES}, got {guide!r}")
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"iou_guided_nms: boxes must be Tensor[N, 4], got shape {tuple(boxes.shape)}")
    n = boxes.size(0)
    for name, t in (("scores", scores), ("ious", ious), ("idxs", idxs)):
        if t.dim() != 1 or t.size(0) != n:
            raise ValueError(f"iou_guided_nms: {name} must be Tensor[N] with N = {n}, got shape {tuple(t.shape)}")
    for name, t in (("boxes", boxes), ("scores", scores), ("ious", ious)):
        if not t.is_floating_point():
            raise TypeError(f"iou_guided_nms: {name} must be a floating-point tensor, got {t.dtype}")
    if idxs.is_floating_point() or idxs.dtype == torch.bool or idxs.is_complex():
        raise TypeError(f"iou_guided_nms: idxs (class indices) must be an integer tensor, got {idxs.dtype}")
    try:
        nan = math.isnan(iou_threshold)
    except TypeError:
        raise TypeError(f"iou_guided_nms: iou_threshold must be a number, got {iou_threshold!r}") from None
    if nan:
        raise ValueError("iou_guided_nms: iou_threshold must be a number, got nan")


def iou_guided_nms(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, guide: str = "rank"
) -> Tuple[Tensor, Tensor]:
    """IoU-guided non-maximum suppression, independently per class.

    Within each class, candidates are ranked by ``guide``: ``"rank"`` by the predicted IoU q (the paper),
    ``"weight"`` by p * q, ``"none"`` by p (plain NMS, scores unchanged). Greedy NMS in that order suppresses a
    candidate when its IoU with a kept box exceeds ``iou_threshold``; each candidate belongs to the first kept box
    (in ranking order) that overlaps it above the threshold, and a kept box's score becomes the maximum
    classification score p over its members. The op does not filter by score (drop p < 0.05 beforehand).

    Bad input: a candidate whose box coordinates, score p or (unless ``guide="none"``) predicted IoU q is NaN or
    infinite takes no part (it is neither kept nor suppresses), as detectron2's ``fast_rcnn_inference`` drops
    non-finite boxes and scores before its NMS; so the kept scores are always finite. Empty, zero-area and
    inverted boxes overlap nothing (IoU 0 or 0/0). Non-floating boxes, scores or ious raise a TypeError, a NaN
    ``iou_threshold`` a ValueError.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2).
        scores (Tensor[N]): classification scores p.
        ious (Tensor[N]): predicted localisation confidences q.
        idxs (Tensor[N]): integer class of each candidate.
        iou_threshold (float): suppress when IoU > iou_threshold.
        guide (str): "rank", "weight" or "none".

    Returns:
        keep (Tensor[K], int64): indices into the inputs, sorted by updated score descending (ties: smaller index).
        kept_scores (Tensor[K]): the updated scores, in the same order, in the dtype of ``scores`` (they are values
        of ``scores``, so no precision is lost).

    Dtypes: boxes, scores and ious may differ; the op runs in float32 (float64 if one of them is float64), also
    when they are float16 / bfloat16 (e.g. under ``torch.autocast``), so that IoUs near the threshold are not
    decided in half precision.
    """
    _check(boxes, scores, ious, idxs, iou_threshold, guide)
    out_dtype = scores.dtype
    dtype = compute_dtype(boxes, scores, ious)
    boxes, scores, ious = boxes.detach().to(dtype), scores.detach().to(dtype), ious.detach().to(dtype)
    if has_kernel("iou_guided_nms", boxes.device):
        keep, kept_scores = torch.ops.d2_refine.iou_guided_nms(boxes, scores, ious, idxs, float(iou_threshold), guide)
    else:
        warn_fallback("iou_guided_nms", boxes.device)
        keep, kept_scores = _iou_guided_nms_reference(boxes, scores, ious, idxs, iou_threshold, guide)
    return keep, kept_scores.to(out_dtype)


def _class_nms(boxes: Tensor, key: Tensor, in_class: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's greedy NMS on the candidates ``in_class`` (a mask); their indices, by key descending. The
    threshold is rounded to the dtype of ``boxes``, as the kernels compare (torchvision's CPU nms compares in double:
    an IoU of exactly float32(0.3) would suppress there and not in the kernels)."""
    from torchvision.ops import nms

    iou_threshold = float(torch.tensor(iou_threshold, dtype=boxes.dtype))
    members = in_class.nonzero()[:, 0]
    return members[nms(boxes[members], key[members], iou_threshold)]


def iou_guided_nms_padded(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, guide: str = "rank"
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`iou_guided_nms` with a result of fixed size N, for callers on a GPU: nothing in it waits for the
    device (on CUDA; :func:`iou_guided_nms` reads three values on the host), so work after it can be queued at once.

    Returns:
        keep (Tensor[N], int64): the indices of :func:`iou_guided_nms`, then -1.
        kept_scores (Tensor[N]): their updated scores, then 0.
        num_kept (Tensor[], int64): how many are kept, on the device of ``boxes``.
    """
    _check(boxes, scores, ious, idxs, iou_threshold, guide)
    out_dtype = scores.dtype if scores.is_floating_point() else None
    dtype = compute_dtype(boxes, scores, ious)
    boxes, scores, ious = boxes.detach().to(dtype), scores.detach().to(dtype), ious.detach().to(dtype)
    if has_kernel("iou_guided_nms_padded", boxes.device):
        keep, kept_scores, num_kept = torch.ops.d2_refine.iou_guided_nms_padded(
            boxes, scores, ious, idxs, float(iou_threshold), guide)
    else:
        warn_fallback("iou_guided_nms_padded", boxes.device)
        keep, kept_scores, num_kept = _iou_guided_nms_padded_reference(boxes, scores, ious, idxs, iou_threshold, guide)
    return keep, kept_scores.to(out_dtype or kept_scores.dtype), num_kept


def _iou_guided_nms_padded_reference(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, guide: str = "rank"
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`_iou_guided_nms_reference`, padded as :func:`iou_guided_nms_padded` returns it."""
    keep, kept_scores = _iou_guided_nms_reference(boxes, scores, ious, idxs, iou_threshold, guide)
    n, k = boxes.size(0), keep.numel()
    keep = torch.cat([keep, keep.new_full((n - k,), -1)])
    kept_scores = torch.cat([kept_scores, kept_scores.new_zeros((n - k,))])
    return keep, kept_scores, torch.tensor(k, dtype=torch.int64, device=boxes.device)


def _iou_guided_nms_reference(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, guide: str = "rank"
) -> Tuple[Tensor, Tensor]:
    """Vectorised PyTorch IoU-guided NMS (IoU-Net paper, Jiang et al., ECCV 2018): greedy per-class NMS on the
    ranking key with torchvision's ``nms`` class by class, then kept x candidates overlaps (same class,
    IoU > threshold), owner = first kept box in ranking order (argmax), scatter-max of p. Same arguments and results as
    :func:`iou_guided_nms`."""
    from torchvision.ops import box_iou

    _check(boxes, scores, ious, idxs, iou_threshold, guide)
    boxes, scores, ious = boxes.detach(), scores.detach(), ious.detach()
    finite = torch.isfinite(boxes).all(1) & torch.isfinite(scores)
    if guide != "none":
        finite &= torch.isfinite(ious)
    if not bool(finite.all()):  # non-finite candidates take no part (as in the kernels)
        index = finite.nonzero()[:, 0]
        keep, kept_scores = _iou_guided_nms_reference(
            boxes[index], scores[index], ious[index], idxs[index], iou_threshold, guide
        )
        return index[keep], kept_scores
    if boxes.size(0) == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)
    key = {"rank": ious, "weight": scores * ious, "none": scores}[guide]
    # greedy NMS per class, in ranking order within each class; not batched_nms, whose coordinate trick (offsetting
    # each class by the largest coordinate) overflows, and so changes the overlaps, for huge boxes
    keep = torch.cat([_class_nms(boxes, key, idxs == c, iou_threshold) for c in idxs.unique()])
    if guide == "none":
        new_scores = scores[keep]
    else:
        owner = torch.empty(boxes.size(0), dtype=torch.int64, device=boxes.device)
        chunk = max(1, (1 << 24) // max(1, keep.numel()))  # bound the kept x candidates matrix
        kept_boxes, kept_cls = boxes[keep], idxs[keep]
        self_of = torch.full((boxes.size(0),), -1, dtype=torch.int64, device=boxes.device)
        self_of[keep] = torch.arange(keep.numel(), device=boxes.device)
        for start in range(0, boxes.size(0), chunk):
            cols = slice(start, start + chunk)
            member = (box_iou(kept_boxes, boxes[cols]) > iou_threshold) & (kept_cls[:, None] == idxs[None, cols])
            own = self_of[cols]
            is_kept = own >= 0
            member[own[is_kept], is_kept.nonzero()[:, 0]] = True  # a kept box belongs to itself
            owner[cols] = member.to(torch.uint8).argmax(0)  # first kept box in ranking order
        new_scores = torch.full((keep.numel(),), float("-inf"), dtype=scores.dtype, device=scores.device)
        new_scores = new_scores.scatter_reduce(0, owner, scores, reduce="amax")
    by_index = torch.argsort(keep)
    keep, new_scores = keep[by_index], new_scores[by_index]
    order = torch.argsort(new_scores, descending=True, stable=True)
    return keep[order], new_scores[order]
