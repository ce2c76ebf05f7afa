"""``add_d2_refine_config``: the shared keys plus every method's ``add_<method>_config``.

Only adds keys: works on detectron2's ``get_cfg()`` and is importable without detectron2.
"""
from fvcore.common.config import CfgNode


def node_class(cfg):
    """The class to make ``cfg``'s new nodes of: ``type(cfg)`` (detectron2's CfgNode subclass on detectron2's
    config), since yacs refuses to merge a YAML node into a node of another class; fvcore's CfgNode for anything
    else. Every ``add_*_config`` builds its nodes with it."""
    return type(cfg) if isinstance(cfg, CfgNode) else CfgNode


def add_shapes_config(cfg):
    """Keys of the embedded procedural dataset ``shapes`` (see d2_refine/data/shapes.py)."""
    if "SHAPES" in cfg.DATASETS:
        return
    CN = node_class(cfg)
    _C = cfg.DATASETS
    _C.SHAPES = CN()
    # Where the generated images and COCO json go; "" = $DETECTRON2_DATASETS/shapes or ~/.cache/d2_refine/shapes.
    _C.SHAPES.ROOT = ""
    # Seed of the generator: the same seed (and parameters) gives byte-identical files.
    _C.SHAPES.SEED = 0
    # Number of images of shapes_train and shapes_val.
    _C.SHAPES.NUM_TRAIN = 2000
    _C.SHAPES.NUM_VAL = 300
    # Number of images of shapes_tune, a held-out split (its own seed) for choosing test-time settings without
    # looking at shapes_val; generated only when a config or tool uses it.
    _C.SHAPES.NUM_TUNE = 300
    # Side of the square images, in pixels.
    _C.SHAPES.IMAGE_SIZE = 192
    # Objects per image, drawn uniformly in [MIN_OBJECTS, MAX_OBJECTS].
    _C.SHAPES.MIN_OBJECTS = 2
    _C.SHAPES.MAX_OBJECTS = 8
    # Difficulty in [0, 1]: background texture/noise amplitude, object-colour contrast, occlusion allowed.
    _C.SHAPES.DIFFICULTY = 0.5


def add_trainer_config(cfg):
    """Keys of d2_refine's Trainer (d2_refine/engine/trainer.py)."""
    if "EXACT_RESUME" in cfg.SOLVER:
        return
    # --resume continues exactly as if never stopped: checkpoints hold the random generators' states and the data
    # loader replays the batches already trained on (it loads every one of them again: cheap on shapes, hours at
    # COCO scale, hence off by default, as in detectron2).
    cfg.SOLVER.EXACT_RESUME = False


def add_coco_format_config(cfg):
    """``DATASETS.COCO_FORMAT``: the user's own COCO-format datasets, registered by name
    (d2_refine/data/datasets.py)."""
    if "COCO_FORMAT" in cfg.DATASETS:
        return
    # A list of (name, json file, image folder): each is registered as detectron2's register_coco_instances does
    # before training/evaluation and can then be named in DATASETS.TRAIN / DATASETS.TEST, e.g.
    #   COCO_FORMAT: [["mine_train", "data/mine/train.json", "data/mine/images"]]
    cfg.DATASETS.COCO_FORMAT = []


def add_d2_refine_config(cfg):
    """Add the shared keys and every available method's config node to ``cfg`` (in place). Each method's package
    is imported on the way, which (with detectron2) registers its components for a model built from ``cfg``."""
    from ..projects import import_config_functions, register_all

    register_all()
    add_shapes_config(cfg)
    add_trainer_config(cfg)
    add_coco_format_config(cfg)
    for fn in import_config_functions():
        fn(cfg)
    return cfg
