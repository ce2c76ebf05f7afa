"""``add_iounet_config``: the ``MODEL.IOU_NET`` node (defaults: the IoU-Net paper's and its reproduction's settings).

Only adds keys, so it imports and runs without detectron2.
"""
from d2_refine.config import node_class
from d2_refine.config.renamed import register_renamed_keys

#: what became of NMS_GUIDE "none" (the candidates of IoU-guided NMS, ranked by the cls score, scores kept)
NMS_NONE_NOTE = ('NMS_GUIDE "none" (IoU-guided candidates, each proposal\'s box of its argmax class, ranked by the '
                 'cls score) was removed: the nearest is "plain", detectron2\'s class-wise NMS on the cls score with '
                 'class-specific boxes')
_NMS_NOTE = ('one key for the NMS now: IOU_NMS True + NMS_GUIDE "rank" -> "iou_guided", NMS_GUIDE "weight" -> '
             f'"iou_guided_score_x_iou", IOU_NMS False -> "plain"; {NMS_NONE_NOTE}')

#: old key -> new key (see d2_refine/config/renamed.py): merging an old one raises one line naming the new one
RENAMED_KEYS = {
    "MODEL.IOU_NET.IOU_NMS": ("MODEL.IOU_NET.NMS_TEST", _NMS_NOTE),
    "MODEL.IOU_NET.NMS_GUIDE": ("MODEL.IOU_NET.NMS_TEST", _NMS_NOTE),
    "MODEL.IOU_NET.NMS_THRESH": "MODEL.IOU_NET.NMS_THRESH_TEST",
    "MODEL.IOU_NET.REFINE": "MODEL.IOU_NET.REFINE_TEST",
    "MODEL.IOU_NET.PRE_REFINE": "MODEL.IOU_NET.REFINE_TOPK_TEST",
    "MODEL.IOU_NET.STEPS": "MODEL.IOU_NET.REFINE_STEPS_TEST",
    "MODEL.IOU_NET.STEP_SIZE": "MODEL.IOU_NET.REFINE_STEP_SIZE_TEST",
    "MODEL.IOU_NET.EARLY_STOP": "MODEL.IOU_NET.REFINE_EARLY_STOP_TEST",
    "MODEL.IOU_NET.DEGRADE_TOL": "MODEL.IOU_NET.REFINE_DEGRADE_TOL_TEST",
    "MODEL.IOU_NET.REVERT_ON_DEGRADE": "MODEL.IOU_NET.REFINE_REVERT_ON_DEGRADE_TEST",
    "MODEL.IOU_NET.SCORE_TIMES_IOU": "MODEL.IOU_NET.SCORE_TIMES_IOU_TEST",
}


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
    # --- Inference (test-time values end in _TEST, as detectron2's) ---
    # NMS of the detections: "iou_guided" (the paper: ranked by predicted IoU, a kept box takes the best cls score
    # of the boxes it suppresses), "iou_guided_score_x_iou" (the same, ranked by cls score x predicted IoU) or
    # "plain" (detectron2's class-wise NMS on the cls score, on class-specific boxes).
    _C.IOU_NET.NMS_TEST = "iou_guided"
    # IoU above which IoU-guided NMS suppresses a box ("plain" uses MODEL.ROI_HEADS.NMS_THRESH_TEST).
    _C.IOU_NET.NMS_THRESH_TEST = 0.5
    # Refine the boxes by gradient ascent of the predicted IoU.
    _C.IOU_NET.REFINE_TEST = True
    # Boxes (best after NMS) that go through refinement.
    _C.IOU_NET.REFINE_TOPK_TEST = 100
    # Maximum refinement steps T and step size lambda.
    _C.IOU_NET.REFINE_STEPS_TEST = 5
    _C.IOU_NET.REFINE_STEP_SIZE_TEST = 0.5
    # A box stops refining when |IoU gain| < REFINE_EARLY_STOP_TEST or the gain < REFINE_DEGRADE_TOL_TEST.
    _C.IOU_NET.REFINE_EARLY_STOP_TEST = 0.001
    _C.IOU_NET.REFINE_DEGRADE_TOL_TEST = -0.01
    # On a degrading step, return to the previous box (False: keep it, as the paper's Algorithm 2).
    _C.IOU_NET.REFINE_REVERT_ON_DEGRADE_TEST = False
    # Multiply the final score by the predicted IoU of the final (output, clipped) box.
    _C.IOU_NET.SCORE_TIMES_IOU_TEST = True
    register_renamed_keys(cfg, RENAMED_KEYS)
    return cfg
