"""d2_refine: refinement methods for detection and instance segmentation on detectron2.

``import d2_refine`` works without detectron2 (ops, layers and the detectron2-free parts of each method).
With detectron2 installed it also registers the ``shapes`` datasets; :func:`add_d2_refine_config` adds every
method's config node and, by importing each method's package, registers its components (backbones, ROI heads,
meta-architectures) before any model is built from that config.
"""
from .utils.env import has_detectron2, require_detectron2  # noqa: F401

__version__ = "0.1.0"

from .config import add_d2_refine_config  # noqa: E402,F401

if has_detectron2():
    from . import (
        data,  # noqa: F401,E402  (registers shapes_train / shapes_val)
        pretrained,  # noqa: F401,E402  (d2_refine://pretrained/... for MODEL.WEIGHTS)
    )
