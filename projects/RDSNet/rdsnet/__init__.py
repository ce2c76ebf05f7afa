"""RDSNet + MBRM (Wang et al., AAAI 2020) on detectron2: ``d2_refine.projects.rdsnet``.

The torch-only parts (MBRM, cropping, correlation, the OHEM mask loss) import without detectron2; the
detectron2 glue (pixel head, RDSNet head, the ``RDSNet`` meta-architecture) registers when detectron2 is present.
"""
from d2_refine.utils.env import has_detectron2

from .config import add_rdsnet_config  # noqa: F401
from .mask_loss import ohem_mask_loss  # noqa: F401
from .masks import correlate, crop_region, decode_soft_masks  # noqa: F401
from .mbrm import MBRM, mbrm_refine_boxes  # noqa: F401

if has_detectron2():
    from .head import RDSNetHead  # noqa: F401
    from .meta_arch import RDSNet  # noqa: F401  (registers META_ARCH "RDSNet")
    from .pixel_head import RDSNetPixelHead  # noqa: F401
