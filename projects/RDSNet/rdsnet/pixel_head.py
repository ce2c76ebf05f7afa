"""RDSNet's pixel stream: fuses P3-P5 into per-pixel representations U at stride 4 (detectron2 layers)."""
from typing import Dict, List

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["RDSNetPixelHead"]


class _Up2(nn.Module):
    """x2 bilinear up-sampling with align_corners=True (as in the original)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class RDSNetPixelHead(nn.Module):
    """P3 -> conv; P4 -> conv, up; P5 -> conv, up, conv, up; sum; NUM_CONVS x [conv, up]; 1x1 conv to d.

    "conv" is a 3x3 conv (no bias when normed) + norm + ReLU. With P3 at stride 8 and one final block, U is at
    stride 4.
    """

    @configurable
    def __init__(self, *, input_shapes: List[ShapeSpec], conv_dim: int = 256, num_convs: int = 1,
                 norm: str = "GN", rep_dim: int = 32):
        """
        Args:
            input_shapes (list[ShapeSpec]): the fused levels, highest resolution first, each with twice the
                previous stride.
            conv_dim (int): channels of the 3x3 convs.
            num_convs (int): [conv, x2 up] blocks after the fusion.
            norm (str): see :func:`detectron2.layers.get_norm`.
            rep_dim (int): channels d of the output representations.
        """
        super().__init__()
        strides = [s.stride for s in input_shapes]
        for a, b in zip(strides, strides[1:]):
            if b != 2 * a:
                raise ValueError(f"RDSNet pixel head needs levels of doubling strides, got strides {strides}")

        def conv(cin):
            return Conv2d(cin, conv_dim, kernel_size=3, padding=1, bias=not norm,
                          norm=get_norm(norm, conv_dim), activation=F.relu)

        self.lateral = nn.ModuleList()
        for level, shape in enumerate(input_shapes):
            layers = []
            cin = shape.channels
            for _ in range(level):
                layers += [conv(cin), _Up2()]
                cin = conv_dim
            if level == 0:
                layers.append(conv(cin))
            self.lateral.append(nn.Sequential(*layers))
        self.fuse = nn.Sequential(*[m for _ in range(num_convs) for m in (conv(conv_dim), _Up2())])
        self.predictor = nn.Conv2d(conv_dim, rep_dim, kernel_size=1)
        self.stride = strides[0] // 2 ** num_convs

        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.predictor:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        pc = cfg.MODEL.RDSNET.PIXEL_HEAD
        missing = [f for f in pc.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.RDSNET.PIXEL_HEAD.IN_FEATURES {missing} are not backbone outputs "
                             f"({sorted(input_shape)})")
        return {
            "input_shapes": [input_shape[f] for f in pc.IN_FEATURES],
            "conv_dim": pc.CONV_DIM,
            "num_convs": pc.NUM_CONVS,
            "norm": pc.NORM,
            "rep_dim": cfg.MODEL.RDSNET.REP_DIM,
        }

    def forward(self, features: List[Tensor]) -> Tensor:
        """features: the IN_FEATURES maps, highest resolution first -> U (Tensor[N, d, H/stride, W/stride])."""
        x = self.lateral[0](features[0])
        for lateral, feat in zip(self.lateral[1:], features[1:]):
            y = lateral(feat)
            # a level whose size is not exactly half (odd sizes) is aligned to the top-left
            x = x + y[:, :, : x.shape[2], : x.shape[3]]
        return self.predictor(self.fuse(x))
