"""``IoUNetROIHeads``: StandardROIHeads + an IoU head trained on IoU-balanced jittered RoIs, and IoU-Net's
inference (IoU-guided NMS, optimisation-based refinement, score x IoU), each stage switchable in config.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from d2_refine.ops._library import require_kernels
from d2_refine.utils.tracing import is_tracing_or_exporting

from .config import NMS_NONE_NOTE
from .inference import NMS_MODES, iounet_inference_single_image
from .iou_head import IoUHead
from .jitter import IoUBalancedJitter
from .pooler import PRROI_POOLER_TYPES, PrRoIPooler

__all__ = ["IoUNetROIHeads"]

logger = logging.getLogger(__name__)


def _swap_prroi_type(cfg, node: str):
    """A copy of ``cfg`` whose ``MODEL.<node>.POOLER_TYPE`` is ROIAlignV2 when it is a PrRoIPool type (so that
    StandardROIHeads' builders accept it), and the PrRoIPool ``aligned`` flag, or None."""
    pooler_type = cfg.MODEL[node].POOLER_TYPE
    if pooler_type not in PRROI_POOLER_TYPES:
        return cfg, None
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL[node].POOLER_TYPE = "ROIAlignV2"
    return cfg, PRROI_POOLER_TYPES[pooler_type]


@ROI_HEADS_REGISTRY.register()
class IoUNetROIHeads(StandardROIHeads):
    """StandardROIHeads with IoU-Net's IoU head (IoU-Net paper, Jiang et al., ECCV 2018).

    Training adds ``loss_iou`` (on IoU-balanced RoIs jittered around the ground truth) to the box, mask and
    keypoint losses. Inference replaces the box branch's post-processing by IoU-Net's; masks and keypoints
    then run on the refined boxes. Instances get ``pred_ious`` whenever the IoU head was used.

    Args (besides StandardROIHeads'):
        iou_pooler (ROIPooler): PrRoIPool pooler of the IoU head (differentiable w.r.t. the boxes).
        iou_head (IoUHead): the IoU head.
        jitter (IoUBalancedJitter): the training-RoI generator.
        nms (str): "iou_guided", "iou_guided_score_x_iou" or "plain" (see :data:`~.inference.NMS_MODES`).
        nms_thresh: IoU threshold of IoU-guided NMS ("plain" uses the box predictor's test threshold).
        refine, pre_refine, refine_kwargs: refinement switch, boxes refined, :func:`refine_boxes` kwargs.
        score_times_iou (bool): multiply the final score by the predicted IoU.

    Refinement statistics (boxes refined, mean steps, mean predicted-IoU gain) add up over inference and are
    logged, then reset, when the module next changes mode (``model.train(mode)``): detectron2's
    ``inference_on_dataset`` restores the model's mode when an evaluation ends, so each evaluation logs its own.
    """

    @configurable
    def __init__(self, *, iou_pooler: PrRoIPooler, iou_head: IoUHead, jitter: IoUBalancedJitter,
                 nms: str = "iou_guided", nms_thresh: float = 0.5, refine: bool = True,
                 pre_refine: int = 100, refine_kwargs: Optional[dict] = None, score_times_iou: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        if nms not in NMS_MODES:
            raise ValueError(f"MODEL.IOU_NET.NMS_TEST must be one of {tuple(NMS_MODES)}, got {nms!r}"
                             + (f" ({NMS_NONE_NOTE})" if nms == "none" else ""))
        self.iou_pooler = iou_pooler
        self.iou_head = iou_head
        self.jitter = jitter
        self.nms = nms
        self.iou_nms_thresh = nms_thresh
        self.refine = refine
        self.pre_refine = pre_refine
        self.refine_kwargs = dict(refine_kwargs or {})
        self.score_times_iou = score_times_iou
        self.reset_refine_stats()

    @classmethod
    def from_config(cls, cfg, input_shape):
        if "IOU_NET" not in cfg.MODEL:
            raise KeyError("MODEL.IOU_NET is missing: call d2_refine.add_d2_refine_config(cfg) (or "
                           "add_iounet_config) before merging an IoU-Net config")
        if torch.device(cfg.MODEL.DEVICE).type == "cuda":
            require_kernels(("prroi_pool", "_prroi_pool_backward"), cfg.MODEL.DEVICE, "IoU-Net on CUDA",
                            "the pure-PyTorch PrRoIPool it would fall back to needs memory in RoIs x channels x "
                            "height x bins (out of memory, or a crawl, at COCO scale)")
        ret = super().from_config(cfg, input_shape)
        c = cfg.MODEL.IOU_NET
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        in_channels = input_shape[in_features[0]].channels
        ret["iou_pooler"] = PrRoIPooler(c.POOLER_RESOLUTION, tuple(1.0 / input_shape[k].stride for k in in_features))
        ret["iou_head"] = IoUHead(in_channels, c.POOLER_RESOLUTION, cfg.MODEL.ROI_HEADS.NUM_CLASSES, c.NUM_FC,
                                  c.FC_DIM, c.CLS_AGNOSTIC, c.LOSS, c.LOSS_WEIGHT, c.SMOOTH_L1_BETA)
        ret["jitter"] = IoUBalancedJitter(c.NUM_ROIS, c.FG_IOU, c.BIN_POOL, c.XY_STEPS, c.WH_STEPS, c.POOL_SEED)
        ret.update(nms=c.NMS_TEST, nms_thresh=c.NMS_THRESH_TEST, refine=c.REFINE_TEST,
                   pre_refine=c.REFINE_TOPK_TEST, score_times_iou=c.SCORE_TIMES_IOU_TEST,
                   refine_kwargs=dict(steps=c.REFINE_STEPS_TEST, step_size=c.REFINE_STEP_SIZE_TEST,
                                      early_stop=c.REFINE_EARLY_STOP_TEST, degrade_tol=c.REFINE_DEGRADE_TOL_TEST,
                                      revert_on_degrade=c.REFINE_REVERT_ON_DEGRADE_TEST))
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        cfg2, aligned = _swap_prroi_type(cfg, "ROI_BOX_HEAD")
        ret = super()._init_box_head(cfg2, input_shape)
        if aligned is not None:
            ret["box_pooler"] = cls._prroi_like(ret["box_pooler"], aligned)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        cfg2, aligned = _swap_prroi_type(cfg, "ROI_MASK_HEAD")
        ret = super()._init_mask_head(cfg2, input_shape)
        if aligned is not None and ret.get("mask_pooler") is not None:
            ret["mask_pooler"] = cls._prroi_like(ret["mask_pooler"], aligned)
        return ret

    @staticmethod
    def _prroi_like(pooler, aligned: bool) -> PrRoIPooler:
        scales = [2.0 ** -lvl for lvl in range(pooler.min_level, pooler.max_level + 1)]
        return PrRoIPooler(pooler.output_size, scales, aligned=aligned,
                           canonical_box_size=pooler.canonical_box_size, canonical_level=pooler.canonical_level)

    # ------------------------------------------------------------------ training
    def forward(self, images: ImageList, features: Dict[str, torch.Tensor], proposals: List[Instances],
                targets: Optional[List[Instances]] = None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        proposals, losses = super().forward(images, features, proposals, targets)
        losses.update(self._forward_iou_losses(features, targets))
        return proposals, losses

    def _forward_iou_losses(self, features: Dict[str, torch.Tensor], targets: List[Instances]):
        """``loss_iou`` on IoU-balanced RoIs jittered around each image's ground truth."""
        rois, ious, classes = [], [], []
        for t in targets:
            r, q, c = self.jitter(t.gt_boxes.tensor, t.gt_classes, t.image_size)
            rois.append(Boxes(r))
            ious.append(q)
            classes.append(c)
        pooled = self.iou_pooler([features[f] for f in self.box_in_features], rois)
        raw = self.iou_head(pooled)
        ious, classes = torch.cat(ious), torch.cat(classes)
        losses = self.iou_head.losses(raw, classes, ious)
        storage = get_event_storage()
        storage.put_scalar("iou_net/num_rois", len(ious) / max(len(targets), 1))
        if len(ious):
            with torch.no_grad():
                pred = self.iou_head.decode(self.iou_head.select(raw, classes))
                storage.put_scalar("iou_net/mae", (pred - ious).abs().mean().item())
        return losses

    # ------------------------------------------------------------------ inference
    def reset_refine_stats(self):
        """Zero the running refinement statistics (see :meth:`refine_stats`)."""
        self._refine_totals = {"images": 0, "boxes": 0, "steps": 0.0, "gain": 0.0}

    def refine_stats(self) -> Dict[str, float]:
        """Images seen, boxes refined, mean refinement steps and mean predicted-IoU gain per refined box since the
        last reset."""
        n = max(self._refine_totals["boxes"], 1)
        return {"images": self._refine_totals["images"], "boxes": self._refine_totals["boxes"],
                "mean_steps": float(self._refine_totals["steps"]) / n,
                "mean_iou_gain": float(self._refine_totals["gain"]) / n}

    def log_refine_stats(self) -> None:
        """Log the refinement statistics gathered since the last reset (if any image was seen), then reset."""
        st = self.refine_stats()
        if st["images"]:
            logger.info("IoU-Net refinement on %d images: %d boxes refined (%.1f per image), %.2f steps and "
                        "%+.4f predicted IoU per refined box on average", st["images"], st["boxes"],
                        st["boxes"] / st["images"], st["mean_steps"], st["mean_iou_gain"])
        self.reset_refine_stats()

    def train(self, mode: bool = True):
        # the end of an evaluation (detectron2's inference_context restores the mode) reports what it refined
        if getattr(self, "refine", False):
            self.log_refine_stats()
        return super().train(mode)

    def _iou_fn(self, feats: List[torch.Tensor]):
        def fn(boxes: torch.Tensor) -> torch.Tensor:
            return self.iou_head.decode(self.iou_head(self.iou_pooler(feats, [Boxes(boxes)])))

        return fn

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        if self.training or not (self.nms != "plain" or self.refine or self.score_times_iou):
            return super()._forward_box(features, proposals)
        if self.refine and is_tracing_or_exporting():
            raise RuntimeError("IoU-Net's box refinement (gradient ascent through torch.autograd.grad) cannot "
                               "be traced or exported; set "
                               "MODEL.IOU_NET.REFINE_TEST False to export the rest of IoU-Net's inference "
                               "(see docs/EXPORT.md)")
        feats = [features[f] for f in self.box_in_features]
        box_features = self.box_head(self.box_pooler(feats, [x.proposal_boxes for x in proposals]))
        predictions = self.box_predictor(box_features)
        del box_features
        all_boxes = self.box_predictor.predict_boxes(predictions, proposals)
        all_scores = self.box_predictor.predict_probs(predictions, proposals)
        if self.refine:
            # refinement differentiates the predicted IoU with respect to the boxes alone: with the maps' graph
            # (plain mode, parameters that require grad) every step would also compute the maps' gradient
            feats = [f.detach() for f in feats]
            if any(torch.is_inference(f) for f in feats):
                with torch.inference_mode(False):  # inference tensors cannot be saved for backward
                    feats = [f.clone() for f in feats]
        bp = self.box_predictor
        results = []
        for i, (boxes, scores, p) in enumerate(zip(all_boxes, all_scores, proposals)):
            out = iounet_inference_single_image(
                boxes, scores, p.image_size, self._iou_fn([f[i : i + 1] for f in feats]),
                score_thresh=bp.test_score_thresh, nms_thresh=bp.test_nms_thresh if self.nms == "plain" else
                self.iou_nms_thresh, topk=bp.test_topk_per_image, nms=self.nms,
                refine=self.refine, pre_refine=self.pre_refine, refine_kwargs=self.refine_kwargs,
                score_times_iou=self.score_times_iou)
            inst = Instances(p.image_size)
            inst.pred_boxes = Boxes(out["boxes"])
            inst.scores = out["scores"]
            inst.pred_classes = out["classes"]
            if out["ious"] is not None:
                inst.pred_ious = out["ious"]
            results.append(inst)
            # summed on the device (read when the statistics are)
            self._refine_totals["images"] += 1
            self._refine_totals["boxes"] += len(out["refine_steps"])
            self._refine_totals["steps"] = self._refine_totals["steps"] + out["refine_steps"].sum()
            self._refine_totals["gain"] = self._refine_totals["gain"] + out["refine_gain"].sum()
        return results
