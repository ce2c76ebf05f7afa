"""RDSNet's mask loss: per-pixel 2-class cross-entropy with per-instance OHEM (torch-only).

Per instance every in-crop foreground pixel is kept, and of the in-crop background pixels only the
``k = min(ratio * #foreground, HW - 1)`` with the largest loss; the instance loss is the sum of the kept pixel
losses over (#kept + 1). An instance without foreground pixels keeps nothing and contributes 0 (never NaN).
"""
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["ohem_mask_loss", "reduce_instance_losses"]


def ohem_mask_loss(logits: Tensor, targets: Tensor, neg_pos_ratio: float = 1.0) -> Tensor:
    """Per-instance OHEM cross-entropy.

    Args:
        logits (Tensor[K, 2, H, W]): mask logits, channel 1 = foreground.
        targets (Tensor[K, H, W]): 1 foreground, 0 background, -1 ignored (outside the crop).
        neg_pos_ratio (float): background pixels kept per foreground pixel.

    Returns:
        Tensor[K]: the loss of each instance.
    """
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be Tensor[K, 2, H, W], got shape {tuple(logits.shape)}")
    if targets.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"targets must be Tensor[K, H, W] matching logits, got {tuple(targets.shape)}")
    k = logits.shape[0]
    if k == 0:
        return logits.sum(dim=(1, 2, 3))  # empty, still attached to the graph
    targets = targets.long()
    pix = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none").flatten(1)  # K x P
    t = targets.flatten(1)
    pos, neg = t == 1, t == 0
    num_pix = pix.shape[1]
    num_neg = (neg_pos_ratio * pos.sum(dim=1).float()).clamp(max=num_pix - 1)  # K
    # rank the background pixels by loss (hardest first); keep rank < num_neg
    hardness = torch.where(neg, pix.detach(), torch.full_like(pix, -1.0))
    order = hardness.argsort(dim=1, descending=True)
    keep_sorted = torch.arange(num_pix, device=pix.device)[None, :].float() < num_neg[:, None]
    keep_neg = torch.zeros_like(neg).scatter_(1, order, keep_sorted) & neg
    kept = pos | keep_neg
    return (pix * kept).sum(dim=1) / (kept.sum(dim=1).float() + 1.0)


def reduce_instance_losses(instance_losses: Tensor, num_instances: int, anchor: Tensor = None) -> Tensor:
    """Sum over all instances of the batch / (number of instances + 1).

    ``anchor`` (any tensor of the graph, e.g. the pixel representations) keeps the result attached to the graph
    (times 0) when there is no instance at all, so every parameter still gets a (zero) gradient.
    """
    total = instance_losses.sum() / (num_instances + 1.0)
    if anchor is not None:
        total = total + anchor.sum() * 0.0
    return total
