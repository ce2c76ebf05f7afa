"""Optimizer construction: detectron2's, plus clipping the gradient norm of the whole model (``full_model``)."""
from .build import FULL_MODEL, build_optimizer, clip_full_model_gradient_norm  # noqa: F401
