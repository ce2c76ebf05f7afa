"""MBRM, the mask-based boundary refinement of RDSNet (inference only; torch-only, no detectron2).

Each detected box edge is re-estimated from the detection's own soft mask: the mask is reduced to a
horizontal and a vertical profile (max over the other axis), a fixed 9-tap 1-D filter turns each profile into
edge evidence, and a Gaussian prior around the detector's edge turns the evidence into a distribution over
integer pixel indices whose argmax (or expectation) is the refined edge.

Coordinates: boxes are detectron2 boxes ``(x1, y1, x2, y2)`` in pixels with width ``x2 - x1``; the right and
bottom edges are handled as inclusive pixel indices ``x2 - 1`` / ``y2 - 1`` (the original works on inclusive
boxes), and the refined right/bottom indices are returned ``+ 1``, so a refined box is again a detectron2 box.
Everything is vectorised over all detections: one ``conv1d`` per edge for the whole batch.
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MBRM",
    "MBRM_DEFAULT_KERNEL",
    "MBRM_DEFAULT_BIAS",
    "mask_profiles",
    "edge_evidence",
    "edge_prior",
    "edge_distributions",
    "mbrm_refine_boxes",
]

#: The published edge filter (applied as a cross-correlation, i.e. conv1d semantics) and its bias.
MBRM_DEFAULT_KERNEL = (-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917)
MBRM_DEFAULT_BIAS = -1.9536


def mask_profiles(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """Horizontal and vertical profiles of soft masks.

    Args:
        masks (Tensor[N, H, W]): foreground probabilities.

    Returns:
        horizontal (Tensor[N, W]): max over rows, vertical (Tensor[N, H]): max over columns.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be Tensor[N, H, W], got shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros(0, w), masks.new_zeros(0, h)
    return masks.amax(dim=1), masks.amax(dim=2)


def edge_evidence(profiles: Tensor, kernel: Tensor, bias: Tensor, reverse: bool = False) -> Tensor:
    """Sigmoid edge evidence along each profile.

    ``e[i] = sigmoid(b + sum_k w[k] * p[i + k - K // 2])`` with ``p = 0`` outside ``[0, L)`` (zero padding), i.e.
    conv1d semantics, same length as the input. ``reverse=True`` uses the reversed kernel (right/bottom edges).

    Args:
        profiles (Tensor[N, L]), kernel (Tensor[K]) with K odd, bias (Tensor[] or Tensor[1]).

    Returns:
        Tensor[N, L]
    """
    k = kernel.numel()
    if k % 2 != 1:
        raise ValueError(f"kernel must have an odd number of taps, got {k}")
    weight = kernel.to(profiles.dtype).flip(0) if reverse else kernel.to(profiles.dtype)
    out = F.conv1d(profiles.unsqueeze(1), weight.view(1, 1, k), bias.to(profiles.dtype).reshape(1),
                   padding=k // 2)
    return torch.sigmoid(out.squeeze(1))


def edge_prior(centers: Tensor, sigmas: Tensor, length: int, cutoff: float) -> Tensor:
    """Truncated Gaussian prior over the integer pixel indices ``0 .. length - 1``.

    Args:
        centers (Tensor[N]): current edge positions (pixel indices, may be fractional or outside the image).
        sigmas (Tensor[N]): standard deviations (> 0).
        length (int): number of pixels along the axis.
        cutoff (float): weights ``<= cutoff`` are set to 0.

    Returns:
        Tensor[N, length]
    """
    idx = torch.arange(length, device=centers.device, dtype=centers.dtype)
    prior = torch.exp(-(idx[None, :] - centers[:, None]) ** 2 / (2 * sigmas[:, None] ** 2))
    return torch.where(prior > cutoff, prior, torch.zeros_like(prior))


def edge_distributions(
    horizontal: Tensor,
    vertical: Tensor,
    boxes: Tensor,
    kernel: Tensor,
    bias: Tensor,
    gamma: float = 0.05,
    cutoff: float = 0.0044,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalised distributions of the four edges, from the profiles and the detector's boxes.

    Args:
        horizontal (Tensor[N, W]), vertical (Tensor[N, H]): mask profiles (see :func:`mask_profiles`).
        boxes (Tensor[N, 4]): detectron2 boxes ``(x1, y1, x2, y2)`` in the pixels of the profiles.

    Returns:
        left (Tensor[N, W]), top (Tensor[N, H]), right (Tensor[N, W]), bottom (Tensor[N, H]): each row sums
        to 1 (or is all 0 where evidence x prior has no mass), and valid (Tensor[N, 4], bool): rows with mass.
        The right/bottom distributions are over the inclusive last pixel (add 1 for a detectron2 box).
    """
    dtype = horizontal.dtype if horizontal.is_floating_point() else torch.float32
    horizontal, vertical, boxes = horizontal.to(dtype), vertical.to(dtype), boxes.to(dtype)
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    # sigma = max(1, gamma * side), with the original's inclusive side x2_incl - x1 = (x2 - 1) - x1
    sigma_x = ((x2 - 1 - x1) * gamma).clamp(min=1.0)
    sigma_y = ((y2 - 1 - y1) * gamma).clamp(min=1.0)
    w, h = horizontal.shape[1], vertical.shape[1]
    dists = []
    for profile, centers, sigmas, length, reverse in (
        (horizontal, x1, sigma_x, w, False),
        (vertical, y1, sigma_y, h, False),
        (horizontal, x2 - 1, sigma_x, w, True),
        (vertical, y2 - 1, sigma_y, h, True),
    ):
        score = edge_evidence(profile, kernel, bias, reverse=reverse) * edge_prior(centers, sigmas, length, cutoff)
        dists.append(score)
    sums = torch.stack([d.sum(dim=1) for d in dists], dim=1)  # N x 4
    valid = sums > 0
    dists = [d / s.clamp(min=torch.finfo(dtype).tiny)[:, None] for d, s in zip(dists, sums.unbind(dim=1))]
    return dists[0], dists[1], dists[2], dists[3], valid


def _decode(dist: Tensor, decode: str) -> Tensor:
    if decode == "argmax":
        return dist.argmax(dim=1).to(dist.dtype)
    idx = torch.arange(dist.shape[1], device=dist.device, dtype=dist.dtype)
    return (dist * idx[None, :]).sum(dim=1)


def mbrm_refine_boxes(
    masks: Tensor = None,
    boxes: Tensor = None,
    kernel: Sequence[float] = MBRM_DEFAULT_KERNEL,
    bias: float = MBRM_DEFAULT_BIAS,
    gamma: float = 0.05,
    cutoff: float = 0.0044,
    decode: str = "argmax",
    profiles: Tuple[Tensor, Tensor] = None,
) -> Tensor:
    """Refine boxes with their soft masks (functional MBRM).

    Args:
        masks (Tensor[N, H, W]): soft, already cropped foreground masks at the boxes' resolution. Either this or
            ``profiles``.
        boxes (Tensor[N, 4]): detectron2 boxes (x1, y1, x2, y2), absolute pixels of the masks.
        kernel (sequence or Tensor[K]), bias (float or Tensor): the edge filter.
        gamma (float): prior sigma = max(1, gamma * box side).
        cutoff (float): prior weights <= cutoff are 0.
        decode (str): "argmax" (integer pixel edges, the published rule) or "expectation".
        profiles (tuple(Tensor[N, W], Tensor[N, H])): precomputed :func:`mask_profiles`, to avoid holding all
            masks at once.

    Returns:
        Tensor[N, 4]: refined detectron2 boxes; an edge whose distribution has no mass keeps the input edge.
    """
    if decode not in ("argmax", "expectation"):
        raise ValueError(f"decode must be 'argmax' or 'expectation', got {decode!r}")
    if boxes is None or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[N, 4], got {None if boxes is None else tuple(boxes.shape)}")
    if profiles is None:
        if masks is None:
            raise ValueError("give masks (Tensor[N, H, W]) or profiles")
        profiles = mask_profiles(masks)
    horizontal, vertical = profiles
    if horizontal.shape[0] != boxes.shape[0] or vertical.shape[0] != boxes.shape[0]:
        raise ValueError(f"got {horizontal.shape[0]} masks for {boxes.shape[0]} boxes")
    if boxes.shape[0] == 0:
        return boxes.clone()
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    kernel = torch.as_tensor(kernel, dtype=dtype, device=boxes.device).flatten()
    bias = torch.as_tensor(bias, dtype=dtype, device=boxes.device).flatten()[:1]
    left, top, right, bottom, valid = edge_distributions(horizontal, vertical, boxes, kernel, bias, gamma, cutoff)
    refined = torch.stack(
        [_decode(left, decode), _decode(top, decode), _decode(right, decode) + 1, _decode(bottom, decode) + 1],
        dim=1,
    ).to(boxes.dtype)
    return torch.where(valid, refined, boxes)


class MBRM(nn.Module):
    """Mask-based boundary refinement as a module (no trainable state by default).

    The kernel and bias are non-persistent buffers, so they come from the config, never from a checkpoint.
    """

    def __init__(
        self,
        kernel: Sequence[float] = MBRM_DEFAULT_KERNEL,
        bias: float = MBRM_DEFAULT_BIAS,
        gamma: float = 0.05,
        cutoff: float = 0.0044,
        decode: str = "argmax",
    ):
        super().__init__()
        kernel = torch.as_tensor(kernel, dtype=torch.float32).flatten()
        if kernel.numel() % 2 != 1:
            raise ValueError(f"MBRM kernel must have an odd number of taps, got {kernel.numel()}")
        if decode not in ("argmax", "expectation"):
            raise ValueError(f"MBRM decode must be 'argmax' or 'expectation', got {decode!r}")
        if gamma <= 0:
            raise ValueError(f"MBRM gamma must be > 0, got {gamma}")
        self.register_buffer("kernel", kernel, persistent=False)
        self.register_buffer("bias", torch.tensor([float(bias)]), persistent=False)
        self.gamma = float(gamma)
        self.cutoff = float(cutoff)
        self.decode = decode

    def forward(self, masks: Tensor = None, boxes: Tensor = None, profiles: Tuple[Tensor, Tensor] = None) -> Tensor:
        """masks (Tensor[N, H, W]) or profiles, boxes (Tensor[N, 4]) -> refined boxes (Tensor[N, 4])."""
        return mbrm_refine_boxes(masks, boxes, self.kernel, self.bias, self.gamma, self.cutoff, self.decode,
                                 profiles=profiles)

    def extra_repr(self) -> str:
        return f"taps={self.kernel.numel()}, gamma={self.gamma}, cutoff={self.cutoff}, decode={self.decode!r}"
