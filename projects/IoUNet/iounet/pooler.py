"""``ROIPooler`` whose level poolers are PrRoIPool: the multi-level pooler of the IoU head, and what
``MODEL.ROI_BOX_HEAD.POOLER_TYPE: "PrRoIPool"`` (or "PrRoIPoolV2", the half-pixel-aligned variant) builds.

ROIPooler's level assignment is kept, inside one call of :func:`d2_refine.ops.multilevel_prroi_pool` for all
levels (ROIPooler's loop splits the boxes per level on the host: a GPU synchronisation per level). PrRoIPool is
differentiable w.r.t. the box coordinates, so the pooled features (and everything computed from them) can be
differentiated w.r.t. the boxes. The level of each box is re-assigned at every call, so a box refined across a
level boundary is pooled from its new level.
"""
from typing import List, Sequence

import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torch import nn

__all__ = ["PrRoIPooler", "PRROI_POOLER_TYPES", "build_roi_pooler"]

#: pooler type name -> ``aligned`` argument of PrRoIPool2d
PRROI_POOLER_TYPES = {"PrRoIPool": False, "PrRoIPoolV2": True}


class PrRoIPooler(ROIPooler):
    """Multi-level RoI pooler on Precise RoI Pooling.

    Args:
        output_size (int or (int, int)): pooled height and width.
        scales (list[float]): 1 / stride of each level (a pyramid, as in :class:`ROIPooler`).
        aligned (bool): subtract half a pixel after scaling (False: the official PrRoIPool convention).
        canonical_box_size, canonical_level: FPN level assignment (as in :class:`ROIPooler`).
    """

    def __init__(self, output_size, scales: Sequence[float], aligned: bool = False, canonical_box_size: int = 224,
                 canonical_level: int = 4):
        # ROIPooler validates the pyramid and sets the level bookkeeping; its level poolers are then replaced.
        super().__init__(output_size, scales, sampling_ratio=0, pooler_type="ROIAlignV2",
                         canonical_box_size=canonical_box_size, canonical_level=canonical_level)
        from d2_refine.ops import PrRoIPool2d

        self.level_poolers = nn.ModuleList(
            PrRoIPool2d(self.output_size, spatial_scale=scale, aligned=aligned) for scale in scales
        )
        self.scales = tuple(float(s) for s in scales)
        self.aligned = bool(aligned)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """
        Args:
            x (list[Tensor[N, C, H_l, W_l]]): the feature maps, one per level.
            box_lists (list[Boxes]): the boxes of each image (N).
        Returns:
            Tensor[K, C, PH, PW]: the boxes of all images, in order.
        """
        from d2_refine.ops import multilevel_prroi_pool

        if not isinstance(x, list) or len(x) != len(self.level_poolers):
            raise ValueError(f"PrRoIPooler: x must be a list of {len(self.level_poolers)} feature maps "
                             "(one per level), "
                             f"got {len(x) if isinstance(x, list) else type(x).__name__}")
        if len(box_lists) != x[0].size(0):
            raise ValueError(f"PrRoIPooler: box_lists must hold the Boxes of each of the {x[0].size(0)} images, "
                             f"got {len(box_lists)}")
        if len(box_lists) == 0:
            return x[0].new_zeros((0, x[0].shape[1]) + tuple(self.output_size))
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # torch.jit.trace cannot record the fused op's list arguments (an internal assert of its tracer), and
            # exported programs keep the per-level op deployment tools know: ROIPooler's loop, PrRoIPool per level
            return super().forward(x, box_lists)
        return multilevel_prroi_pool(x, [b.tensor for b in box_lists], self.output_size, self.scales,
                                     self.canonical_box_size, self.canonical_level, self.aligned)


def build_roi_pooler(output_size, scales, sampling_ratio: int, pooler_type: str, **kwargs) -> ROIPooler:
    """:class:`PrRoIPooler` for the PrRoIPool types, detectron2's :class:`ROIPooler` otherwise."""
    if pooler_type in PRROI_POOLER_TYPES:
        return PrRoIPooler(output_size, scales, aligned=PRROI_POOLER_TYPES[pooler_type], **kwargs)
    return ROIPooler(output_size, scales, sampling_ratio=sampling_ratio, pooler_type=pooler_type, **kwargs)
