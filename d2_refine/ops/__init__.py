"""Ops of d2_refine, compiled in ``d2_refine._C`` (C++/CUDA, registered as ``torch.ops.d2_refine.*``) with
pure-PyTorch fallbacks. They need neither detectron2 nor a GPU:

- :func:`prroi_pool` / :class:`PrRoIPool2d`: Precise RoI Pooling (differentiable w.r.t. features and boxes);
  :class:`PrRoIPool2D` is the same op with the interface of the official PreciseRoIPooling library;
- :func:`multilevel_prroi_pool`: PrRoIPool over a feature pyramid in one call (the level of each box from its size);
- :func:`iou_guided_nms`: IoU-guided NMS, batched per class; :func:`iou_guided_nms_padded` returns it at a fixed
  size with its count on the device.

They accept mixed dtypes and run under ``torch.autocast`` (computing in float32). :func:`has_ops` tells whether
the compiled library loaded; ``python -m d2_refine.collect_env`` shows which kernels it registered. See README.md
in this folder.
"""
from . import _registrations  # noqa: F401  (fake kernels + autograd, when the library loaded)
from ._library import has_ops
from .iou_guided_nms import (  # noqa: F401  (the references: the tests' oracles)
    _iou_guided_nms_padded_reference,
    _iou_guided_nms_reference,
    iou_guided_nms,
    iou_guided_nms_padded,
)
from .multilevel_prroi_pool import _multilevel_prroi_pool_reference, multilevel_prroi_pool  # noqa: F401
from .prroi_pool import PrRoIPool2D, PrRoIPool2d, _prroi_pool_reference, prroi_pool  # noqa: F401

__all__ = ["has_ops", "prroi_pool", "PrRoIPool2d", "PrRoIPool2D", "multilevel_prroi_pool", "iou_guided_nms",
           "iou_guided_nms_padded"]
