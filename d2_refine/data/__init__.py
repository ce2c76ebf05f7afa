"""Datasets: the embedded procedural ``shapes`` set (detectron2-free generator in :mod:`.shapes`; its
detectron2 registration in :mod:`.datasets`, imported here when detectron2 is present) and the config's own
COCO-format datasets (``DATASETS.COCO_FORMAT``, registered in :mod:`.datasets`)."""
from ..utils.env import has_detectron2
from .shapes import SHAPES_CLASSES, ShapesParams, generate_shapes_split  # noqa: F401

if has_detectron2():
    from .datasets import (  # noqa: F401
        DatasetError,
        check_datasets,
        configure_shapes,
        prepare_datasets,
        register_coco_format,
        register_shapes,
    )
    from .mapper import CheckedDatasetMapper, read_image_checked  # noqa: F401

    register_shapes()
