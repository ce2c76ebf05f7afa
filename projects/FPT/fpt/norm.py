"""Conv + norm helpers of the FPT modules (torch-only).

A ``norm`` argument is what :func:`d2_refine.layers.norm.get_norm` takes (detectron2's ``get_norm``): a name
("" = none, "GN", "BN", "SyncBN", ...) or a callable ``channels -> nn.Module``.
"""
from collections import OrderedDict

import torch.nn as nn
from fvcore.nn.weight_init import c2_xavier_fill

from d2_refine.layers.norm import NormSpec, get_norm

__all__ = ["NormSpec", "zero_init_norm", "conv_norm"]


def zero_init_norm(module: nn.Module) -> None:
    """Set an affine norm's gamma and beta to 0 (the layer then outputs zeros); no-op for parameter-free ones."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter):
            nn.init.zeros_(p)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, bias: bool = True,
              norm: NormSpec = "") -> nn.Sequential:
    """``Norm(Conv(x))`` (submodules ``conv``, ``norm``) with padding ``kernel_size // 2`` and c2_xavier_fill init
    (zero bias)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    c2_xavier_fill(conv)
    return nn.Sequential(OrderedDict(conv=conv, norm=get_norm(norm, out_channels) or nn.Identity()))
