"""The IFR refinement block f(z, x) ("injection + double residual"); torch only.

    a = z + x;  h = ReLU(GN(conv1(a)));  h = GN(conv2(h));  f = GN(ReLU(h + a))

conv1/conv2: 3x3, C->C, padding 1, no bias (PyTorch default init); three separate affine GroupNorms.
The implicit model puts torch's weight normalisation (``parametrizations.weight_norm``, per output channel,
g initialised to ||V|| so W starts at the plain init) on both convs. At test time (eval mode) on one CPU thread the
convs of 4 or more RoIs run on NNPACK, tiled into one image (``d2_refine.layers.nnpack_conv``: Winograd, within
about 1e-4 of float64 at unit scale).
"""
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from d2_refine.layers.nnpack_conv import conv2d_inference

__all__ = ["IFRBlock", "explicit_unroll"]


class IFRBlock(nn.Module):
    """f(z, x) of IFR.

    Args:
        channels (int): C of z and x.
        num_groups (int): groups of the three GroupNorms.
        weight_norm (bool): weight-normalise conv1 and conv2.
    """

    def __init__(self, channels: int, num_groups: int = 4, weight_norm: bool = True):
        super().__init__()
        if channels % num_groups != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_groups ({num_groups})")
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(num_groups, channels, eps=1e-5)
        self.norm2 = nn.GroupNorm(num_groups, channels, eps=1e-5)
        self.norm3 = nn.GroupNorm(num_groups, channels, eps=1e-5)
        if weight_norm:
            _weight_norm(self.conv1, dim=0)
            _weight_norm(self.conv2, dim=0)
        self.weight_norm = weight_norm

    def _conv(self, conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        # at test time on one CPU thread the RoIs convolve on NNPACK (d2_refine/layers/nnpack_conv.py: tiled into one
        # image, about half oneDNN's time); training keeps PyTorch's default backend
        return conv(t) if self.training else conv2d_inference(conv, t)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z (Tensor[N, C, H, W]): current state.
            x (Tensor[N, C, H, W]): injected RoI feature.
        Returns:
            Tensor[N, C, H, W]
        """
        # no graph to keep (the solver's evaluations, inference): in place, the same values with two temporaries fewer
        inplace = not torch.is_grad_enabled()
        relu = torch.relu_ if inplace else torch.relu
        a = z + x
        h = relu(self.norm1(self._conv(self.conv1, a)))
        h = self.norm2(self._conv(self.conv2, h))
        return self.norm3(relu(h.add_(a) if inplace else h + a))


def explicit_unroll(block: nn.Module, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """z_0 = 0, z_{k+1} = block(z_k, x); returns z_K (with autograd if grad is enabled)."""
    z = torch.zeros_like(x)
    for _ in range(num_steps):
        z = block(z, x)
    return z
