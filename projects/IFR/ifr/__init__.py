"""IFR: implicit feature refinement for instance segmentation (Ma et al., ACM MM 2021).

``import d2_refine.projects.ifr`` works without detectron2 (config and the torch-only block); with detectron2
it also registers ``IFRMaskHead`` in ROI_MASK_HEAD_REGISTRY and ``IFRCascadeROIHeads`` (Cascade R-CNN that drops
non-finite boxes between stages) in ROI_HEADS_REGISTRY.
"""
from d2_refine.utils.env import has_detectron2

from .block import IFRBlock, explicit_unroll  # noqa: F401
from .config import add_ifr_config  # noqa: F401

if has_detectron2():
    from .mask_head import IFRMaskHead, build_ifr_deq  # noqa: F401
    from .roi_heads import IFRCascadeROIHeads  # noqa: F401
