"""``add_fpt_config``: the MODEL.FPT node (importable without detectron2) and its presets."""
import copy

from fvcore.common.config import CfgNode as CN

from d2_refine.config import node_class

__all__ = ["add_fpt_config", "FPT_PRESETS", "resolve_fpt_config"]

#: Presets: MODEL.FPT.PRESET sets these keys (dotted, relative to MODEL.FPT) unless a config sets them itself.
FPT_PRESETS = {
    # the paper's setting (= the defaults): p2-p5, ST everywhere, euclidean GT, 3x3 fuse (GPU-sized)
    "fpt_paper": {},
    # CPU-sized: transform p3-p5 only (p2 unchanged, p6 re-pooled), ST on p4-p5, linear "dot" GT, 1x1 fuse
    "fpt_lite": {"IN_FEATURES": ["p3", "p4", "p5"], "ST.LEVELS": ["p4", "p5"], "GT.MODE": "dot", "FUSE_KERNEL": 1},
    # the released code's math: FPN laterals as input, "dot" GT, BN
    "fpt_release": {"INPUT": "lateral", "GT.MODE": "dot", "NORM": "BN"},
}


def add_fpt_config(cfg):
    """Add MODEL.FPT (Feature Pyramid Transformer, Zhang et al., ECCV 2020) to ``cfg`` in place."""
    if "FPT" in cfg.MODEL:
        return
    _C = cfg.MODEL
    CN_ = node_class(cfg)
    _C.FPT = CN_()
    # One of FPT_PRESETS ("fpt_paper", "fpt_lite", "fpt_release") or "" (none): it sets its keys unless this
    # config gives them a non-default value.
    _C.FPT.PRESET = ""
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

    _C.FPT.ST = CN_()
    # Self-transformer on/off.
    _C.FPT.ST.ENABLED = True
    # Levels with a self-transformer; [] = every transformed level.
    _C.FPT.ST.LEVELS = []
    # Number of softmaxes of the Mixture of Softmaxes.
    _C.FPT.ST.MIXTURES = 2
    # Average-pool keys and values 3x3 / stride 2.
    _C.FPT.ST.POOL_KV = True
    # One 1x1 conv for queries and keys.
    _C.FPT.ST.SHARE_QK = True
    # Dropout on each attention map (training).
    _C.FPT.ST.DROPOUT = 0.1
    # Logit scale; 0 = 1 / sqrt(C).
    _C.FPT.ST.SCALE = 0.0

    _C.FPT.GT = CN_()
    # Grounding transformer (top-down) on/off.
    _C.FPT.GT.ENABLED = True
    # "euclidean" (paper), "dot" (release, linear) or "embedded" (softmax of q.k).
    _C.FPT.GT.MODE = "euclidean"
    # Width of q, k, v; 0 = C / 2.
    _C.FPT.GT.INTER_CHANNELS = 0
    # Mixture of Softmaxes parts (1 = plain softmax).
    _C.FPT.GT.MIXTURES = 1
    # tau of the euclidean mode; 0 = 1 / sqrt(INTER_CHANNELS).
    _C.FPT.GT.TEMPERATURE = 0.0

    _C.FPT.RT = CN_()
    # Rendering transformer (bottom-up) on/off.
    _C.FPT.RT.ENABLED = True
    # "conv_then_weight" (release) or "weight_then_conv" (paper).
    _C.FPT.RT.ORDER = "conv_then_weight"


def _get(node, dotted):
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(node, dotted, value):
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


def resolve_fpt_config(cfg) -> CN:
    """A copy of ``cfg.MODEL.FPT`` with its PRESET applied.

    A preset key takes the preset's value unless ``cfg`` gives it a value other than the default (so a key
    set explicitly to its default value still takes the preset's).
    """
    node = cfg.MODEL.FPT
    preset = node.PRESET
    if preset not in ("", *FPT_PRESETS):
        raise ValueError(f"MODEL.FPT.PRESET must be '' or one of {sorted(FPT_PRESETS)}, got {preset!r}")
    out = copy.deepcopy(node)
    if not preset:
        return out
    defaults = CN({"MODEL": {}})
    add_fpt_config(defaults)
    was_frozen = out.is_frozen()
    out.defrost()
    for key, value in FPT_PRESETS[preset].items():
        if _get(node, key) == _get(defaults.MODEL.FPT, key):
            _set(out, key, copy.deepcopy(value))
    if was_frozen:
        out.freeze()
    return out
