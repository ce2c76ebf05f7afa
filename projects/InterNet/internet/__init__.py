"""InterNet: the Feature Intertwiner (Li, Dai, Shi, Ouyang, Wang, ICLR 2019) as detectron2 ROI heads.

``import d2_refine.projects.internet`` works without detectron2 (config, level assignment, make-up layer,
critic, class buffer, loss); with detectron2 it also registers ``InterNetROIHeads`` in ROI_HEADS_REGISTRY.
"""
from d2_refine.utils.env import has_detectron2

from .assignment import assign_levels, level_sets  # noqa: F401
from .buffer import ClassBuffer  # noqa: F401
from .config import add_internet_config  # noqa: F401
from .critic import InterNetCritic  # noqa: F401
from .loss import IntertwinerOT, intertwiner_loss  # noqa: F401
from .makeup import MakeupLayer  # noqa: F401

if has_detectron2():
    from .pooler import LevelAssignedROIPooler  # noqa: F401
    from .roi_heads import InterNetROIHeads  # noqa: F401
