"""Norm layers of the make-up layer and the critic (torch only; detectron2's ``get_norm`` for other names).

The original's BN layers always ran in eval mode with statistics that never left 0/1 (a condition bug), i.e.
each was a trainable per-channel scale and shift: that is ``"Affine"`` here, the faithful default. ``"BN"``
uses batch statistics and falls back to its running statistics when a batch has one value per channel (a
single RoI after the critic's 7x7 conv), where train-mode BN would fail.
"""
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AffineChannel2d", "GuardedBatchNorm2d", "build_norm"]


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


def build_norm(norm: str, num_channels: int):
    """Norm module by name: "" (None), "Affine", "BN" (guarded), or any name detectron2's ``get_norm`` knows."""
    if norm in ("", None):
        return None
    if norm == "Affine":
        return AffineChannel2d(num_channels)
    if norm == "BN":
        return GuardedBatchNorm2d(num_channels)
    from d2_refine.utils.env import require_detectron2

    require_detectron2(f"norm {norm!r}")
    from detectron2.layers import get_norm

    return get_norm(norm, num_channels)
