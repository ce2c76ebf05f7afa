"""Normalisation and conv helpers of the FPT modules (torch-only).

A ``norm`` argument is either a name ("" = none, "BN", "SyncBN", "GN" = GroupNorm with 32 groups) or a callable
``channels -> nn.Module`` (the detectron2 glue passes ``lambda c: detectron2.layers.get_norm(name, c)`` so every
detectron2 norm works).
"""
from collections import OrderedDict
from typing import Callable, Union

import torch.nn as nn
from fvcore.nn.weight_init import c2_xavier_fill

NormSpec = Union[str, Callable[[int], nn.Module]]

__all__ = ["NormSpec", "build_norm", "zero_init_norm", "conv_norm"]


def build_norm(norm: NormSpec, channels: int) -> nn.Module:
    """The normalisation layer named by ``norm`` for ``channels`` channels (``nn.Identity`` for "")."""
    if callable(norm):
        module = norm(channels)
        return nn.Identity() if module is None else module
    if norm in ("", None):
        return nn.Identity()
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        if channels % 32 != 0:
            raise ValueError(f"GN uses 32 groups: channels ({channels}) must be a multiple of 32")
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {norm!r}: use '', 'BN', 'SyncBN', 'GN' or a callable channels -> module")


def zero_init_norm(module: nn.Module) -> None:
    """Set an affine norm's gamma and beta to 0 (the layer then outputs zeros); no-op for parameter-free ones."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter):
            nn.init.zeros_(p)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, bias: bool = True,
              norm: NormSpec = "") -> nn.Sequential:
    """``Norm(Conv(x))`` (submodules ``conv``, ``norm``) with padding ``kernel_size // 2`` and c2_xavier_fill init (zero bias)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    c2_xavier_fill(conv)
    return nn.Sequential(OrderedDict(conv=conv, norm=build_norm(norm, out_channels)))
