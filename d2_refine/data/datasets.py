"""Registration of ``shapes_train`` / ``shapes_val`` / ``shapes_tune`` (and of the pretrained trunk's source set,
``shapes_source_train`` / ``shapes_source_val``) and of the config's ``DATASETS.COCO_FORMAT``
datasets with detectron2's COCO loader and metadata, so that COCOEvaluator scores them like COCO; and the check,
before training, that every dataset of the config is registered, its files are there and its categories fit the
model's classes."""
import json
import logging
import mmap
import os
from typing import Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.utils import comm

from ..utils.messages import exception_line
from .shapes import (
    SHAPES_CLASSES,
    SOURCE_CLASSES,
    ShapesParams,
    default_shapes_root,
    generate_shapes_split,
    shapes_split_files,
)

# shapes_tune: a held-out split of its own seed for choosing test-time settings (e.g. a solver budget), so that
# shapes_val stays the split results are reported on
# shapes_source_*: other shape families (SOURCE_CLASSES) from a seed namespace of their own, the source set the
# pretrained trunk is made on (tools/pretrain_trunk.py); they share no image and no class with the three above
SPLITS = {"shapes_train": "train", "shapes_val": "val", "shapes_tune": "tune",
          "shapes_source_train": "source_train", "shapes_source_val": "source_val"}
SPLIT_CLASSES = {"train": SHAPES_CLASSES, "val": SHAPES_CLASSES, "tune": SHAPES_CLASSES,
                 "source_train": SOURCE_CLASSES, "source_val": SOURCE_CLASSES}
NUM_SOURCE_TRAIN, NUM_SOURCE_VAL = 4000, 300  # the source set's default sizes
_registered = {}  # dataset name -> (root, ShapesParams)
_coco_format = {}  # dataset name -> (json file, image folder) registered from DATASETS.COCO_FORMAT
_categories = {}  # (json file, size, mtime) -> number of categories (None: no top-level "categories" list)
logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset of the config that cannot be used; the message is one line meant for the user."""

    @staticmethod
    def line(exc: Exception) -> str:
        """The user's line of a DatasetError, also of one raised in a DataLoader worker (re-raised in the main
        process with the worker's traceback as its message: its last line is the original one)."""
        text = str(exc).strip()
        if "Original Traceback" in text:
            text = text.splitlines()[-1].split("DatasetError: ", 1)[-1]
        return text


def register_shapes(root: Optional[str] = None, num_train: int = 2000, num_val: int = 300, image_size: int = 192,
                    min_objects: int = 2, max_objects: int = 8, difficulty: float = 0.5, seed: int = 0,
                    num_tune: int = 300, num_source_train: int = NUM_SOURCE_TRAIN,
                    num_source_val: int = NUM_SOURCE_VAL):
    """(Re-)register ``shapes_train``, ``shapes_val``, ``shapes_tune`` and the source set's ``shapes_source_train``
    / ``shapes_source_val`` with these parameters. Files are generated on first use (see :func:`prepare_datasets`);
    the metadata already names where they will be."""
    root = default_shapes_root(root)
    sizes = {"train": num_train, "val": num_val, "tune": num_tune, "source_train": num_source_train,
             "source_val": num_source_val}
    for name, split in SPLITS.items():
        params = ShapesParams(num_images=sizes[split], image_size=image_size,
                              min_objects=min_objects, max_objects=max_objects, difficulty=difficulty,
                              seed=seed).validate()
        if _registered.get(name) == (root, params):
            continue
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

        classes = SPLIT_CLASSES[split]

        def _load(root=root, split=split, params=params, name=name, classes=classes):
            files = generate_shapes_split(root, split, params, classes=classes)
            return load_coco_json(files["json_file"], files["image_root"], name)

        DatasetCatalog.register(name, _load)
        MetadataCatalog.get(name).set(
            **shapes_split_files(root, split, params), evaluator_type="coco",
            thing_classes=list(classes),
        )
        _registered[name] = (root, params)


def configure_shapes(cfg):
    """Register the shapes datasets with the parameters of ``cfg.DATASETS.SHAPES``."""
    s = cfg.DATASETS.SHAPES
    register_shapes(root=s.ROOT or None, num_train=s.NUM_TRAIN, num_val=s.NUM_VAL, image_size=s.IMAGE_SIZE,
                    min_objects=s.MIN_OBJECTS, max_objects=s.MAX_OBJECTS, difficulty=s.DIFFICULTY, seed=s.SEED,
                    num_tune=s.NUM_TUNE)


def register_coco_format(cfg):
    """Register each ``(name, json file, image folder)`` of ``cfg.DATASETS.COCO_FORMAT`` as detectron2's
    ``register_coco_instances`` does, loaded by :func:`load_coco_format` (class names are read from the json's
    categories). Registering the same entry again does nothing; a name that another dataset already has is
    refused."""
    for entry in cfg.DATASETS.COCO_FORMAT:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) and v for v in entry)):
            raise DatasetError(f"DATASETS.COCO_FORMAT entries are (name, json file, image folder); got {entry!r}")
        name, json_file, image_root = entry[0], os.path.expanduser(entry[1]), os.path.expanduser(entry[2])
        if _coco_format.get(name) == (json_file, image_root):
            continue
        if name in _coco_format:  # the same name with other files (an earlier config in this process)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        elif name in DatasetCatalog.list():
            raise DatasetError(f"DATASETS.COCO_FORMAT: {name!r} is already the name of a registered dataset "
                               "(detectron2's or d2_refine's): choose another name")
        DatasetCatalog.register(name, lambda n=name, j=json_file, r=image_root: load_coco_format(n, j, r))
        # what detectron2's register_coco_instances sets (class names come from the json when it is loaded)
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
        _coco_format[name] = (json_file, image_root)


def load_coco_format(name: str, json_file: str, image_root: str):
    """detectron2's ``load_coco_json``, with one :class:`DatasetError` line naming the dataset and its json for a
    file that is not JSON, not COCO's layout, names a category it does not define, or holds no image."""
    where = f"dataset {name!r}: {json_file}"
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    except (KeyError, AssertionError, TypeError, AttributeError) as e:  # pycocotools' and detectron2's
        msg = exception_line(e)
        if isinstance(e, KeyError) and not msg.startswith("Encountered"):
            msg = f"an entry lacks the key {msg!r}"
        raise DatasetError(f"{where}: not a COCO-format json ({msg})") from None
    if not dicts:
        raise DatasetError(f"{where}: holds no images (its \"images\" list is empty or missing)")
    return dicts


def check_datasets(cfg, train: bool = True):
    """Raise one :class:`DatasetError` for the first dataset of DATASETS.TRAIN (if ``train``) and DATASETS.TEST that
    is not registered, or whose json file or image folder is missing (the shapes splits are generated on first use
    and not checked). Registers DATASETS.COCO_FORMAT first. Meant before any process starts training."""
    register_coco_format(cfg)
    known = set(DatasetCatalog.list())
    for name in (list(cfg.DATASETS.TRAIN) if train else []) + list(cfg.DATASETS.TEST):
        if name not in known:
            raise DatasetError(f"dataset {name!r} is not registered: name one of detectron2's (e.g. coco_2017_train), "
                               "shapes_train / shapes_val, or add (name, json file, image folder) to "
                               "DATASETS.COCO_FORMAT")
        if name in SPLITS:
            _check_num_classes(cfg, name, len(SPLIT_CLASSES[SPLITS[name]]), "it")
            continue
        meta = MetadataCatalog.get(name)
        for key, what, exists in (("json_file", "json file", os.path.isfile),
                                  ("image_root", "image folder", os.path.isdir)):
            path = meta.get(key, None)
            if path and "://" not in path and not exists(path):
                where = ("set in DATASETS.COCO_FORMAT" if name in _coco_format else
                         "detectron2 reads its datasets under $DETECTRON2_DATASETS, "
                         f"now {os.environ.get('DETECTRON2_DATASETS') or 'unset: ./datasets'}")
                raise DatasetError(f"dataset {name!r}: {what} not found: {path} ({where})")
        json_file = meta.get("json_file", None)
        if json_file and "://" not in json_file and os.path.isfile(json_file):
            _check_num_classes(cfg, name, count_categories(json_file), json_file)


def count_categories(json_file: str) -> Optional[int]:
    """Number of entries of the top-level ``"categories"`` list of a COCO-format json, read without parsing the
    rest (COCO writes it last, after hundreds of MB of images and annotations); None when there is none. Each file
    is read once per process (until it changes)."""
    st = os.stat(json_file)
    key = (os.path.abspath(json_file), st.st_size, st.st_mtime_ns)
    if key not in _categories:
        _categories[key] = _scan_categories(json_file)
    return _categories[key]


def _scan_categories(json_file: str) -> Optional[int]:
    decoder, key = json.JSONDecoder(), b'"categories"'
    with open(json_file, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = mm.rfind(key)  # from the end: COCO writes the top-level "categories" last
            while pos >= 0:
                start = pos + len(key)
                while mm[start:start + 1].isspace():
                    start += 1
                window = 1 << 16  # decode a growing window: the list is small, the file may be huge
                while mm[start:start + 1] == b":":
                    try:
                        value, _ = decoder.raw_decode(mm[start + 1:start + window].decode("utf-8", "ignore").lstrip())
                    except ValueError:
                        if start + window >= len(mm):
                            break
                        window *= 4
                        continue
                    if isinstance(value, list) and all(isinstance(c, dict) and "id" in c for c in value):
                        return len(value)
                    break
                pos = mm.rfind(key, 0, pos)
    return None


def num_classes_key(cfg) -> Optional[Tuple[str, int]]:
    """The config key that sets the model's number of classes and its value, by MODEL.META_ARCHITECTURE: a RetinaNet
    (RDSNet included) reads MODEL.RETINANET.NUM_CLASSES, an R-CNN (GeneralizedRCNN) MODEL.ROI_HEADS.NUM_CLASSES;
    None for other meta-architectures."""
    from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet

    name = cfg.MODEL.META_ARCHITECTURE
    arch = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
    for base, key in ((RetinaNet, "RETINANET"), (GeneralizedRCNN, "ROI_HEADS")):
        if arch is not None and issubclass(arch, base):
            return f"MODEL.{key}.NUM_CLASSES", cfg.MODEL[key].NUM_CLASSES
    return None


def _check_num_classes(cfg, name: str, n: Optional[int], where: str) -> None:
    """More categories (``n``) in a dataset than the model has classes: a :class:`DatasetError` (the loss would fail
    on the first out-of-range label); fewer: one warning (classes that never occur). ``where``: the json file."""
    key_value = num_classes_key(cfg)
    if key_value is None:
        return
    key, classes = key_value
    if n is None or n == classes:
        return
    if n > classes:
        raise DatasetError(f"dataset {name!r}: {where} has {n} categories but {key} is {classes}: set {key} {n} "
                           f"(or use a dataset with {classes} categories)")
    logger.warning("dataset %r: %s has %d categories, fewer than %s %d: %d classes of the model never occur in it",
                   name, where, n, key, classes, classes - n)


def prepare_datasets(cfg):
    """Register the config's DATASETS.COCO_FORMAT datasets and generate the shapes splits it uses (main process;
    the others wait), after registering them with the config's parameters. detectron2's own datasets (COCO under
    $DETECTRON2_DATASETS) are registered by detectron2."""
    register_coco_format(cfg)
    configure_shapes(cfg)
    names = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n in _registered]
    if comm.is_main_process():
        for name in names:
            root, params = _registered[name]
            split = SPLITS[name]
            generate_shapes_split(root, split, params, classes=SPLIT_CLASSES[split])
    comm.synchronize()
