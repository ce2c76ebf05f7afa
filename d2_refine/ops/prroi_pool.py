"""Precise RoI Pooling (Jiang et al., "Acquisition of Localization Confidence for Accurate Object Detection",
ECCV 2018): each output bin is the exact integral of the bilinearly interpolated feature map over the bin divided
by the bin area, so the output is differentiable w.r.t. the box coordinates too."""
import math
from typing import List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ._library import autocast_enabled, compute_dtype, has_kernel, warn_fallback

__all__ = ["prroi_pool", "PrRoIPool2d", "PrRoIPool2D"]


def _as_roi_tensor(rois: Union[Tensor, List[Tensor], Tuple[Tensor, ...]]) -> Tensor:
    """rois as Tensor[K, 5] (batch index, x1, y1, x2, y2); a list of Tensor[L, 4] per image gets its index column."""
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"rois must be Tensor[K, 5] (batch index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
        return rois
    if not isinstance(rois, (list, tuple)):
        raise TypeError(f"rois must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(rois).__name__}")
    for b in rois:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
            raise ValueError("rois given as a list must hold one Tensor[L, 4] (x1, y1, x2, y2) per image")
    if len(rois) == 0:
        raise ValueError("rois given as a list must hold one Tensor[L, 4] per image, got an empty list")
    index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(rois)], dim=0)
    return torch.cat([index, torch.cat(list(rois), dim=0)], dim=1)


def output_size_pair(output_size, op: str) -> Tuple[int, int]:
    """(PH, PW) from an int or a pair; a ValueError naming ``op`` for any other length."""
    pair = _pair(output_size)
    if len(pair) != 2:
        raise ValueError(f"{op}: output_size must be an int or a pair (PH, PW), got {output_size!r}")
    return pair[0], pair[1]


def prroi_pool(
    input: Tensor,
    rois: Union[Tensor, List[Tensor]],
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    aligned: bool = False,
) -> Tensor:
    """Precise RoI Pooling.

    Args:
        input (Tensor[N, C, H, W]): feature maps, floating point.
        rois (Tensor[K, 5] or List[Tensor[L, 4]]): boxes (x1, y1, x2, y2) in image coordinates, with their batch
            index as first column, or one Tensor[L, 4] per image. Boxes are never clipped: the map ramps to zero one
            cell outside its border.
        output_size (int or Tuple[int, int]): (PH, PW).
        spatial_scale (float): feature-map cells per image pixel (1/stride).
        aligned (bool): subtract half a cell after scaling (cell (i, j) centred at (j + 0.5, i + 0.5) in scaled
            image coordinates). False (default) is the official convention: cell (i, j) at x = j, y = i.

    Returns:
        Tensor[K, C, PH, PW], in the dtype of ``input``: the mean of the interpolated map over each bin; 0 for
        zero-area bins. Differentiable w.r.t. ``input`` and the four box columns of ``rois`` (the index column
        gets a zero gradient). On CUDA the gradient w.r.t. ``input`` is summed with atomics, so
        ``torch.use_deterministic_algorithms(True)`` refuses it (as for torchvision's ``roi_align``); the box
        gradient is deterministic.

    Bad input: zero-area, inverted (x2 < x1) and off-map boxes give zeros (and zero gradients); a box with a NaN or
    infinite coordinate, or one whose coordinates or extent overflow the compute dtype after scaling, raises a
    ValueError naming its row (its integral is undefined); so does an output_size or spatial_scale that is not
    positive (RuntimeError) and a batch index outside [0, N) (RuntimeError). Non-finite *features* propagate, as
    in any op.

    Dtypes: ``input`` and ``rois`` may differ (float16 features with float32 boxes); the op runs in the wider of
    the two (float64 if either is), in float32 instead of float16 / bfloat16 under ``torch.autocast`` (detectron2's
    ``SOLVER.AMP``) and on CPU, and natively in float16 / bfloat16 on CUDA otherwise. Gradients come back in each
    argument's own dtype.
    """
    pooled_height, pooled_width = output_size_pair(output_size, "prroi_pool")
    rois = _as_roi_tensor(rois)
    for name, t in (("input", input), ("rois", rois)):
        if not t.is_floating_point():
            raise TypeError(f"prroi_pool: {name} must be a floating-point tensor, got {t.dtype}")
    autocast = autocast_enabled(input.device)
    if has_kernel("prroi_pool", input.device):
        # under autocast the op's Autocast kernel (csrc/prroi_pool/autocast) would cast to float32 as well
        dtype = compute_dtype(input, rois, native_half=input.device.type == "cuda" and not autocast)
        output = torch.ops.d2_refine.prroi_pool(
            input.to(dtype), rois.to(dtype), float(spatial_scale), pooled_height, pooled_width, bool(aligned)
        )
        return output.to(input.dtype)
    warn_fallback("prroi_pool", input.device)
    dtype = compute_dtype(input, rois)
    args = (input.to(dtype), rois.to(dtype), (pooled_height, pooled_width), spatial_scale, aligned)
    if autocast:  # the reference's matmul would run in the autocast dtype
        with torch.autocast(input.device.type, enabled=False):
            return _prroi_pool_reference(*args).to(input.dtype)
    return _prroi_pool_reference(*args).to(input.dtype)


class PrRoIPool2d(nn.Module):
    """Module form of :func:`prroi_pool`: ``PrRoIPool2d(output_size, spatial_scale, aligned)(input, rois)``."""

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float, aligned: bool = False):
        super().__init__()
        self.output_size = output_size_pair(output_size, "PrRoIPool2d")
        self.spatial_scale = float(spatial_scale)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return prroi_pool(input, rois, self.output_size, self.spatial_scale, self.aligned)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, aligned={self.aligned}"


class PrRoIPool2D(nn.Module):
    """Precise RoI Pooling with the interface of the official implementation (vacancy/PreciseRoIPooling,
    ``pytorch/prroi_pool/prroi_pool.py``), for code written against it, without detectron2:
    ``PrRoIPool2D(pooled_height, pooled_width, spatial_scale)(features, rois)``.

    Same semantics as the original: rois (Tensor[K, 5]) = (batch index, x0, y0, x1, y1) in image coordinates,
    scaled by ``spatial_scale`` with no half-pixel shift (feature cell (i, j) at x = j, y = i: ``aligned=False``
    of :func:`prroi_pool`); bins of max(x1 - x0, 0) / pooled_width (height alike); 0 for zero-area bins;
    differentiable w.r.t. features and box coordinates. Differences: it also runs on CPU and in float64 (and under
    autocast), and a batch index that is not an integer in [0, N) raises instead of being truncated.
    """

    def __init__(self, pooled_height: int, pooled_width: int, spatial_scale: float):
        super().__init__()
        self.pooled_height = int(pooled_height)
        self.pooled_width = int(pooled_width)
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        """features (Tensor[N, C, H, W]), rois (Tensor[K, 5]) -> Tensor[K, C, pooled_height, pooled_width]."""
        return prroi_pool(features, rois, (self.pooled_height, self.pooled_width), self.spatial_scale, aligned=False)

    def extra_repr(self) -> str:
        return f"kernel_size=({self.pooled_height}, {self.pooled_width}), spatial_scale={self.spatial_scale}"


def _check_finite_boxes(rois: Tensor, corners: Tensor, spatial_scale: float) -> None:
    """ValueError naming the first box whose corners after scaling (``corners``, Tensor[K, 4]) or whose width and
    height are not finite: they would make the bin integrals NaN. The compiled kernels check the same
    (csrc/prroi_pool/prroi_pool_checks.cpp)."""
    extents = corners[:, 2:] - corners[:, :2]
    bad = ~(torch.isfinite(corners).all(1) & torch.isfinite(extents).all(1))
    if rois.size(0) > 0 and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        values = ", ".join(f"{v:g}" for v in rois[row].tolist())
        raise ValueError(
            f"prroi_pool: box coordinates must be finite, also after scaling by spatial_scale = {spatial_scale:g} "
            f"and as widths and heights in {corners.dtype}; got rois row {row} = ({values})"
        )


def _cell_terms(start: Tensor, bin_size: Tensor, bins: int, size: int) -> Tuple[Tensor, Tensor]:
    """The exact per-cell integrals along one axis, Tensor[K, bins, size + 1] each, for the cells [j, j + 1] with
    j = -1 .. size - 1: P = integral of (1 - a) and Q = integral of a over the cell's local limits [a0, a1]."""
    b = torch.arange(bins, dtype=start.dtype, device=start.device)
    lo = start[:, None] + b * bin_size[:, None]  # [K, bins]
    hi = lo + bin_size[:, None]
    cells = torch.arange(-1, size, dtype=start.dtype, device=start.device)
    a0 = (lo[..., None] - cells).clamp(0, 1)
    a1 = (hi[..., None] - cells).clamp(0, 1)
    p = (a1 - a1 * a1 / 2) - (a0 - a0 * a0 / 2)
    q = (a1 * a1 - a0 * a0) / 2
    return p, q


def _node_weights(start: Tensor, bin_size: Tensor, bins: int, size: int) -> Tensor:
    """Weight of each node (feature row or column) 0 .. size - 1 in the integral along one axis,
    Tensor[K, bins, size]: node j collects P of cell j and Q of cell j - 1 (nodes -1 and size hold zeros)."""
    p, q = _cell_terms(start, bin_size, bins, size)
    return p[..., 1:] + q[..., :-1]


def _prroi_pool_reference(
    input: Tensor,
    rois: Union[Tensor, List[Tensor]],
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    aligned: bool = False,
) -> Tensor:
    """Pure-PyTorch Precise RoI Pooling: the exact cell-integral formula, vectorised over RoIs (one dense
    contraction per image), differentiable by autograd w.r.t. input and rois. Same arguments as :func:`prroi_pool`.
    Memory grows as K * C * H * PW: it is the test oracle and the fallback, not a fast path."""
    pooled_height, pooled_width = output_size_pair(output_size, "prroi_pool")
    rois = _as_roi_tensor(rois)
    if input.dim() != 4:
        raise ValueError(f"prroi_pool: input must be Tensor[N, C, H, W], got shape {tuple(input.shape)}")
    if pooled_height <= 0 or pooled_width <= 0:
        raise RuntimeError(f"prroi_pool: output_size must be positive, got ({pooled_height}, {pooled_width})")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise RuntimeError(f"prroi_pool: spatial_scale must be positive and finite, got {spatial_scale}")
    num_images, channels, height, width = input.shape
    num_rois = rois.size(0)
    batch = rois[:, 0].detach()
    if num_rois > 0:
        bad = (batch < 0) | (batch >= num_images) | (batch != batch.floor())
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise RuntimeError(
                f"prroi_pool: rois[:, 0] (batch index) must be an integer in [0, N) with N = {num_images} images "
                f"in input; got {float(batch[row])!r} in row {row}"
            )
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    _check_finite_boxes(rois, torch.stack([x1, y1, x2, y2], 1).detach(), spatial_scale)
    bin_w = (x2 - x1).clamp(min=0) / pooled_width
    bin_h = (y2 - y1).clamp(min=0) / pooled_height
    area = bin_w * bin_h  # [K]
    wx = _node_weights(x1, bin_w, pooled_width, width)  # [K, PW, W]
    wy = _node_weights(y1, bin_h, pooled_height, height)  # [K, PH, H]

    output = input.new_zeros((num_rois, channels, pooled_height, pooled_width))
    batch = batch.long()
    for n in batch.unique().tolist():  # one contraction per image (not per RoI)
        sel = (batch == n).nonzero()[:, 0]
        k = sel.numel()
        # integral along x for every feature row: [C * H, W] @ [W, k * PW]
        along_x = input[n].reshape(channels * height, width) @ wx[sel].reshape(k * pooled_width, width).t()
        along_x = along_x.reshape(channels, height, k, pooled_width)
        integral = torch.einsum("kph,chkq->kcpq", wy[sel], along_x)
        output = output.index_copy(0, sel, integral)
    safe_area = torch.where(area > 0, area, torch.ones_like(area))[:, None, None, None]
    return torch.where(area[:, None, None, None] > 0, output / safe_area, torch.zeros_like(output))
