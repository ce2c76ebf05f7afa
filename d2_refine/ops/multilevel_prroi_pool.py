"""Multi-level Precise RoI Pooling: :func:`~d2_refine.ops.prroi_pool` over a feature pyramid in one call, each box
pooled from the level its size selects (detectron2's ``assign_boxes_to_levels``: level
``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))`` clamped to the pyramid). It replaces
detectron2's ``ROIPooler`` loop (a host-side split per level, one pooling call per level); on CUDA nothing in it
waits for the device."""
import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._library import autocast_enabled, compute_dtype, has_kernel, warn_fallback
from .prroi_pool import _prroi_pool_reference, output_size_pair

__all__ = ["multilevel_prroi_pool"]


def _check(inputs: Sequence[Tensor], boxes: Sequence[Tensor], spatial_scales: Sequence[float]) -> None:
    if not isinstance(inputs, (list, tuple)) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("multilevel_prroi_pool: inputs must be a non-empty list of Tensor[N, C, H, W]")
    if len(spatial_scales) != len(inputs):
        raise ValueError(f"multilevel_prroi_pool: spatial_scales must hold one scale per map ({len(inputs)}), "
                         f"got {len(spatial_scales)}")
    if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, Tensor) and b.dim() == 2 and b.size(1) == 4
                                                       for b in boxes):
        raise ValueError("multilevel_prroi_pool: boxes must be a list of one Tensor[L, 4] (x1, y1, x2, y2) per image")
    for name, t in [("inputs", t) for t in inputs] + [("boxes", b) for b in boxes]:
        if not t.is_floating_point():
            raise TypeError(f"multilevel_prroi_pool: {name} must be floating point, got {t.dtype}")


def multilevel_prroi_pool(
    inputs: List[Tensor],
    boxes: List[Tensor],
    output_size: Union[int, Tuple[int, int]],
    spatial_scales: Sequence[float],
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
    aligned: bool = False,
) -> Tensor:
    """Precise RoI Pooling over a feature pyramid.

    Args:
        inputs (List[Tensor[N, C, H_l, W_l]]): the pyramid, finest first.
        boxes (List[Tensor[L_n, 4]]): (x1, y1, x2, y2) boxes in image coordinates, one tensor per image (N).
        output_size (int or Tuple[int, int]): (PH, PW).
        spatial_scales (List[float]): 1 / stride of each map, halving from one to the next (1/4, 1/8, ...).
        canonical_box_size, canonical_level: the level assignment (detectron2's ROIPooler defaults: 224, 4).
        aligned (bool): as in :func:`~d2_refine.ops.prroi_pool`.

    Returns:
        Tensor[sum L_n, C, PH, PW], the boxes in order (image 0 first), in the dtype of ``inputs[0]``. A box whose
        level is NaN (negative area) pools zeros, as in ROIPooler, and so does a box with a NaN or infinite
        coordinate or a width or height that overflows (``prroi_pool`` raises for one, but that check would wait
        for the device). Differentiable
        w.r.t. the maps and the boxes (zero gradients for the boxes that pool zeros).
    """
    _check(inputs, boxes, spatial_scales)
    pooled_height, pooled_width = output_size_pair(output_size, "multilevel_prroi_pool")
    counts = [b.size(0) for b in boxes]
    flat = torch.cat(list(boxes)) if boxes else inputs[0].new_zeros((0, 4))
    scales = [float(s) for s in spatial_scales]
    device = inputs[0].device
    autocast = autocast_enabled(device)
    args = (counts, scales, float(canonical_box_size), int(canonical_level), pooled_height, pooled_width,
            bool(aligned))
    if has_kernel("multilevel_prroi_pool", device):
        # under autocast the op's Autocast kernel would cast to float32 as well
        dtype = compute_dtype(*inputs, flat, native_half=device.type == "cuda" and not autocast)
        out = torch.ops.d2_refine.multilevel_prroi_pool([t.to(dtype) for t in inputs], flat.to(dtype), *args)
        return out.to(inputs[0].dtype)
    warn_fallback("multilevel_prroi_pool", device)
    dtype = compute_dtype(*inputs, flat)
    with torch.autocast(device.type, enabled=False) if autocast else _null():
        return _multilevel_prroi_pool_reference([t.to(dtype) for t in inputs], flat.to(dtype), *args).to(
            inputs[0].dtype)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def box_levels(boxes: Tensor, canonical_box_size: float, canonical_level: int, min_level: int,
               num_levels: int) -> Tensor:
    """Tensor[K] int64: level index in [0, num_levels) of each box (detectron2's ``assign_boxes_to_levels``, op for
    op, in the dtype of ``boxes``, float32 for half-precision boxes, whose areas overflow float16 beyond 256 x 256 px),
    -1 where it is NaN or the box's width or height is not finite: a NaN or infinite coordinate (whose level would
    depend on the sign of the infinity) or an extent that overflows; checked on the device, without a host
    synchronisation."""
    boxes = boxes.to(compute_dtype(boxes))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = width * height
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    level = torch.clamp(level, min=min_level, max=min_level + num_levels - 1)
    index = torch.nan_to_num(level, 0.0).to(torch.int64) - min_level
    none = torch.isnan(level) | ~(torch.isfinite(width) & torch.isfinite(height))
    return torch.where(none, torch.full_like(index, -1), index)


def _multilevel_prroi_pool_reference(
    inputs: List[Tensor], boxes: Tensor, boxes_per_image: List[int], spatial_scales: List[float],
    canonical_box_size: float, canonical_level: int, pooled_height: int, pooled_width: int, aligned: bool,
) -> Tensor:
    """Pure-PyTorch multi-level Precise RoI Pooling (the test oracle and the fallback): ROIPooler's loop, a
    :func:`_prroi_pool_reference` call per level. ``boxes`` (Tensor[K, 4]) holds the boxes of all images, the first
    ``boxes_per_image[0]`` of image 0, and so on."""
    if sum(boxes_per_image) != boxes.size(0) or len(boxes_per_image) != inputs[0].size(0):
        raise ValueError(f"multilevel_prroi_pool: boxes_per_image must hold one count per image "
                         f"({inputs[0].size(0)}) adding up to the {boxes.size(0)} boxes, got {boxes_per_image}")
    min_level = round(-math.log2(spatial_scales[0]))
    levels = box_levels(boxes, canonical_box_size, canonical_level, min_level, len(inputs))
    images = torch.repeat_interleave(torch.arange(len(boxes_per_image), device=boxes.device),
                                     torch.tensor(boxes_per_image, device=boxes.device), output_size=boxes.size(0))
    rois = torch.cat([images[:, None].to(boxes.dtype), boxes], dim=1)
    out = boxes.new_zeros((boxes.size(0), inputs[0].size(1), pooled_height, pooled_width))
    for level, (feature, scale) in enumerate(zip(inputs, spatial_scales)):
        rows = torch.nonzero(levels == level)[:, 0]
        if rows.numel():
            pooled = _prroi_pool_reference(feature, rois[rows], (pooled_height, pooled_width), scale, aligned)
            out = out.index_copy(0, rows, pooled.to(out.dtype))
    return out
