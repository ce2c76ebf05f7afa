"""``InterNetROIHeads``: StandardROIHeads with the make-up layer, per-level pooling and the intertwiner loss.

detectron2's box and mask heads are used unchanged; what changes is the features they pool from (the made-up
maps) and the level each RoI is pooled from (InterNet's rounded FPN rule or roi_size). In training the
critic, the class buffer and ``loss_intertwiner`` are added; at inference only the make-up layer remains.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .assignment import level_sets
from .buffer import ClassBuffer
from .critic import ACTIVATIONS, InterNetCritic
from .loss import DISTANCES, IntertwinerOT, intertwiner_loss
from .makeup import MakeupLayer
from .pooler import LevelAssignedROIPooler

__all__ = ["InterNetROIHeads"]

logger = logging.getLogger(__name__)


def _storage():
    try:
        return get_event_storage()
    except AssertionError:  # no EventStorage (unit tests, plain inference)
        return None


def _zero_with(*modules: Optional[nn.Module]) -> torch.Tensor:
    """0 attached to every parameter of ``modules`` (keeps DDP's reducer happy on steps that skip them)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    return sum(p.reshape(-1)[0] * 0.0 for p in params) if params else torch.zeros(())


@ROI_HEADS_REGISTRY.register()
class InterNetROIHeads(StandardROIHeads):
    """Feature Intertwiner ROI heads (see the module docstring and projects/InterNet/README.md).

    Args (besides StandardROIHeads'; ``box_pooler``/``mask_pooler`` are :class:`LevelAssignedROIPooler` on
    the made-up maps):
        makeup (MakeupLayer or None): None disables InterNet (then critic etc. are None too).
        critic (InterNetCritic): shared by levels and sets.
        class_buffer (ClassBuffer): centroids of the reliable set.
        feature_pooler (LevelAssignedROIPooler): FEAT_POOL_SIZE pooling from the made-up maps (less reliable).
        reliable_pooler (LevelAssignedROIPooler): FEAT_POOL_SIZE pooling from the original maps (reliable).
        loss_levels (list[int]): indices into ``box_in_features`` of the levels receiving the loss.
        loss (str): "l2" | "l1" | "kl" | "ot".
        loss_weight (float): weight of ``loss_intertwiner``.
        instance_level (bool): instance-level instead of class-level loss.
        ot (IntertwinerOT or None): the OT distance (LOSS "ot").
        warmup_iters (int): iterations during which the buffer fills but the loss is 0.
    """

    @configurable
    def __init__(self, *, makeup: Optional[MakeupLayer] = None, critic: Optional[InterNetCritic] = None,
                 class_buffer: Optional[ClassBuffer] = None,
                 feature_pooler: Optional[LevelAssignedROIPooler] = None,
                 reliable_pooler: Optional[LevelAssignedROIPooler] = None, loss_levels: List[int] = (0, 1, 2),
                 loss: str = "l2", loss_weight: float = 10.0, instance_level: bool = False,
                 ot: Optional[IntertwinerOT] = None, warmup_iters: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.box_pooler, LevelAssignedROIPooler):
            raise TypeError("InterNetROIHeads needs a LevelAssignedROIPooler as box_pooler")
        if loss not in DISTANCES:
            raise ValueError(f"MODEL.INTERNET.LOSS must be one of {DISTANCES}, got {loss!r}")
        if makeup is not None and (critic is None or class_buffer is None or feature_pooler is None
                                   or reliable_pooler is None or (loss == "ot" and ot is None)):
            raise ValueError("InterNet needs critic, class_buffer, feature_pooler, reliable_pooler (and ot)")
        self.makeup = makeup
        self.critic = critic
        self.class_buffer = class_buffer
        self.feature_pooler = feature_pooler
        self.reliable_pooler = reliable_pooler
        self.loss_levels = [int(i) for i in loss_levels]
        self.loss_name = loss
        self.loss_weight = float(loss_weight)
        self.instance_level = bool(instance_level)
        self.ot = ot
        if warmup_iters < 0:
            raise ValueError(f"MODEL.INTERNET.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        self.warmup_iters = int(warmup_iters)
        self._local_steps = 0

    # ---------------------------------------------------------------- construction from a config
    @classmethod
    def _internet_scales(cls, cfg, input_shape, in_features):
        factor = cfg.MODEL.INTERNET.MAKEUP.UPSAMPLE_FACTOR if cfg.MODEL.INTERNET.ENABLED else 1
        strides = [input_shape[f].stride for f in in_features]
        return strides, tuple(float(factor) / s for s in strides)

    @classmethod
    def _level_pooler(cls, cfg, input_shape, in_features, resolution, sampling_ratio, pooler_type, made_up=True):
        strides, scales = cls._internet_scales(cfg, input_shape, in_features)
        if not made_up:
            scales = tuple(1.0 / s for s in strides)
        return LevelAssignedROIPooler(resolution, scales, sampling_ratio, pooler_type, strides=strides,
                                      assignment=cfg.MODEL.INTERNET.ASSIGNMENT,
                                      assign_pool_size=cfg.MODEL.INTERNET.FEAT_POOL_SIZE)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_pooler"] = cls._level_pooler(cfg, input_shape, ret["box_in_features"],
                                              cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
                                              cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                                              cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if ret and ret.get("mask_pooler") is not None:
            ret["mask_pooler"] = cls._level_pooler(cfg, input_shape, ret["mask_in_features"],
                                                   cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
                                                   cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
                                                   cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE)
        return ret

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        c = cfg.MODEL.INTERNET
        if not c.ENABLED:
            return ret
        in_features = ret["box_in_features"]
        missing = [f for f in c.LEVELS if f not in in_features]
        if missing:
            raise ValueError(f"MODEL.INTERNET.LEVELS {missing} are not in MODEL.ROI_HEADS.IN_FEATURES {in_features}")
        if c.LOSS not in DISTANCES:
            raise ValueError(f"MODEL.INTERNET.LOSS must be one of {DISTANCES}, got {c.LOSS!r}")
        channels = input_shape[in_features[0]].channels
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        pool = c.FEAT_POOL_SIZE
        ret.update(
            makeup=MakeupLayer(channels, c.MAKEUP.NUM_CONV, c.MAKEUP.UPSAMPLE_FACTOR, c.MAKEUP.NORM,
                               num_levels=len(in_features) if c.MAKEUP.MULTI else 1),
            critic=InterNetCritic(channels, pool, c.CRITIC_DIM, c.CRITIC_NORM, ACTIVATIONS[c.LOSS]),
            class_buffer=ClassBuffer(num_classes, c.CRITIC_DIM, c.BUFFER_SIZE),
            feature_pooler=cls._level_pooler(cfg, input_shape, in_features, pool,
                                             cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
                                             cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE),
            reliable_pooler=cls._level_pooler(cfg, input_shape, in_features, pool,
                                              cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
                                              cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE, made_up=False),
            loss_levels=[in_features.index(f) for f in c.LEVELS],
            loss=c.LOSS,
            loss_weight=c.LOSS_WEIGHT,
            instance_level=c.INSTANCE_LEVEL,
            ot=IntertwinerOT(c.CRITIC_DIM, c.OT.DIM, c.OT.EPSILON, c.OT.ITERS, c.OT.COST) if c.LOSS == "ot" else None,
            warmup_iters=c.WARMUP_ITERS,
        )
        return ret

    # ---------------------------------------------------------------- forward
    @property
    def enabled(self) -> bool:
        return self.makeup is not None

    def make_up(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The made-up map of every box level (the input maps when InterNet is disabled)."""
        if not self.enabled:
            return features
        return {f: self.makeup(features[f], i) for i, f in enumerate(self.box_in_features)}

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor], proposals: List[Instances],
                targets: Optional[List[Instances]] = None):
        del images
        if self.training:
            assert targets, "'targets' argument is required during training"
            proposals = self.label_and_sample_proposals(proposals, targets)
        del targets
        made = self.make_up(features)
        if self.training:
            losses = {}
            if self.enabled:  # before the box head: train_on_pred_boxes rewrites proposal_boxes
                losses.update(self._forward_intertwiner(features, made, proposals))
            losses.update(self._forward_box(made, proposals))
            losses.update(self._forward_mask(made, proposals))
            losses.update(self._forward_keypoint(features, proposals))
            return proposals, losses
        pred_instances = self._forward_box(made, proposals)
        pred_instances = self._forward_mask(made, pred_instances)
        pred_instances = self._forward_keypoint(features, pred_instances)
        return pred_instances, {}

    def forward_with_given_boxes(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        assert not self.training
        assert instances[0].has("pred_boxes") and instances[0].has("pred_classes")
        instances = self._forward_mask(self.make_up(features), instances)
        return self._forward_keypoint(features, instances)

    def _forward_intertwiner(self, features: Dict[str, torch.Tensor], made: Dict[str, torch.Tensor],
                             proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """Critic on both sets of every loss level, buffer update, then ``loss_intertwiner``."""
        box_lists = [p.proposal_boxes for p in proposals]
        labels = torch.cat([p.gt_classes for p in proposals]) if proposals else torch.zeros(0, dtype=torch.long)
        levels = self.box_pooler.assign(box_lists).to(labels.device)
        fmt = convert_boxes_to_pooler_format(box_lists)
        sets = level_sets(levels, labels, self.num_classes, self.loss_levels)

        less_x, less_y, rel_x, rel_y = [], [], [], []
        for lvl, less, rel in sets:
            name = self.box_in_features[lvl]
            less_x.append(self.feature_pooler.level_poolers[lvl](made[name], fmt[less]))
            less_y.append(labels[less])
            if rel.numel():
                rel_x.append(self.reliable_pooler.level_poolers[lvl](features[name].detach(), fmt[rel]))
                rel_y.append(labels[rel])
        num_less = sum(int(y.numel()) for y in less_y)
        c_in = features[self.box_in_features[0]].shape[1]
        s = self.critic.pool_size
        ref = features[self.box_in_features[0]]
        if num_less == 0:  # no foreground less-reliable RoI: no update (local contribution 0), no loss
            rel_x, rel_y = [], []
        less_out = self.critic(torch.cat(less_x) if less_x else ref.new_zeros(0, c_in, s, s))
        less_labels = torch.cat(less_y) if less_y else labels.new_zeros(0)
        with torch.no_grad():
            rel_out = self.critic(torch.cat(rel_x) if rel_x else ref.new_zeros(0, c_in, s, s))
            rel_labels = torch.cat(rel_y) if rel_y else labels.new_zeros(0)
        self.class_buffer.update(rel_out, rel_labels)  # every rank, every step (all-reduce inside)

        loss = intertwiner_loss(less_out, less_labels, self.class_buffer.centroids, self.class_buffer.filled(),
                                self.loss_name, self.instance_level, self.ot)
        storage = _storage()
        step = storage.iter if storage is not None else self._local_steps
        self._local_steps += 1
        weight = 0.0 if step < self.warmup_iters else self.loss_weight
        if storage is not None:
            storage.put_scalar("internet/buffer_occupancy", self.class_buffer.occupancy, smoothing_hint=False)
            storage.put_scalar("internet/num_less_reliable", num_less)
            storage.put_scalar("internet/num_reliable", int(rel_labels.numel()))
        return {"loss_intertwiner": loss * weight + _zero_with(self.critic, self.ot).to(loss)}
