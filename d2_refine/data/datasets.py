"""Registration of ``shapes_train`` / ``shapes_val`` with detectron2's COCO loader and metadata, so that
COCOEvaluator scores them like COCO."""
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.utils import comm

from .shapes import SHAPES_CLASSES, ShapesParams, default_shapes_root, generate_shapes_split, shapes_split_files

SPLITS = {"shapes_train": "train", "shapes_val": "val"}
_registered = {}  # dataset name -> (root, ShapesParams)


def register_shapes(root: Optional[str] = None, num_train: int = 2000, num_val: int = 300, image_size: int = 192,
                    min_objects: int = 2, max_objects: int = 8, difficulty: float = 0.5, seed: int = 0):
    """(Re-)register ``shapes_train`` and ``shapes_val`` with these parameters. Files are generated on first use
    (see :func:`prepare_datasets`); the metadata already names where they will be."""
    root = default_shapes_root(root)
    for name, split in SPLITS.items():
        params = ShapesParams(num_images=num_train if split == "train" else num_val, image_size=image_size,
                              min_objects=min_objects, max_objects=max_objects, difficulty=difficulty,
                              seed=seed).validate()
        if _registered.get(name) == (root, params):
            continue
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

        def _load(root=root, split=split, params=params, name=name):
            files = generate_shapes_split(root, split, params)
            return load_coco_json(files["json_file"], files["image_root"], name)

        DatasetCatalog.register(name, _load)
        MetadataCatalog.get(name).set(
            **shapes_split_files(root, split, params), evaluator_type="coco",
            thing_classes=list(SHAPES_CLASSES),
        )
        _registered[name] = (root, params)


def configure_shapes(cfg):
    """Register the shapes datasets with the parameters of ``cfg.DATASETS.SHAPES``."""
    s = cfg.DATASETS.SHAPES
    register_shapes(root=s.ROOT or None, num_train=s.NUM_TRAIN, num_val=s.NUM_VAL, image_size=s.IMAGE_SIZE,
                    min_objects=s.MIN_OBJECTS, max_objects=s.MAX_OBJECTS, difficulty=s.DIFFICULTY, seed=s.SEED)


def prepare_datasets(cfg):
    """Generate the shapes splits the config uses (main process; the others wait), after registering them with
    the config's parameters. Other datasets are left to detectron2 (COCO under $DETECTRON2_DATASETS)."""
    configure_shapes(cfg)
    names = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n in _registered]
    if comm.is_main_process():
        for name in names:
            root, params = _registered[name]
            generate_shapes_split(root, SPLITS[name], params)
    comm.synchronize()
