"""Rendering transformer (RT): bottom-up, a coarser level (query) rendered with a finer one (key = value)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import NormSpec, conv_norm

__all__ = ["RenderingTransformer", "RT_ORDERS"]

#: "conv_then_weight" (release): Norm(Conv3x3(coarse)) * w; "weight_then_conv" (paper): Norm(Conv3x3(coarse * w)).
RT_ORDERS = ("conv_then_weight", "weight_then_conv")


class RenderingTransformer(nn.Module):
    """``RT(coarse <- fine) = ReLU(V_dow + Q_att)`` at the coarse resolution; no attention matrix.

    - ``w = ReLU(Conv1x1(GAP(fine)) + b)``, a channel attention (N, C, 1, 1), with no norm: a GroupNorm of this
      1x1 vector would fix each group's mean (0) and energy (its size) whatever the content, so that about half
      of each group's weights are 0 after the ReLU and the rest have a fixed total size (the release's BN
      normalises over the batch instead, and fails with one image per GPU);
    - ``Q_att = Norm(Conv3x3(coarse)) * w`` (``order`` selects the paper's weight-then-conv instead);
    - ``V_dow`` = ``level_gap`` stride-2 3x3 convs on ``fine``, each followed by Norm, ReLU between them;
      resized (nearest) to the coarse size when they differ (unpadded odd inputs).
    The other convs have no bias.

    Args:
        channels (int): C.
        level_gap (int): d >= 1, log2 of the stride ratio of the two levels.
        order (str): one of :data:`RT_ORDERS`.
        norm (str or callable): norm after every conv but the channel attention's.
    """

    def __init__(self, channels: int, *, level_gap: int = 1, order: str = "conv_then_weight",
                 norm: NormSpec = "GN"):
        super().__init__()
        if level_gap < 1:
            raise ValueError(f"RT: level_gap must be >= 1, got {level_gap}")
        if order not in RT_ORDERS:
            raise ValueError(f"MODEL.FPT.RENDERING.ORDER must be one of {RT_ORDERS}, got {order!r}")
        self.level_gap = int(level_gap)
        self.order = order
        self.weight = conv_norm(channels, channels, 1, bias=True, norm="")
        self.query = conv_norm(channels, channels, 3, bias=False, norm=norm)
        layers = []
        for i in range(self.level_gap):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            layers.append(conv_norm(channels, channels, 3, stride=2, bias=False, norm=norm))
        self.downsample = nn.Sequential(*layers)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """coarse (Tensor[N, C, Hc, Wc]), fine (Tensor[N, C, Hf, Wf]) -> Tensor[N, C, Hc, Wc]."""
        w = F.relu(self.weight(F.adaptive_avg_pool2d(fine, 1)))
        if self.order == "conv_then_weight":
            q = self.query(coarse) * w
        else:
            q = self.query(coarse * w)
        v = self.downsample(fine)
        if v.shape[-2:] != coarse.shape[-2:]:
            v = F.interpolate(v, size=coarse.shape[-2:], mode="nearest")
        return F.relu(v + q)

    def extra_repr(self) -> str:
        return f"level_gap={self.level_gap}, order={self.order!r}"
