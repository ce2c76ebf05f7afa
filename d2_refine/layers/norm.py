"""One norm builder for the methods: detectron2's ``get_norm`` (same names, same contract) plus "Affine".

``get_norm(norm, channels)`` returns the norm module or None:

- ``""`` or ``None``: None, no norm (as detectron2; the caller then usually puts a bias on the conv);
- a callable ``channels -> module``: its result;
- ``"Affine"``: :class:`AffineChannel2d`, a trainable per-channel scale and shift (BN whose statistics stay
  0 / 1: what InterNet's released BN layers effectively were);
- ``"BN"``: detectron2's BN (``torch.nn.BatchNorm2d``), except that a training batch with one value per
  channel (one RoI after a conv to 1x1) uses the running statistics instead of raising
  (:class:`GuardedBatchNorm2d`);
- any other name of ``detectron2.layers.get_norm`` ("SyncBN", "FrozenBN", "GN", "LN", ...).

Torch-only modules stay importable without detectron2: then "SyncBN" and "GN" resolve to the torch modules
detectron2 maps them to, and the other detectron2 names ask for detectron2.
"""
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from d2_refine.utils.env import has_detectron2, require_detectron2

__all__ = ["NormSpec", "get_norm", "AffineChannel2d", "GuardedBatchNorm2d"]

#: a norm name or a callable channels -> module (see :func:`get_norm`)
NormSpec = Union[str, None, Callable[[int], nn.Module]]


class AffineChannel2d(nn.Module):
    """``y = x * weight + bias`` per channel (BN with frozen 0/1 statistics and a trainable affine)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class GuardedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that uses its running statistics on training batches with one value per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // max(x.shape[1], 1) <= 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(32, channels)


_OWN = {"Affine": AffineChannel2d, "BN": GuardedBatchNorm2d}
#: what detectron2's get_norm gives for these names, for torch-only use without detectron2
_TORCH_ONLY = {"SyncBN": nn.SyncBatchNorm, "GN": _group_norm}


def get_norm(norm: NormSpec, out_channels: int) -> Optional[nn.Module]:
    """The norm layer ``norm`` for ``out_channels`` channels, or None for "" / None (see the module docstring)."""
    if norm is None or (isinstance(norm, str) and len(norm) == 0):
        return None
    if callable(norm):
        return norm(out_channels)
    if norm == "GN" and out_channels % 32 != 0:
        raise ValueError(f"norm 'GN' uses 32 groups: the channels ({out_channels}) must be a multiple of 32")
    if norm in _OWN:
        return _OWN[norm](out_channels)
    if has_detectron2():
        from detectron2.layers import get_norm as d2_get_norm

        try:
            return d2_get_norm(norm, out_channels)
        except KeyError:
            raise ValueError(f"unknown norm {norm!r}: use '' (none), 'Affine', or a name of detectron2's get_norm "
                             f"('BN', 'SyncBN', 'FrozenBN', 'GN', 'LN', ...)") from None
    if norm in _TORCH_ONLY:
        return _TORCH_ONLY[norm](out_channels)
    require_detectron2(f"norm {norm!r}")
