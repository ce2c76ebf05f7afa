"""``add_fpt_config``: the MODEL.FPT node (importable without detectron2).

The paper's setting is the default; the other settings are ``_BASE_`` files holding their keys
(configs/FPT/Base-FPT-lite.yaml, Base-FPT-release.yaml; Base-FPT-paper.yaml spells the defaults out), so a value
written in a config or on the command line always wins.
"""

from d2_refine.config import node_class
from d2_refine.config.renamed import register_renamed_keys

__all__ = ["add_fpt_config", "RENAMED_KEYS"]

_PRESETS_MOVED = ("_BASE_ configs/FPT/Base-FPT-lite.yaml (fpt_lite), Base-FPT-paper.yaml (fpt_paper) or "
                  "Base-FPT-release.yaml (fpt_release)",
                  "presets are _BASE_ files now, e.g. _BASE_: [\"../Baselines/mask_rcnn_R_18_FPN_shapes.yaml\", "
                  "\"Base-FPT-lite.yaml\"]")

#: old key -> new key (see d2_refine/config/renamed.py): merging an old one raises one line naming the new one
RENAMED_KEYS = {
    "MODEL.FPT.ST": "MODEL.FPT.SELF",
    "MODEL.FPT.GT": "MODEL.FPT.GROUNDING",
    "MODEL.FPT.RT": "MODEL.FPT.RENDERING",
    "MODEL.FPT.PRESET": _PRESETS_MOVED,
}


def add_fpt_config(cfg):
    """Add MODEL.FPT (Feature Pyramid Transformer, Zhang et al., ECCV 2020) to ``cfg`` in place."""
    if "FPT" in cfg.MODEL:
        return
    _C = cfg.MODEL
    CN_ = node_class(cfg)
    _C.FPT = CN_()
    # Registered backbone builder (an FPN) that build_fpt_backbone wraps.
    _C.FPT.WRAPPED_BACKBONE = "build_resnet_fpn_backbone"
    # FPN outputs to transform, fine to coarse; [] = all but the levels of a top block reading a transformed one.
    _C.FPT.IN_FEATURES = []
    # "fpn": transform the FPN outputs; "lateral" (release): the FPN's 1x1 laterals (no top-down, no 3x3 convs).
    _C.FPT.INPUT = "fpn"
    # Norm of the transformers ("GN", "BN", "SyncBN", "" or any detectron2 norm).
    _C.FPT.NORM = "GN"
    # Kernel of each level's fuse conv (concatenation -> C channels).
    _C.FPT.FUSE_KERNEL = 3
    # Norm after the fuse conv ("" = none, with bias).
    _C.FPT.FUSE_NORM = ""
    # Cross-level pairs: "all" (every pair, release) or "adjacent".
    _C.FPT.CROSS_RANGE = "all"
    # Attention computation: "auto", "sdpa", "chunked" or "naive" (full matrix; for tests).
    _C.FPT.ATTN_IMPL = "auto"
    # Query rows per chunk of the "chunked" path.
    _C.FPT.QUERY_CHUNK = 4096

    _C.FPT.SELF = CN_()
    # Self-transformer on/off.
    _C.FPT.SELF.ENABLED = True
    # Levels with a self-transformer; [] = every transformed level.
    _C.FPT.SELF.LEVELS = []
    # Number of softmaxes of the Mixture of Softmaxes.
    _C.FPT.SELF.MIXTURES = 2
    # Average-pool keys and values 3x3 / stride 2.
    _C.FPT.SELF.POOL_KV = True
    # One 1x1 conv for queries and keys.
    _C.FPT.SELF.SHARE_QK = True
    # Dropout on each attention map (training).
    _C.FPT.SELF.DROPOUT = 0.1
    # Logit scale; 0 = 1 / sqrt(C).
    _C.FPT.SELF.SCALE = 0.0

    _C.FPT.GROUNDING = CN_()
    # Grounding transformer (top-down) on/off.
    _C.FPT.GROUNDING.ENABLED = True
    # "euclidean" (paper), "dot" (release, linear) or "embedded" (softmax of q.k).
    _C.FPT.GROUNDING.MODE = "euclidean"
    # Width of q, k, v; 0 = C / 2.
    _C.FPT.GROUNDING.INTER_CHANNELS = 0
    # Mixture of Softmaxes parts (1 = plain softmax).
    _C.FPT.GROUNDING.MIXTURES = 1
    # tau of the euclidean mode; 0 = 1 / sqrt(INTER_CHANNELS).
    _C.FPT.GROUNDING.TEMPERATURE = 0.0

    _C.FPT.RENDERING = CN_()
    # Rendering transformer (bottom-up) on/off.
    _C.FPT.RENDERING.ENABLED = True
    # "conv_then_weight" (release) or "weight_then_conv" (paper).
    _C.FPT.RENDERING.ORDER = "conv_then_weight"

    register_renamed_keys(cfg, RENAMED_KEYS)
