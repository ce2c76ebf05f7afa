"""``add_iounet_config``: the ``MODEL.IOU_NET`` node (defaults of the IoU-Net spec, section 7).

Only adds keys, so it imports and runs without detectron2.
"""
from d2_refine.config import node_class


def add_iounet_config(cfg):
    """Add ``MODEL.IOU_NET`` to ``cfg`` (in place). A second call is a no-op."""
    if "IOU_NET" in cfg.MODEL:
        return cfg
    _C = cfg.MODEL
    node_cls = node_class(cfg)
    _C.IOU_NET = node_cls()
    # --- IoU head (always pools with PrRoIPool: roi_align has no gradient w.r.t. the box) ---
    # Output side of the PrRoIPool features of the IoU head.
    _C.IOU_NET.POOLER_RESOLUTION = 7
    # Number of hidden fully-connected layers and their width.
    _C.IOU_NET.NUM_FC = 2
    _C.IOU_NET.FC_DIM = 1024
    # One IoU per class (False) or a single class-agnostic IoU (True).
    _C.IOU_NET.CLS_AGNOSTIC = False
    # IoU loss: "smooth_l1" (target (IoU - 0.5) / 0.5, decode 0.5 * out + 0.5) or "bce" (logits vs IoU).
    _C.IOU_NET.LOSS = "smooth_l1"
    # Weight of loss_iou.
    _C.IOU_NET.LOSS_WEIGHT = 5.0
    # Beta of the smooth-L1 loss.
    _C.IOU_NET.SMOOTH_L1_BETA = 1.0
    # --- IoU-balanced jittered training RoIs (generated from the ground truth, not from RPN) ---
    # At most this many jittered RoIs per image.
    _C.IOU_NET.NUM_ROIS = 1000
    # A jittered RoI trains the IoU head when its IoU with its best ground-truth box is >= FG_IOU.
    _C.IOU_NET.FG_IOU = 0.5
    # At most this many deltas kept per IoU bin of the delta pool.
    _C.IOU_NET.BIN_POOL = 4000
    # Steps of the quadratic grids of the delta pool: 2 * XY_STEPS - 1 centre offsets, WH_STEPS scales.
    _C.IOU_NET.XY_STEPS = 16
    _C.IOU_NET.WH_STEPS = 16
    # Seed of the (deterministic) delta pool.
    _C.IOU_NET.POOL_SEED = 0
    # --- Inference ---
    # Ranking key of IoU-guided NMS: "rank" (predicted IoU), "weight" (cls score x IoU), "none" (cls score).
    _C.IOU_NET.NMS_GUIDE = "rank"
    # IoU above which IoU-guided NMS suppresses a box.
    _C.IOU_NET.NMS_THRESH = 0.5
    # Use IoU-guided NMS (False: detectron2's class-wise NMS on the classification score).
    _C.IOU_NET.IOU_NMS = True
    # Refine the boxes by gradient ascent of the predicted IoU.
    _C.IOU_NET.REFINE = True
    # Boxes (best after NMS) that go through refinement.
    _C.IOU_NET.PRE_REFINE = 100
    # Maximum refinement steps T and step size lambda.
    _C.IOU_NET.STEPS = 5
    _C.IOU_NET.STEP_SIZE = 0.5
    # A box stops refining when |IoU gain| < EARLY_STOP or the gain < DEGRADE_TOL.
    _C.IOU_NET.EARLY_STOP = 0.001
    _C.IOU_NET.DEGRADE_TOL = -0.01
    # On a degrading step, return to the previous box (False: keep it, as the paper's Algorithm 2).
    _C.IOU_NET.REVERT_ON_DEGRADE = False
    # Multiply the final score by the predicted IoU of the final box.
    _C.IOU_NET.SCORE_TIMES_IOU = True
    return cfg
