"""Datasets: the embedded procedural ``shapes`` set (detectron2-free generator in :mod:`.shapes`; its
detectron2 registration in :mod:`.datasets`, imported here when detectron2 is present)."""
from ..utils.env import has_detectron2
from .shapes import SHAPES_CLASSES, ShapesParams, generate_shapes_split  # noqa: F401

if has_detectron2():
    from .datasets import configure_shapes, register_shapes, prepare_datasets  # noqa: F401

    register_shapes()
