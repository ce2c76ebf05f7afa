"""Level assignment of RoIs and the less reliable / reliable sets of each level (torch only).

Levels are returned as indices into the pyramid's feature list (0 = finest, e.g. p2). The "roi_size" rule may
return ``len(strides)`` ("beyond the coarsest level") for boxes no level covers; those boxes are pooled from the
coarsest level and belong to every level's reliable set.
"""
import math
from typing import List, Sequence, Tuple

import torch

__all__ = ["ASSIGNMENTS", "fpn_round_levels", "roi_size_levels", "assign_levels", "pooling_levels",
           "level_sets"]

ASSIGNMENTS = ("fpn", "roi_size")


def _sqrt_area(boxes: torch.Tensor) -> torch.Tensor:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[R, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0)
    return (wh[:, 0] * wh[:, 1]).sqrt()


def fpn_round_levels(boxes: torch.Tensor, strides: Sequence[int], canonical_box_size: float = 224.0,
                     canonical_level: int = 4) -> torch.Tensor:
    """FPN rule with rounding: ``k = round(canonical_level + log2(sqrt(wh) / canonical_box_size))``.

    Clamped to the levels present (``log2(stride)`` of ``strides``). With the defaults P4 holds
    ``sqrt(wh)`` in [158, 317) pixels (detectron2's floor rule: [224, 448)). Zero-area boxes go to the finest.

    Args:
        boxes (Tensor[R, 4]): boxes in input-image pixels.
        strides (list[int]): strides of the pyramid levels, finest first (consecutive powers of 2).

    Returns:
        LongTensor[R]: level index in ``[0, len(strides))``.
    """
    min_level = int(round(math.log2(strides[0])))
    s = _sqrt_area(boxes).clamp_min(1e-6)
    k = torch.round(canonical_level + torch.log2(s / canonical_box_size))
    return (k.clamp(min_level, min_level + len(strides) - 1) - min_level).to(torch.int64)


def roi_size_levels(boxes: torch.Tensor, strides: Sequence[int], pool_size: int = 14) -> torch.Tensor:
    """Finest level whose ``pool_size x pool_size`` cells cover the box: ``sqrt(wh) <= pool_size * stride``.

    Returns:
        LongTensor[R]: level index in ``[0, len(strides)]``; ``len(strides)`` for boxes larger than every level.
    """
    s = _sqrt_area(boxes)
    level = torch.zeros(s.shape, dtype=torch.int64, device=s.device)
    for st in strides:  # Python numbers: no tensor copied from the host (a wait for the device on CUDA)
        level += s > pool_size * st
    return level


def assign_levels(boxes: torch.Tensor, strides: Sequence[int], assignment: str = "fpn",
                  pool_size: int = 14) -> torch.Tensor:
    """Level index of each box under ``assignment`` ("fpn" or "roi_size"); see the two functions above."""
    if assignment == "fpn":
        return fpn_round_levels(boxes, strides)
    if assignment == "roi_size":
        return roi_size_levels(boxes, strides, pool_size)
    raise ValueError(f"MODEL.INTERNET.ASSIGNMENT must be one of {ASSIGNMENTS}, got {assignment!r}")


def pooling_levels(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Level each RoI is pooled from: its assigned level, the coarsest for boxes beyond it (the original pools
    those nowhere in training; we pool them from the coarsest level)."""
    return levels.clamp_max(num_levels - 1)


def level_sets(levels: torch.Tensor, labels: torch.Tensor, num_classes: int,
               loss_levels: Sequence[int]) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
    """Less reliable and reliable RoIs of each loss level.

    A level takes part only if at least one RoI (any class, background included) is assigned to it. Its less
    reliable set is the foreground RoIs assigned to it, its reliable set the foreground RoIs assigned to any
    higher level. Only foreground RoIs (``0 <= label < num_classes``) are returned.

    Args:
        levels (LongTensor[R]): level index of each RoI (see :func:`assign_levels`).
        labels (LongTensor[R]): class of each RoI, ``num_classes`` for background.
        loss_levels (list[int]): level indices that receive the loss.

    Returns:
        list of ``(level, less_idx (LongTensor[A]), reliable_idx (LongTensor[B]))``, participating levels only.
    """
    fg = (labels >= 0) & (labels < num_classes)
    out = []
    for lvl in loss_levels:
        at = levels == lvl
        if not bool(at.any()):
            continue
        less = torch.nonzero(at & fg).flatten()
        reliable = torch.nonzero((levels > lvl) & fg).flatten()
        out.append((int(lvl), less, reliable))
    return out
