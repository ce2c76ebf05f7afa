"""``add_rdsnet_config``: the ``MODEL.RDSNET`` node (defaults only; importable without detectron2).

Test-time values end in ``_TEST`` as in detectron2; configs written with the earlier names fail with a one-line
error naming the new key.
"""
from d2_refine.config import node_class
from d2_refine.config.renamed import register_renamed_keys

from .mbrm import MBRM_DEFAULT_BIAS, MBRM_DEFAULT_KERNEL

#: earlier key -> current key
RENAMED_KEYS = {
    "MODEL.RDSNET.MASK_THRESHOLD": "MODEL.RDSNET.MASK_THRESH_TEST",
}


def add_rdsnet_config(cfg):
    """Add the RDSNet / MBRM keys to ``cfg`` (in place; a second call is a no-op)."""
    if "RDSNET" in cfg.MODEL:
        return cfg
    node = node_class(cfg)
    register_renamed_keys(cfg, RENAMED_KEYS)  # merging a file or option with an old name: one line naming the new
    _C = cfg.MODEL.RDSNET = node()
    # Channels d of one object representation; the representation tower outputs A * 2 * d (background, foreground).
    _C.REP_DIM = 32

    _C.PIXEL_HEAD = node()
    # FPN levels fused by the pixel head, highest resolution first (each next level has twice the stride).
    _C.PIXEL_HEAD.IN_FEATURES = ["p3", "p4", "p5"]
    # Channels of the pixel head's 3x3 convs.
    _C.PIXEL_HEAD.CONV_DIM = 256
    # Number of [conv, x2 up-sampling] blocks after the fusion (1: P3's stride 8 -> pixel stride 4).
    _C.PIXEL_HEAD.NUM_CONVS = 1
    # Norm of the pixel head's 3x3 convs ("GN", "BN", "" ...; see detectron2.layers.get_norm).
    _C.PIXEL_HEAD.NORM = "GN"

    # Crop padding (fraction of the box side, at least one pixel) around the box in training: outside is ignored.
    _C.CROP_PADDING_TRAIN = 0.25
    # Crop padding at inference: the foreground probability is zeroed outside.
    _C.CROP_PADDING_TEST = 0.1
    # At most this many positive anchors per image train the masks (random subset).
    _C.MASKS_TO_TRAIN = 100
    # Positive anchors whose ground-truth mask has at most this many pixels (input resolution) train no mask.
    _C.MASK_MIN_AREA = 100
    # OHEM: in-crop background pixels kept per instance = ratio x in-crop foreground pixels (the hardest ones).
    _C.OHEM_NEG_POS_RATIO = 1.0
    # Weight of the mask loss.
    _C.MASK_LOSS_WEIGHT = 1.0
    # Foreground probability above which a mask pixel is on (inference).
    _C.MASK_THRESH_TEST = 0.4

    _C.MBRM = node()
    # Refine the boxes from the masks at inference (shares all trained weights with the model without it).
    _C.MBRM.ENABLED = False
    # Prior sigma = max(1, GAMMA * box side) around each detected edge.
    _C.MBRM.GAMMA = 0.05
    # The 9-tap edge filter (cross-correlation along the mask profile; reversed for right/bottom) ...
    _C.MBRM.KERNEL = list(MBRM_DEFAULT_KERNEL)
    # ... and its bias (the published values).
    _C.MBRM.BIAS = MBRM_DEFAULT_BIAS
    # Prior weights at or below this are zero (about 3.3 sigma).
    _C.MBRM.PRIOR_CUTOFF = 0.0044
    # "argmax" (published: integer pixel edges) or "expectation" (mean of each edge distribution).
    _C.MBRM.DECODE = "argmax"
    return cfg
