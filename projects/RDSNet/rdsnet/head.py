"""RDSNet's object stream: detectron2's RetinaNet head plus a third, *representation* tower."""
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

__all__ = ["RDSNetHead"]


class RDSNetHead(RetinaNetHead):
    """RetinaNet's classification and box towers (unchanged, so RetinaNet checkpoints load) and a representation
    tower of the same shape whose last 3x3 conv outputs ``A * 2 * d`` channels: for anchor ``a``, channels
    ``[a*2d, a*2d + d)`` are its background representation and ``[a*2d + d, (a+1)*2d)`` its foreground one.
    """

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes, num_anchors, conv_dims: List[int],
                 norm="", prior_prob=0.01, rep_dim: int = 32):
        super().__init__(input_shape=input_shape, num_classes=num_classes, num_anchors=num_anchors,
                         conv_dims=conv_dims, norm=norm, prior_prob=prior_prob)
        if norm in ("BN", "SyncBN"):
            raise ValueError("RDSNetHead supports group/no norm in its towers, not per-level BN")
        rep_subnet = []
        for cin, cout in zip([input_shape[0].channels] + list(conv_dims), conv_dims):
            rep_subnet.append(nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=not norm))
            if norm:
                rep_subnet.append(get_norm(norm, cout))
            rep_subnet.append(nn.ReLU())
        self.rep_subnet = nn.Sequential(*rep_subnet)
        self.rep_pred = nn.Conv2d(conv_dims[-1], num_anchors * 2 * rep_dim, kernel_size=3, stride=1, padding=1)
        self.rep_dim = rep_dim
        for layer in list(self.rep_subnet.modules()) + [self.rep_pred]:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, mean=0, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["rep_dim"] = cfg.MODEL.RDSNET.REP_DIM
        return ret

    def forward(self, features: List[torch.Tensor]):
        """features (list[Tensor]) -> logits, bbox_reg, reps: per-level lists of (N, A*K | A*4 | A*2d, Hi, Wi)."""
        logits, bbox_reg = super().forward(features)
        reps = [self.rep_pred(self.rep_subnet(f)) for f in features]
        return logits, bbox_reg, reps
