"""Ops of d2_refine, compiled in ``d2_refine._C`` (C++/CUDA, registered as ``torch.ops.d2_refine.*``) with
pure-PyTorch fallbacks:

- :func:`prroi_pool` / :class:`PrRoIPool2d`: Precise RoI Pooling (differentiable w.r.t. features and boxes);
- :func:`iou_guided_nms`: IoU-guided NMS, batched per class.

:func:`has_ops` tells whether the compiled library loaded.
"""
from ._library import has_ops
from . import _registrations  # noqa: F401  (fake kernels + autograd, when the library loaded)
from .iou_guided_nms import _iou_guided_nms_reference, iou_guided_nms
from .prroi_pool import PrRoIPool2d, _prroi_pool_reference, prroi_pool

__all__ = ["has_ops", "prroi_pool", "PrRoIPool2d", "iou_guided_nms"]
