"""IoU-balanced jittered RoIs for training the IoU head (IoU-Net paper, Jiang et al., ECCV 2018: trained on
augmented ground-truth boxes, not on RPN proposals). Torch only.

A fixed pool of box deltas is built once, deterministically; the IoU of a jittered box with its source box
does not depend on the box, so each delta falls in one IoU bin once and for all. Per image, an equal number of
deltas is drawn from every bin and applied to every ground-truth box, which gives training RoIs whose IoU
histogram is (close to) uniform over [FG_IOU, 1], unlike RPN proposals.
"""
import logging
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["IoUBalancedJitter", "make_delta_pool", "apply_deltas", "delta_ious", "pairwise_iou"]

logger = logging.getLogger(__name__)


def make_delta_pool(xy_steps: int = 16, wh_steps: int = 16, min_scale: float = 3 ** -0.5,
                    max_scale: float = 3 ** 0.5) -> torch.Tensor:
    """All deltas of the quadratic grids.

    Centre offsets dx, dy in ``±(k / (xy_steps - 1))**2`` for k = 0..xy_steps-1 (2 * xy_steps - 1 values);
    scales sw, sh in ``a + (b - a) * (k / (wh_steps - 1))**2`` (wh_steps values).

    Returns:
        Tensor[M, 4] (float64): rows (dx, dy, sw, sh), M = (2 * xy_steps - 1)**2 * wh_steps**2.
    """
    if xy_steps < 2 or wh_steps < 2:
        raise ValueError(f"xy_steps and wh_steps must be >= 2, got {xy_steps}, {wh_steps}")
    k = torch.arange(xy_steps, dtype=torch.float64) / (xy_steps - 1)
    off = k ** 2
    dxy = torch.cat([-off.flip(0)[:-1], off])
    t = torch.arange(wh_steps, dtype=torch.float64) / (wh_steps - 1)
    s = min_scale + (max_scale - min_scale) * t ** 2
    grid = torch.meshgrid(dxy, dxy, s, s, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


def delta_ious(deltas: torch.Tensor) -> torch.Tensor:
    """IoU between the unit square centred at 0 and its jittered version, per delta.

    Args:
        deltas (Tensor[M, 4]): (dx, dy, sw, sh).
    Returns:
        Tensor[M]
    """
    dx, dy, sw, sh = deltas.unbind(1)
    iw = (torch.clamp(dx + sw / 2, max=0.5) - torch.clamp(dx - sw / 2, min=-0.5)).clamp(min=0)
    ih = (torch.clamp(dy + sh / 2, max=0.5) - torch.clamp(dy - sh / 2, min=-0.5)).clamp(min=0)
    inter = iw * ih
    return inter / (1.0 + sw * sh - inter)


def apply_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Every delta applied to every box.

    Args:
        boxes (Tensor[G, 4]): (x0, y0, x1, y1).
        deltas (Tensor[D, 4]): (dx, dy, sw, sh): centre (cx + w dx, cy + h dy), size (w sw, h sh).
    Returns:
        Tensor[G, D, 4]
    """
    deltas = deltas.to(boxes)
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    cx = (boxes[:, 0] + boxes[:, 2])[:, None] / 2 + w * deltas[None, :, 0]
    cy = (boxes[:, 1] + boxes[:, 3])[:, None] / 2 + h * deltas[None, :, 1]
    nw = w * deltas[None, :, 2] / 2
    nh = h * deltas[None, :, 3] / 2
    return torch.stack([cx - nw, cy - nh, cx + nw, cy + nh], dim=2)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of boxes a (Tensor[N, 4]) and b (Tensor[M, 4]) -> Tensor[N, M]; 0 where the union is 0."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


class IoUBalancedJitter(nn.Module):
    """Draws IoU-balanced jittered RoIs around ground-truth boxes.

    Args:
        num_rois (int): at most this many RoIs per image (``MODEL.IOU_NET.NUM_ROIS``).
        fg_iou (float): lowest IoU of a kept RoI; bins of width 0.1 cover [fg_iou, 1].
        bin_pool (int): at most this many deltas kept per bin of the pool.
        xy_steps, wh_steps (int): grid steps of :func:`make_delta_pool`.
        seed (int): seed of the pool sub-sampling (the pool is the same in every process).
    """

    def __init__(self, num_rois: int = 1000, fg_iou: float = 0.5, bin_pool: int = 4000, xy_steps: int = 16,
                 wh_steps: int = 16, seed: int = 0):
        super().__init__()
        if not 0.0 < fg_iou < 1.0:
            raise ValueError(f"fg_iou must be in (0, 1), got {fg_iou}")
        if num_rois < 1 or bin_pool < 1:
            raise ValueError(f"num_rois and bin_pool must be positive, got {num_rois}, {bin_pool}")
        self.num_rois = int(num_rois)
        self.fg_iou = float(fg_iou)
        num_bins = max(1, int(round((1.0 - fg_iou) / 0.1)))
        self.edges = torch.linspace(fg_iou, 1.0, num_bins + 1, dtype=torch.float64)
        deltas = make_delta_pool(xy_steps, wh_steps)
        ious = delta_ious(deltas)
        gen = torch.Generator().manual_seed(seed)
        kept, bin_sizes = [], []
        for i in range(num_bins):
            lo, hi = self.edges[i].item(), self.edges[i + 1].item()
            last = i == num_bins - 1
            sel = torch.nonzero((ious >= lo - 1e-12) & ((ious <= hi) if last else (ious < hi - 1e-12)))[:, 0]
            sel = sel[torch.randperm(len(sel), generator=gen)[:bin_pool]]
            kept.append(sel)
            bin_sizes.append(len(sel))
        self.bin_sizes = tuple(bin_sizes)
        idx = torch.cat(kept)
        self.register_buffer("deltas", deltas[idx].float(), persistent=False)
        self.register_buffer("delta_iou", ious[idx].float(), persistent=False)
        starts = torch.tensor([0] + bin_sizes).cumsum(0)
        self._bin_ranges = [(int(starts[i]), int(starts[i + 1])) for i in range(num_bins)]
        self.per_bin = self.num_rois // num_bins + 1
        logger.info("IoU-balanced delta pool: %d deltas, per-bin sizes %s over edges %s", len(idx),
                    list(bin_sizes), [round(e, 2) for e in self.edges.tolist()])

    def sample_deltas(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Up to ``num_rois // num_bins + 1`` deltas per bin, without replacement -> Tensor[D, 4]."""
        picks = []
        for lo, hi in self._bin_ranges:
            n = hi - lo
            perm = torch.randperm(n, generator=generator)[: self.per_bin]
            picks.append(perm + lo)
        idx = torch.cat(picks).to(self.deltas.device)
        return self.deltas[idx]

    def sample(self, gt_boxes: torch.Tensor, image_size: Optional[Tuple[int, int]] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Jittered RoIs around ``gt_boxes``.

        Args:
            gt_boxes (Tensor[G, 4]): ground-truth boxes of one image.
            image_size ((h, w) or None): clip the RoIs to the image when given.
        Returns:
            Tensor[R, 4], R <= num_rois (0 when G = 0).
        """
        if gt_boxes.numel() == 0:
            return gt_boxes.new_zeros((0, 4))
        deltas = self.sample_deltas(generator)
        rois = apply_deltas(gt_boxes.detach().float(), deltas).reshape(-1, 4)
        if len(rois) > self.num_rois:
            rois = rois[torch.randperm(len(rois), generator=generator)[: self.num_rois].to(rois.device)]
        if image_size is not None:
            h, w = image_size
            rois = torch.stack([rois[:, 0].clamp(0, w), rois[:, 1].clamp(0, h),
                                rois[:, 2].clamp(0, w), rois[:, 3].clamp(0, h)], dim=1)
        return rois

    def label(self, rois: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor):
        """Match ``rois`` to their best ground-truth box and keep those with IoU >= fg_iou.

        Returns:
            (rois Tensor[R', 4], ious Tensor[R'], classes Tensor[R'] int64)
        """
        if len(rois) == 0 or len(gt_boxes) == 0:
            return rois.new_zeros((0, 4)), rois.new_zeros((0,)), gt_classes.new_zeros((0,))
        iou, idx = pairwise_iou(rois, gt_boxes.float()).max(dim=1)
        keep = iou >= self.fg_iou
        return rois[keep], iou[keep], gt_classes[idx[keep]]

    def forward(self, gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
                image_size: Optional[Tuple[int, int]] = None, generator: Optional[torch.Generator] = None):
        """:meth:`sample` then :meth:`label`: (rois Tensor[R, 4], ious Tensor[R], classes Tensor[R])."""
        rois = self.sample(gt_boxes, image_size, generator)
        return self.label(rois, gt_boxes, gt_classes)
