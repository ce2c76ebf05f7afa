"""The make-up layer: a conv (or transposed conv) + norm + ReLU applied to every FPN map (torch only)."""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from d2_refine.layers.norm import get_norm

__all__ = ["MakeupLayer"]


class MakeupLayer(nn.Module):
    """Transforms a pyramid level before RoI pooling, in training and inference.

    ``upsample_factor`` 1: ``num_conv`` blocks of conv 3x3 stride 1 + norm + ReLU (released setting).
    ``upsample_factor`` 2: the first block is a transposed conv k3 s2 pad 1 output-pad 1 (doubles H and W).
    ``num_levels`` > 1 (MULTI): the convs are shared and each level has its own norms.

    Args:
        channels (int): input and output channels (the FPN width).
        num_conv (int): number of conv + norm + ReLU blocks.
        upsample_factor (int): 1 or 2.
        norm (str): see :func:`d2_refine.layers.norm.get_norm`.
        num_levels (int): 1, or the number of pyramid levels for per-level norms.
    """

    def __init__(self, channels: int, num_conv: int = 1, upsample_factor: int = 1, norm: str = "Affine",
                 num_levels: int = 1):
        super().__init__()
        if upsample_factor not in (1, 2):
            raise ValueError(f"MODEL.INTERNET.MAKEUP.UPSAMPLE_FACTOR must be 1 or 2, got {upsample_factor}")
        if num_conv < 1 or num_levels < 1:
            raise ValueError(f"num_conv and num_levels must be >= 1, got {num_conv}, {num_levels}")
        self.upsample_factor = upsample_factor
        self.num_levels = num_levels
        bias = norm in ("", None)
        convs = []
        for i in range(num_conv):
            if i == 0 and upsample_factor == 2:
                conv = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=bias)
            else:
                conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=bias)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        # norms[level][block]; None entries when norm == ""
        self.norms = nn.ModuleList(
            nn.ModuleList(get_norm(norm, channels) or nn.Identity() for _ in range(num_conv))
            for _ in range(num_levels)
        )

    def forward(self, x: torch.Tensor, level: Optional[int] = 0) -> torch.Tensor:
        """
        Args:
            x (Tensor[N, C, H, W]): one pyramid level.
            level (int): its index (selects the norms when ``num_levels`` > 1).

        Returns:
            Tensor[N, C, H * f, W * f] with f the upsample factor.
        """
        norms = self.norms[level if self.num_levels > 1 else 0]
        for conv, norm in zip(self.convs, norms):
            x = F.relu(norm(conv(x)))
        return x
