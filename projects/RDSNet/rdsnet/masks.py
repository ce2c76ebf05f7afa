"""Correlation masks, the crop rule, mask targets and inference-time mask decoding (torch-only).

RDSNet's instance masks are the correlation of per-pixel representations U (d channels) with each object's
pair of representations (background, foreground): ``logits[n, c] = U . r[n, c]``, then a 2-way softmax.

Boxes given to these functions are detectron2 boxes ``(x1, y1, x2, y2)`` (width ``x2 - x1``); the crop rule
is the original's, written for inclusive pixel boxes, so they are converted with :func:`to_inclusive` first.
"""
import math
from typing import Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "to_inclusive",
    "crop_bounds",
    "crop_region",
    "correlate",
    "downsample_mask_targets",
    "decode_soft_masks",
]


def to_inclusive(boxes: Tensor) -> Tensor:
    """detectron2 boxes (x2, y2 exclusive) -> inclusive pixel boxes (x2 - 1, y2 - 1). Tensor[N, 4]."""
    return boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def crop_bounds(boxes: Tensor, height: int, width: int, padding: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer crop window of each *inclusive* box in a ``height x width`` pixel grid.

    Per side ``pad = max(1, padding * (x2 - x1 + 1))``; ``x1' = max(0, x1 - pad)``, ``x2' = min(W, x2 + pad)``,
    both truncated to integers; the window is ``x1' <= x < x2'`` (same for y).

    Args:
        boxes (Tensor[N, 4]): inclusive boxes in the grid's pixels.

    Returns:
        x1, x2, y1, y2 (Tensor[N] each, int64).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[N, 4], got shape {tuple(boxes.shape)}")
    boxes = boxes.float()

    def side(lo, hi, size):
        pad = (padding * (hi - lo + 1)).clamp(min=1.0)
        return (lo - pad).clamp(min=0).long(), (hi + pad).clamp(max=size).long()

    x1, x2 = side(boxes[:, 0], boxes[:, 2], width)
    y1, y2 = side(boxes[:, 1], boxes[:, 3], height)
    return x1, x2, y1, y2


def crop_region(boxes: Tensor, height: int, width: int, padding: float) -> Tensor:
    """Boolean in-crop map of each inclusive box (see :func:`crop_bounds`). Returns Tensor[N, height, width]."""
    x1, x2, y1, y2 = crop_bounds(boxes, height, width, padding)
    xs = torch.arange(width, device=boxes.device)
    ys = torch.arange(height, device=boxes.device)
    in_x = (xs[None, :] >= x1[:, None]) & (xs[None, :] < x2[:, None])  # N x W
    in_y = (ys[None, :] >= y1[:, None]) & (ys[None, :] < y2[:, None])  # N x H
    return in_y[:, :, None] & in_x[:, None, :]


def correlate(pixel_reps: Tensor, obj_reps: Tensor) -> Tensor:
    """Mask logits of all objects of one image with one matrix product.

    Args:
        pixel_reps (Tensor[d, H, W]): per-pixel representations U.
        obj_reps (Tensor[N, 2 * d]): per object ``[r_bg, r_fg]`` (background channels first).

    Returns:
        Tensor[N, 2, H, W]: logits, channel 1 = foreground (no bias, no scaling).
    """
    d, h, w = pixel_reps.shape
    if obj_reps.dim() != 2 or obj_reps.shape[1] != 2 * d:
        raise ValueError(f"obj_reps must be Tensor[N, {2 * d}] for {d}-channel pixel_reps, got {tuple(obj_reps.shape)}")
    n = obj_reps.shape[0]
    logits = obj_reps.reshape(n * 2, d) @ pixel_reps.reshape(d, h * w)
    return logits.view(n, 2, h, w)


def downsample_mask_targets(masks: Tensor, stride: int, chunk: int = 16) -> Tensor:
    """Binary ground-truth masks at ``1 / stride`` resolution: bilinear resize, then ``> 0.5``.

    Args:
        masks (Tensor[G, H, W]): binary masks at the (padded, stride-divisible) input size.
        chunk (int): masks resized at once (each one is a float32 copy at full size: 4 MiB at 800 x 1344).

    Returns:
        Tensor[G, ceil(H / stride), ceil(W / stride)], float in {0, 1}.
    """
    g, h, w = masks.shape
    size = (math.ceil(h / stride), math.ceil(w / stride))
    out = masks.new_zeros((g,) + size, dtype=torch.float32)
    step = max(int(chunk), 1)
    for i in range(0, g, step):
        part = masks[i:i + step, None].float()
        out[i:i + step] = F.interpolate(part, size=size, mode="bilinear", align_corners=False)[:, 0] > 0.5
    return out


def decode_soft_masks(
    logits: Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    boxes: Tensor,
    padding: float,
) -> Tensor:
    """Soft foreground masks at the output resolution from correlation logits (inference).

    Up-sample the logits (bilinear, align_corners=False) to the padded input size, cut to the resized image,
    resize (bilinear, align_corners=True) to the output size, softmax over the 2 channels, keep the foreground,
    and zero it outside the crop of each box. Order matters: up-sample logits, then softmax, then crop.

    Args:
        logits (Tensor[N, 2, h, w]): at the pixel stride, already cut to the image's padded extent.
        padded_size (tuple(int, int)): the image's stride-padded input size (h * stride, w * stride).
        image_size (tuple(int, int)): the resized image's size fed to the network (<= padded_size).
        output_size (tuple(int, int)): the original image's size (the output resolution).
        boxes (Tensor[N, 4]): detectron2 boxes at the output resolution.
        padding (float): crop padding (fraction of the box side).

    Returns:
        Tensor[N, H_out, W_out]: foreground probabilities in [0, 1].
    """
    n = logits.shape[0]
    if n == 0:
        return logits.new_zeros((0,) + tuple(output_size))
    x = F.interpolate(logits, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    if tuple(image_size) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=True)
    probs = x.softmax(dim=1)[:, 1]
    keep = crop_region(to_inclusive(boxes), output_size[0], output_size[1], padding)
    return probs * keep.to(probs.dtype)
