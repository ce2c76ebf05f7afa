"""The critic: RoI features (C x S x S) -> one ``dim``-vector per RoI, shared by levels and sets (torch only)."""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from d2_refine.layers.norm import get_norm

__all__ = ["ACTIVATIONS", "InterNetCritic"]

#: output activation per loss: sigmoid after the last ReLU for l1/l2, softmax over channels for kl, none for ot
ACTIVATIONS = {"l1": "sigmoid", "l2": "sigmoid", "kl": "softmax", "ot": "none"}


class InterNetCritic(nn.Module):
    """conv 3x3 s2 + norm + ReLU, conv (S/2)x(S/2) valid + norm + ReLU, conv 1x1 + norm + ReLU, then the
    loss's activation.

    Channel widths follow the original (256 -> 512 -> 1024 -> 1024 for ``dim`` 1024): ``dim // 2`` after the
    first conv, ``dim`` after the others.

    Args:
        in_channels (int): channels of the pooled RoI features.
        pool_size (int): their side S (even; 14 in the original).
        dim (int): output dimension.
        norm (str): see :func:`d2_refine.layers.norm.get_norm`.
        activation (str): "sigmoid" | "softmax" | "none".
    """

    def __init__(self, in_channels: int = 256, pool_size: int = 14, dim: int = 1024, norm: str = "Affine",
                 activation: str = "sigmoid"):
        super().__init__()
        if pool_size < 2 or pool_size % 2:
            raise ValueError(f"MODEL.INTERNET.FEAT_POOL_SIZE must be even and >= 2, got {pool_size}")
        if activation not in ("sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be sigmoid, softmax or none, got {activation!r}")
        self.activation = activation
        self.pool_size = pool_size
        bias = norm in ("", None)
        self.conv1 = nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(dim // 2, dim, pool_size // 2, bias=bias)
        self.conv3 = nn.Conv2d(dim, dim, 1, bias=bias)
        self.norms = nn.ModuleList(get_norm(norm, c) or nn.Identity() for c in (dim // 2, dim, dim))
        if getattr(self.norms[0], "_stats_mode", None) == "":
            # detectron2's naiveSyncBN asserts a non-empty batch, and a rank without a RoI of a set is common
            raise ValueError("MODEL.INTERNET.CRITIC_NORM 'naiveSyncBN' cannot normalise a rank's empty batch of "
                             "RoIs; use 'naiveSyncBN_N' or 'SyncBN'")
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor[R, C, S, S]): pooled RoI features (R may be 0).

        Returns:
            Tensor[R, dim]: activated critic outputs.
        """
        if x.shape[-1] != self.pool_size or x.shape[-2] != self.pool_size:
            raise ValueError(f"critic input must be Tensor[R, C, {self.pool_size}, {self.pool_size}], "
                             f"got {tuple(x.shape)}")
        for conv, norm in zip((self.conv1, self.conv2, self.conv3), self.norms):
            if x.shape[0] == 0:  # keep the graph (and DDP) happy without running norms on empty batches
                x = conv(x)
                if _syncs_across_ranks(norm):  # ... except a collective one: every rank must join its call
                    x = norm(x)
            else:
                x = F.relu(norm(conv(x)))
        x = x.flatten(1)
        if self.activation == "sigmoid":
            return torch.sigmoid(x)
        if self.activation == "softmax":
            return F.softmax(x, dim=1)
        return x


def _syncs_across_ranks(norm: nn.Module) -> bool:
    """Whether ``norm`` gathers its statistics from every rank in this call (torch's SyncBatchNorm, detectron2's
    NaiveSyncBatchNorm, training, several processes); both take an empty batch as a rank contributing nothing."""
    if not (norm.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(norm, nn.SyncBatchNorm) or hasattr(norm, "_stats_mode")
