"""detectron2's ROIPooler with InterNet's level assignment (rounded FPN rule or roi_size), and explicit levels."""
from typing import List, Optional, Sequence

import torch
from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

from .assignment import assign_levels, pooling_levels

__all__ = ["LevelAssignedROIPooler"]


class LevelAssignedROIPooler(ROIPooler):
    """Pools each box from one pyramid level chosen by InterNet's rule instead of detectron2's floor rule.

    The maps may be made-up maps of a different resolution than the pyramid (``scales`` then differ from
    ``1 / strides``): the level choice always uses the input-image strides.

    Args:
        output_size, scales, sampling_ratio, pooler_type: as :class:`ROIPooler`.
        strides (list[int]): input strides of the levels (finest first), for the assignment.
        assignment (str): "fpn" or "roi_size" (see assignment.py).
        assign_pool_size (int): FEAT_POOL_SIZE of the "roi_size" rule.
    """

    def __init__(self, output_size, scales, sampling_ratio, pooler_type, *, strides: Sequence[int],
                 assignment: str = "fpn", assign_pool_size: int = 14):
        super().__init__(output_size, scales, sampling_ratio, pooler_type)
        if len(strides) != len(scales):
            raise ValueError(f"one stride per level needed, got {len(strides)} strides for {len(scales)} scales")
        assign_levels(torch.zeros(0, 4), strides, assignment, assign_pool_size)  # validates `assignment`
        self.strides = [int(s) for s in strides]
        self.assignment = assignment
        self.assign_pool_size = assign_pool_size

    def assign(self, box_lists: List[Boxes]) -> torch.Tensor:
        """LongTensor[R]: level index of every box of every image (may be ``len(strides)`` for roi_size)."""
        boxes = torch.cat([b.tensor for b in box_lists]) if box_lists else torch.zeros(0, 4)
        return assign_levels(boxes, self.strides, self.assignment, self.assign_pool_size)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes],
                levels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (list[Tensor[N, C, H_l, W_l]]): one map per level.
            box_lists (list[Boxes]): boxes of each image, in input pixels.
            levels (LongTensor[R], optional): level of each box (from :meth:`assign` or given); computed if None.

        Returns:
            Tensor[R, C, S, S]
        """
        if len(x) != len(self.level_poolers):
            raise ValueError(f"pooler built for {len(self.level_poolers)} levels, got {len(x)} feature maps")
        if len(box_lists) != x[0].shape[0]:
            raise ValueError(f"{x[0].shape[0]} images in the features but {len(box_lists)} box lists")
        fmt = convert_boxes_to_pooler_format(box_lists)
        out = x[0].new_zeros((fmt.shape[0], x[0].shape[1]) + tuple(self.output_size))
        if fmt.shape[0] == 0:
            return out
        if levels is None:
            levels = self.assign(box_lists)
        levels = pooling_levels(levels.to(fmt.device), len(self.level_poolers))
        for level, pooler in enumerate(self.level_poolers):
            inds = nonzero_tuple(levels == level)[0]  # pooled even when empty: every map stays in the graph
            out.index_put_((inds,), pooler(x[level], fmt[inds]))
        return out
