"""detectron2 glue: :class:`FPTBackbone` wraps an FPN and transforms its pyramid, same names/strides/channels."""
import math
from typing import List, Optional, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone

from .pyramid import FeaturePyramidTransformer

__all__ = ["FPTBackbone", "build_resnet_fpt_backbone", "build_retinanet_resnet_fpt_backbone",
           "build_fpt_backbone", "default_fpt_in_features"]

FPT_INPUTS = ("fpn", "lateral")


def _top_block_levels(fpn: Backbone) -> List[str]:
    """Names of the outputs produced by the wrapped FPN's top block (e.g. ["p6"] or ["p6", "p7"])."""
    top = getattr(fpn, "top_block", None)
    if top is None:
        return []
    return list(fpn._out_features[len(fpn._out_features) - top.num_levels:])


def default_fpt_in_features(fpn: Backbone) -> List[str]:
    """The FPN outputs minus the levels of a top block that reads an FPN output (it is recomputed then)."""
    top = getattr(fpn, "top_block", None)
    outs = list(fpn.output_shape().keys())
    if top is not None and top.in_feature in outs:
        return [f for f in outs if f not in _top_block_levels(fpn)]
    return outs


class FPTBackbone(Backbone):
    """Feature Pyramid Transformer on top of an FPN (``self.fpn``), transformer modules in ``self.pyramid``.

    Outputs have the wrapped FPN's names, strides and channels, so any head works unchanged. Levels not in
    ``in_features`` pass through; the FPN's top block is re-run on the transformed level it reads.

    Args:
        fpn (Backbone): the wrapped FPN (detectron2 :class:`FPN` for ``input="lateral"``); its outputs must all
            have the same number of channels.
        in_features (list[str] or None): outputs to transform, fine to coarse (None: :func:`default_fpt_in_features`).
        input (str): "fpn" (transform the FPN outputs) or "lateral" (its 1x1 laterals; the FPN's 3x3 output convs
            are deleted).
        st_levels (list[str] or None): levels with a self-transformer (None = all of ``in_features``).
        **pyramid_kwargs: the rest of :class:`FeaturePyramidTransformer`'s arguments.
    """

    def __init__(self, fpn: Backbone, *, in_features: Optional[Sequence[str]] = None, input: str = "fpn",
                 st_levels: Optional[Sequence[str]] = None, **pyramid_kwargs):
        super().__init__()
        if input not in FPT_INPUTS:
            raise ValueError(f"MODEL.FPT.INPUT must be one of {FPT_INPUTS}, got {input!r}")
        shapes = fpn.output_shape()
        channels = {s.channels for s in shapes.values()}
        if len(channels) != 1:
            raise ValueError(f"FPT needs a pyramid with one channel count, got {channels}")
        in_features = list(in_features) if in_features else default_fpt_in_features(fpn)
        unknown = [f for f in in_features if f not in shapes]
        if unknown:
            raise ValueError(f"MODEL.FPT.IN_FEATURES {unknown} are not outputs of the wrapped FPN {list(shapes)}")
        top = getattr(fpn, "top_block", None)
        top_levels = _top_block_levels(fpn)
        if top is not None and top.in_feature in shapes and set(top_levels) & set(in_features):
            raise ValueError(f"{top_levels} are computed by the FPN's top block from {top.in_feature}: they cannot "
                             f"be transformed (they are recomputed from the transformed {top.in_feature})")
        if input == "lateral":
            if not isinstance(fpn, FPN):
                raise ValueError("MODEL.FPT.INPUT 'lateral' needs a detectron2 FPN")
            for stage in self._lateral_stages(fpn):  # unused in lateral mode: delete (DDP unused parameters)
                delattr(fpn, f"fpn_output{stage}")
            fpn.output_convs = []
        levels = [int(math.log2(shapes[f].stride)) for f in in_features]
        st_levels = None if not st_levels else [int(math.log2(shapes[f].stride)) for f in st_levels]
        if st_levels is not None and not set(st_levels) <= set(levels):
            raise ValueError(f"MODEL.FPT.SELF.LEVELS must be a subset of the transformed levels {in_features}")
        self.fpn = fpn
        self.input = input
        self.in_features = in_features
        self.pyramid = FeaturePyramidTransformer(channels.pop(), levels, st_levels=st_levels, **pyramid_kwargs)
        self._out_features = list(shapes)
        self._out_feature_strides = {k: s.stride for k, s in shapes.items()}
        self._out_feature_channels = {k: s.channels for k, s in shapes.items()}
        self._top_levels = top_levels

    @staticmethod
    def _lateral_stages(fpn: FPN) -> List[int]:
        shapes = fpn.bottom_up.output_shape()
        return [int(math.log2(shapes[f].stride)) for f in fpn.in_features]

    @property
    def size_divisibility(self) -> int:
        return self.fpn.size_divisibility

    @property
    def padding_constraints(self):
        return self.fpn.padding_constraints

    def output_shape(self):
        return self.fpn.output_shape()

    def forward(self, x: torch.Tensor):
        """x (Tensor[N, 3, H, W]) -> dict name -> Tensor[N, C, H / stride, W / stride], as the wrapped FPN."""
        bottom_up = {}
        if self.input == "fpn":
            feats = dict(self.fpn(x))
        else:
            bottom_up = self.fpn.bottom_up(x)
            feats = {f"p{stage}": getattr(self.fpn, f"fpn_lateral{stage}")(bottom_up[name])
                     for stage, name in zip(self._lateral_stages(self.fpn), self.fpn.in_features)}
        feats.update(zip(self.in_features, self.pyramid([feats[f] for f in self.in_features])))
        top = getattr(self.fpn, "top_block", None)
        if top is not None and (self.input == "lateral" or top.in_feature in self.in_features):
            source = bottom_up[top.in_feature] if top.in_feature in bottom_up else feats[top.in_feature]
            feats.update(zip(self._top_levels, top(source)))
        return {f: feats[f] for f in self._out_features}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a detectron2 FPN checkpoint ("backbone.bottom_up.*", "backbone.fpn_lateral2.*") -> "backbone.fpn.*"
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(("fpn.", "pyramid.")):
                state_dict[prefix + "fpn." + rest] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fpt_kwargs_from_cfg(cfg) -> dict:
    """:class:`FPTBackbone` keyword arguments from ``cfg.MODEL.FPT``."""
    c = cfg.MODEL.FPT

    return dict(
        in_features=list(c.IN_FEATURES) or None,
        input=c.INPUT,
        st_levels=list(c.SELF.LEVELS) or None,
        self_transformer=dict(mixtures=c.SELF.MIXTURES, pool_kv=c.SELF.POOL_KV, share_qk=c.SELF.SHARE_QK,
                              dropout=c.SELF.DROPOUT, scale=c.SELF.SCALE, attn_impl=c.ATTN_IMPL,
                              query_chunk=c.QUERY_CHUNK) if c.SELF.ENABLED else None,
        grounding_transformer=dict(inter_channels=c.GROUNDING.INTER_CHANNELS, mode=c.GROUNDING.MODE,
                                   mixtures=c.GROUNDING.MIXTURES, temperature=c.GROUNDING.TEMPERATURE,
                                   attn_impl=c.ATTN_IMPL,
                                   query_chunk=c.QUERY_CHUNK) if c.GROUNDING.ENABLED else None,
        rendering_transformer=dict(order=c.RENDERING.ORDER) if c.RENDERING.ENABLED else None,
        cross_range=c.CROSS_RANGE,
        fuse_kernel=c.FUSE_KERNEL,
        fuse_norm=c.FUSE_NORM,
        norm=c.NORM,
    )


def _wrap(cfg, fpn: Backbone) -> FPTBackbone:
    channels = {s.channels for s in fpn.output_shape().values()}
    if channels != {cfg.MODEL.FPN.OUT_CHANNELS}:
        raise ValueError(f"FPT follows MODEL.FPN.OUT_CHANNELS ({cfg.MODEL.FPN.OUT_CHANNELS}); the wrapped backbone "
                         f"gives {sorted(channels)} channels")
    return FPTBackbone(fpn, **fpt_kwargs_from_cfg(cfg))


@BACKBONE_REGISTRY.register()
def build_resnet_fpt_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN (p2-p6) + FPT: p2-p5 transformed, p6 re-pooled from the transformed p5 (by default)."""
    return _wrap(cfg, build_resnet_fpn_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpt_backbone(cfg, input_shape: ShapeSpec):
    """RetinaNet ResNet-FPN (p3-p7, p6/p7 from res5) + FPT: all five levels transformed (by default)."""
    return _wrap(cfg, build_retinanet_resnet_fpn_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_fpt_backbone(cfg, input_shape: ShapeSpec):
    """FPT around the registered backbone named by MODEL.FPT.WRAPPED_BACKBONE (an FPN-like pyramid)."""
    name = cfg.MODEL.FPT.WRAPPED_BACKBONE
    if name in ("build_fpt_backbone", ""):
        raise ValueError(f"MODEL.FPT.WRAPPED_BACKBONE must name the wrapped pyramid backbone, got {name!r}")
    return _wrap(cfg, BACKBONE_REGISTRY.get(name)(cfg, input_shape))
