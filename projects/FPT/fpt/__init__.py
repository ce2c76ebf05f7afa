"""FPT: Feature Pyramid Transformer (Zhang et al., ECCV 2020) as detectron2 backbones.

Torch-only modules (importable without detectron2): :mod:`.attention` (memory-efficient attention kernels),
:class:`SelfTransformer`, :class:`GroundingTransformer`, :class:`RenderingTransformer`,
:class:`FeaturePyramidTransformer` (per-level assembly). With detectron2, :mod:`.backbone` registers
``build_resnet_fpt_backbone``, ``build_retinanet_resnet_fpt_backbone`` and ``build_fpt_backbone``.
"""
from d2_refine.utils.env import has_detectron2

from .config import add_fpt_config  # noqa: F401
from .grounding_transformer import GroundingTransformer  # noqa: F401
from .pyramid import FeaturePyramidTransformer  # noqa: F401
from .rendering_transformer import RenderingTransformer  # noqa: F401
from .self_transformer import SelfTransformer  # noqa: F401

if has_detectron2():
    from .backbone import (  # noqa: F401
        FPTBackbone,
        build_fpt_backbone,
        build_resnet_fpt_backbone,
        build_retinanet_resnet_fpt_backbone,
    )
