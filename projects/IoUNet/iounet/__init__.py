"""IoU-Net (Jiang et al., ECCV 2018) on detectron2: IoU head, IoU-balanced RoIs, IoU-guided NMS, refinement.

``import d2_refine.projects.iounet`` works without detectron2 (config, jitter sampler, IoU head, refinement);
with detectron2 it also registers ``IoUNetROIHeads`` in ROI_HEADS_REGISTRY.
"""
from d2_refine.utils.env import has_detectron2

from .config import add_iounet_config  # noqa: F401
from .inference import iounet_inference_single_image  # noqa: F401
from .iou_head import IoUHead  # noqa: F401
from .jitter import IoUBalancedJitter  # noqa: F401
from .refine import refine_boxes  # noqa: F401

if has_detectron2():
    from .pooler import PrRoIPooler, build_roi_pooler  # noqa: F401
    from .roi_heads import IoUNetROIHeads  # noqa: F401  (registers it in ROI_HEADS_REGISTRY)
