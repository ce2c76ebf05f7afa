"""The IoU head: pooled RoI features -> predicted IoU with the (unknown) ground truth, per class. Torch only.

FC layers on PrRoIPool features (IoU-Net paper, Jiang et al., ECCV 2018: "learning to predict IoU"); its loss
(smooth-L1 on (IoU - 0.5) / 0.5, or BCE on logits vs the IoU) and the decoding of its raw outputs into IoUs.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from fvcore.nn import weight_init
from torch import nn

__all__ = ["IoUHead", "IOU_LOSSES"]

IOU_LOSSES = ("smooth_l1", "bce")


class IoUHead(nn.Module):
    """FC head predicting the IoU of a box with its ground truth.

    Args:
        in_channels (int): channels C of the pooled features.
        pooler_resolution (int): side P of the pooled features.
        num_classes (int): K; the head outputs K IoUs, or 1 when ``cls_agnostic``.
        num_fc (int), fc_dim (int): hidden fully-connected layers (ReLU after each).
        cls_agnostic (bool): one IoU for every class.
        loss (str): "smooth_l1" or "bce".
        loss_weight (float): weight of ``loss_iou``.
        smooth_l1_beta (float): beta of the smooth-L1 loss.
    """

    def __init__(self, in_channels: int, pooler_resolution: int = 7, num_classes: int = 80, num_fc: int = 2,
                 fc_dim: int = 1024, cls_agnostic: bool = False, loss: str = "smooth_l1",
                 loss_weight: float = 5.0, smooth_l1_beta: float = 1.0):
        super().__init__()
        if loss not in IOU_LOSSES:
            raise ValueError(f"MODEL.IOU_NET.LOSS must be one of {IOU_LOSSES}, got {loss!r}")
        if num_fc < 1:
            raise ValueError(f"MODEL.IOU_NET.NUM_FC must be >= 1, got {num_fc}")
        self.num_classes = num_classes
        self.cls_agnostic = cls_agnostic
        self.loss_type = loss
        self.loss_weight = loss_weight
        self.smooth_l1_beta = smooth_l1_beta
        dims = [in_channels * pooler_resolution ** 2] + [fc_dim] * num_fc
        self.fcs = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        for fc in self.fcs:
            weight_init.c2_xavier_fill(fc)
        self.predictor = nn.Linear(fc_dim, 1 if cls_agnostic else num_classes)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor[R, C, P, P]): pooled features.
        Returns:
            Tensor[R, K] (or [R, 1] class-agnostic): raw outputs; see :meth:`decode`.
        """
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.predictor(x)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> predicted IoUs (smooth-L1: 0.5 * out + 0.5, not clamped; BCE: sigmoid)."""
        if self.loss_type == "bce":
            return raw.sigmoid()
        return raw * 0.5 + 0.5

    def select(self, raw: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Column of each row's class: Tensor[R, K] and Tensor[R] -> Tensor[R]."""
        if self.cls_agnostic or raw.shape[1] == 1:
            return raw[:, 0]
        return raw.gather(1, classes.long().view(-1, 1))[:, 0]

    def predict(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Decoded IoU of each pooled RoI at its class: Tensor[R, C, P, P], Tensor[R] -> Tensor[R]."""
        return self.decode(self.select(self(x), classes))

    def losses(self, raw: torch.Tensor, classes: torch.Tensor, ious: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"loss_iou": ...}``: mean over the RoIs, times the loss weight; 0 (not NaN) with no RoI.

        Args:
            raw (Tensor[R, K]): :meth:`forward` outputs.
            classes (Tensor[R]): ground-truth class of each RoI.
            ious (Tensor[R]): IoU of each RoI with its ground truth (the target).
        """
        pred = self.select(raw, classes)
        ious = ious.to(pred.dtype)
        if self.loss_type == "bce":
            loss = F.binary_cross_entropy_with_logits(pred, ious, reduction="sum")
        else:
            loss = F.smooth_l1_loss(pred, (ious - 0.5) / 0.5, beta=self.smooth_l1_beta, reduction="sum")
        # raw.sum() * 0 keeps every parameter in the graph when there is no RoI (DDP needs it)
        return {"loss_iou": self.loss_weight * loss / max(len(pred), 1) + raw.sum() * 0.0}
