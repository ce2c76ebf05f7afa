"""The ``RDSNet`` meta-architecture: detectron2's RetinaNet with a representation tower, a pixel head,
correlation masks trained with the OHEM loss, and optional MBRM box refinement at inference."""
import math
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from .head import RDSNetHead
from .mask_loss import ohem_mask_loss, reduce_instance_losses
from .masks import correlate, crop_region, decode_soft_masks, downsample_mask_targets, to_inclusive
from .mbrm import MBRM, mask_profiles
from .pixel_head import RDSNetPixelHead

__all__ = ["RDSNet"]

_MASK_CHUNK = 32  # detections whose full-resolution soft masks are decoded at once


@META_ARCH_REGISTRY.register()
class RDSNet(RetinaNet):
    """RDSNet (Wang et al., AAAI 2020): one-stage reciprocal object detection and instance segmentation.

    Training returns RetinaNet's ``loss_cls`` and ``loss_box_reg`` plus ``loss_mask``; inference returns
    ``Instances`` at the original resolution with ``pred_boxes``, ``scores``, ``pred_classes`` and boolean
    full-image ``pred_masks`` (COCOEvaluator scores bbox and segm).
    """

    @configurable
    def __init__(
        self,
        *,
        pixel_head: nn.Module,
        pixel_in_features: List[str],
        rep_dim: int = 32,
        crop_padding_train: float = 0.25,
        crop_padding_test: float = 0.1,
        masks_to_train: int = 100,
        mask_min_area: float = 100,
        ohem_neg_pos_ratio: float = 1.0,
        mask_loss_weight: float = 1.0,
        mask_threshold: float = 0.4,
        mbrm: nn.Module = None,
        **kwargs,
    ):
        """
        Args:
            pixel_head (nn.Module): maps the ``pixel_in_features`` maps to U (N, d, H/s, W/s); has ``stride``.
            pixel_in_features (list[str]): backbone features fed to the pixel head, highest resolution first.
            rep_dim (int): d.
            crop_padding_train, crop_padding_test (float): crop padding (fraction of the box side).
            masks_to_train (int): at most this many positive anchors per image train the masks.
            mask_min_area (float): GT masks with at most this many pixels train no mask.
            ohem_neg_pos_ratio (float): OHEM background pixels per foreground pixel.
            mask_loss_weight (float): weight of ``loss_mask``.
            mask_threshold (float): foreground probability above which a mask pixel is on.
            mbrm (nn.Module or None): box refinement from the soft masks at inference (None: off).
            kwargs: :class:`detectron2.modeling.RetinaNet` arguments; ``head`` must return (logits, deltas, reps).
        """
        super().__init__(**kwargs)
        self.pixel_head = pixel_head
        self.pixel_in_features = list(pixel_in_features)
        self.rep_dim = rep_dim
        self.crop_padding_train = crop_padding_train
        self.crop_padding_test = crop_padding_test
        self.masks_to_train = masks_to_train
        self.mask_min_area = mask_min_area
        self.ohem_neg_pos_ratio = ohem_neg_pos_ratio
        self.mask_loss_weight = mask_loss_weight
        self.mask_threshold = mask_threshold
        self.mbrm = mbrm

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)  # backbone, anchors, matcher, box transform, focal loss, inference keys
        rc = cfg.MODEL.RDSNET
        shapes = ret["backbone"].output_shape()
        ret["head"] = RDSNetHead(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        mbrm = None
        if rc.MBRM.ENABLED:
            mbrm = MBRM(kernel=rc.MBRM.KERNEL, bias=rc.MBRM.BIAS, gamma=rc.MBRM.GAMMA,
                        cutoff=rc.MBRM.PRIOR_CUTOFF, decode=rc.MBRM.DECODE)
        ret.update(
            pixel_head=RDSNetPixelHead(cfg, shapes),
            pixel_in_features=rc.PIXEL_HEAD.IN_FEATURES,
            rep_dim=rc.REP_DIM,
            crop_padding_train=rc.CROP_PADDING_TRAIN,
            crop_padding_test=rc.CROP_PADDING_TEST,
            masks_to_train=rc.MASKS_TO_TRAIN,
            mask_min_area=rc.MASK_MIN_AREA,
            ohem_neg_pos_ratio=rc.OHEM_NEG_POS_RATIO,
            mask_loss_weight=rc.MASK_LOSS_WEIGHT,
            mask_threshold=rc.MASK_THRESH_TEST,
            mbrm=mbrm,
        )
        return ret

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        images = self.preprocess_image(batched_inputs)
        feats = self.backbone(images.tensor)
        head_feats = [feats[f] for f in self.head_in_features]
        logits, deltas, reps = self.head(head_feats)
        pixel_reps = self.pixel_head([feats[f] for f in self.pixel_in_features])
        pred_logits, pred_deltas, pred_reps = self._transpose_dense_predictions(
            [logits, deltas, reps], [self.num_classes, 4, 2 * self.rep_dim]
        )
        anchors = self.anchor_generator(head_feats)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("RDSNet training needs 'instances' in the inputs")
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            gt_labels, gt_boxes, matched_idxs = self._label_anchors_with_matches(anchors, gt_instances)
            losses = self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
            losses["loss_mask"] = self.mask_losses(
                images, pixel_reps, cat(pred_reps, dim=1), gt_labels, matched_idxs, gt_instances
            )
            return losses
        results = []
        for i, image_size in enumerate(images.image_sizes):
            height = batched_inputs[i].get("height", image_size[0])
            width = batched_inputs[i].get("width", image_size[1])
            results.append({"instances": self.inference_single_image_with_masks(
                anchors,
                [x[i] for x in pred_logits],
                [x[i] for x in pred_deltas],
                [x[i] for x in pred_reps],
                pixel_reps[i],
                image_size,
                self._padded_size(image_size),
                (int(height), int(width)),
            )})
        return results

    def _padded_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """The image's own size padded to the backbone's divisibility (batch padding excluded)."""
        d = max(int(self.backbone.size_divisibility), 1)
        return tuple(int(math.ceil(s / d) * d) for s in image_size)

    def _pixel_extent(self, padded_size: Tuple[int, int], pixel_reps_hw) -> Tuple[int, int]:
        s = self.pixel_head.stride
        return (min(int(math.ceil(padded_size[0] / s)), pixel_reps_hw[0]),
                min(int(math.ceil(padded_size[1] / s)), pixel_reps_hw[1]))

    # ------------------------------------------------------------------------------------------------ training
    @torch.no_grad()
    def _label_anchors_with_matches(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """RetinaNet's anchor labelling that also returns each anchor's matched GT index.

        Returns:
            gt_labels (list[Tensor[R]]): in {-1 ignore, 0..K-1, K background}; gt_boxes (list[Tensor[R, 4]]);
            matched_idxs (list[Tensor[R]]): GT index per anchor (meaningful for positives only).
        """
        anchors = Boxes.cat(anchors)
        gt_labels, gt_boxes, matched = [], [], []
        for gt in gt_instances:
            if len(gt) == 0:
                idxs = torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device)
                gt_labels.append(torch.full_like(idxs, self.num_classes))
                gt_boxes.append(torch.zeros_like(anchors.tensor))
                matched.append(idxs)
                continue
            idxs, anchor_labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
            labels = gt.gt_classes[idxs].clone()
            labels[anchor_labels == 0] = self.num_classes
            labels[anchor_labels == -1] = -1
            gt_labels.append(labels)
            gt_boxes.append(gt.gt_boxes.tensor[idxs])
            matched.append(idxs)
        return gt_labels, gt_boxes, matched

    @staticmethod
    def _rasterize(gt_masks, height: int, width: int) -> Tensor:
        """GT masks (PolygonMasks or BitMasks) as a bool Tensor[G, height, width] (zero padded)."""
        if isinstance(gt_masks, PolygonMasks):
            return BitMasks.from_polygon_masks(gt_masks, height, width).tensor
        t = gt_masks.tensor if isinstance(gt_masks, BitMasks) else torch.as_tensor(gt_masks)
        out = t.new_zeros((t.shape[0], height, width), dtype=torch.bool)
        h, w = min(height, t.shape[1]), min(width, t.shape[2])
        out[:, :h, :w] = t[:, :h, :w].bool()
        return out

    def mask_losses(self, images: ImageList, pixel_reps: Tensor, reps: Tensor, gt_labels: List[Tensor],
                    matched_idxs: List[Tensor], gt_instances: List[Instances]) -> Tensor:
        """OHEM mask loss over the batch: sum of instance losses / (number of instances + 1) x weight.

        Args:
            pixel_reps (Tensor[N, d, Hu, Wu]), reps (Tensor[N, R, 2d]): pixel and per-anchor representations.
        """
        stride = self.pixel_head.stride
        instance_losses, num_instances = [], 0
        for i, (labels, idxs, gt) in enumerate(zip(gt_labels, matched_idxs, gt_instances)):
            pos = ((labels >= 0) & (labels != self.num_classes)).nonzero().flatten()
            if len(gt) == 0 or pos.numel() == 0:
                continue
            if not gt.has("gt_masks"):
                raise ValueError("RDSNet trains masks: the instances need gt_masks (set MODEL.MASK_ON True so the "
                                 "dataset mapper loads them)")
            h, w = images.image_sizes[i]
            ph, pw = self._padded_size((h, w))
            dh, dw = self._pixel_extent((ph, pw), pixel_reps.shape[2:])
            bitmasks = self._rasterize(gt.gt_masks, ph, pw).to(self.device)
            areas = bitmasks.flatten(1).sum(dim=1)
            g = idxs[pos]
            keep = areas[g] > self.mask_min_area
            pos, g = pos[keep], g[keep]
            if pos.numel() > self.masks_to_train:
                pick = torch.randperm(pos.numel(), device=pos.device)[: self.masks_to_train]
                pos, g = pos[pick], g[pick]
            if pos.numel() == 0:
                continue
            targets = downsample_mask_targets(bitmasks, stride)[:, :dh, :dw][g]
            boxes = gt.gt_boxes.clone()
            boxes.clip((h, w))
            crop = crop_region(to_inclusive(boxes.tensor[g]) / stride, dh, dw, self.crop_padding_train)
            targets = torch.where(crop, targets, torch.full_like(targets, -1.0))
            logits = correlate(pixel_reps[i, :, :dh, :dw], reps[i, pos])
            instance_losses.append(ohem_mask_loss(logits, targets, self.ohem_neg_pos_ratio))
            num_instances += pos.numel()
        try:
            get_event_storage().put_scalar("rdsnet/num_mask_instances", num_instances / max(len(gt_instances), 1))
        except AssertionError:  # no event storage outside a trainer
            pass
        if instance_losses:
            per_instance = torch.cat(instance_losses)
        else:
            per_instance = pixel_reps.new_zeros(0)
        # the anchor keeps both streams in the graph (zero gradient) when there is no instance
        anchor = pixel_reps.flatten()[:1] + reps.flatten()[:1]
        return reduce_instance_losses(per_instance, num_instances, anchor) * self.mask_loss_weight

    # ----------------------------------------------------------------------------------------------- inference
    def _decode_detections(self, anchors, logits, deltas, reps, image_size):
        """Per level the top-k anchors by max class score; (anchor, class) pairs above the score threshold;
        decode and clip; per-class NMS; the best detections. Each keeps its anchor's representation."""
        boxes_all, scores_all, classes_all, reps_all = [], [], [], []
        for anchors_l, logits_l, deltas_l, reps_l in zip(anchors, logits, deltas, reps):
            scores_l = logits_l.sigmoid()
            k = min(self.test_topk_candidates, scores_l.shape[0])
            top = scores_l.max(dim=1).values.topk(k).indices
            cand = scores_l[top]
            j, cls = (cand > self.test_score_thresh).nonzero(as_tuple=True)
            a = top[j]
            boxes = self.box2box_transform.apply_deltas(deltas_l[a], anchors_l.tensor[a])
            boxes_all.append(boxes)
            scores_all.append(cand[j, cls])
            classes_all.append(cls)
            reps_all.append(reps_l[a])
        boxes = Boxes(cat(boxes_all))
        boxes.clip(image_size)
        scores, classes, reps = cat(scores_all), cat(classes_all), cat(reps_all)
        keep = batched_nms(boxes.tensor, scores, classes, self.test_nms_thresh)[: self.max_detections_per_image]
        return boxes.tensor[keep], scores[keep], classes[keep], reps[keep]

    def inference_single_image_with_masks(self, anchors, logits, deltas, reps, pixel_reps, image_size,
                                          padded_size, output_size) -> Instances:
        """Detections of one image with full-resolution masks, at ``output_size`` (the original image)."""
        boxes, scores, classes, reps = self._decode_detections(anchors, logits, deltas, reps, image_size)
        # to the original resolution
        scale = boxes.new_tensor([output_size[1] / image_size[1], output_size[0] / image_size[0]]).repeat(2)
        out_boxes = Boxes(boxes * scale)
        out_boxes.clip(output_size)
        keep = out_boxes.nonempty()
        out_boxes, scores, classes, reps = out_boxes.tensor[keep], scores[keep], classes[keep], reps[keep]

        dh, dw = self._pixel_extent(padded_size, pixel_reps.shape[1:])
        stride = self.pixel_head.stride
        u = pixel_reps[:, :dh, :dw]
        masks, horiz, vert = [], [], []
        tracing = torch.jit.is_tracing()  # one chunk of all detections: a traced loop would freeze their number
        for start in [0] if tracing else range(0, out_boxes.shape[0], _MASK_CHUNK):
            sl = slice(start, None if tracing else start + _MASK_CHUNK)
            soft = decode_soft_masks(correlate(u, reps[sl]), (dh * stride, dw * stride), image_size, output_size,
                                     out_boxes[sl], self.crop_padding_test)
            masks.append(soft > self.mask_threshold)
            if self.mbrm is not None:
                h_prof, v_prof = mask_profiles(soft)
                horiz.append(h_prof)
                vert.append(v_prof)
        if masks:
            masks = torch.cat(masks)
        else:
            masks = torch.zeros((0,) + tuple(output_size), dtype=torch.bool, device=out_boxes.device)
        if self.mbrm is not None and horiz:
            out_boxes = self.mbrm(boxes=out_boxes, profiles=(torch.cat(horiz), torch.cat(vert)))
        result = Instances(tuple(output_size))
        result.pred_boxes = Boxes(out_boxes)
        result.scores = scores
        result.pred_classes = classes
        result.pred_masks = masks
        return result
