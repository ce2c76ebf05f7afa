"""RDSNet + MBRM (Wang et al., AAAI 2020) on detectron2: ``d2_refine.projects.rdsnet``.

The torch-only parts (MBRM, cropping, correlation, the OHEM mask loss) import without detectron2; the
detectron2 glue (pixel head, RDSNet head, the ``RDSNet`` meta-architecture) registers when detectron2 is present.
"""
from d2_refine.utils.env import has_detectron2

from .config import add_rdsnet_config  # noqa: F401
from .mbrm import MBRM, mbrm_refine_boxes  # noqa: F401
