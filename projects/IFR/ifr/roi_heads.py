"""``IFRCascadeROIHeads``: detectron2's Cascade R-CNN ROI heads that drop non-finite boxes between stages.

detectron2's ``CascadeROIHeads`` turns each stage's predicted boxes into the next stage's proposals with
``Boxes.clip``, which asserts that every box is finite: one RoI whose features (hence deltas) are inf or NaN stops
inference with an AssertionError, where the single-stage heads (``fast_rcnn_inference``) just drop such
detections. Here the rows with a non-finite box leave the cascade after the stage that produced them — together
with their scores from the earlier stages, which the last stage averages with its own — so such inputs give no
detection for those RoIs instead of an assertion. Finite boxes give exactly detectron2's result.
"""
from typing import List

import torch
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

__all__ = ["IFRCascadeROIHeads"]


def _finite_rows(boxes: torch.Tensor) -> torch.Tensor:
    """Tensor[R] bool: rows of ``boxes`` (Tensor[R, 4k]) whose coordinates are all finite."""
    return torch.isfinite(boxes).all(dim=1)


@ROI_HEADS_REGISTRY.register()
class IFRCascadeROIHeads(CascadeROIHeads):
    """``CascadeROIHeads`` (same configuration, weights and results on finite inputs) whose stages pass only finite
    boxes on; used by IFR's Cascade Mask R-CNN configs."""

    def _create_proposals_from_boxes(self, boxes: List[torch.Tensor], image_sizes):
        if self.training:  # training proposals need no alignment across stages (detectron2 drops empty ones too)
            boxes = [b[_finite_rows(b)] for b in boxes]
        return super()._create_proposals_from_boxes(boxes, image_sizes)

    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        scores_per_stage = []  # [stage][image] Tensor[R_i, K + 1], rows aligned with the current boxes
        boxes = None
        for k in range(self.num_cascade_stages):
            if k > 0:
                keep = [_finite_rows(b) for b in boxes]
                boxes = [b[m] for b, m in zip(boxes, keep)]
                scores_per_stage = [[s[m] for s, m in zip(stage, keep)] for stage in scores_per_stage]
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictor = self.box_predictor[k]
            predictions = self._run_stage(features, proposals, k)
            boxes = predictor.predict_boxes(predictions, proposals)
            scores_per_stage.append(predictor.predict_probs(predictions, proposals))
        # the scores averaged over the stages, the boxes of the last one (as CascadeROIHeads)
        scores = [sum(per_image) * (1.0 / self.num_cascade_stages) for per_image in zip(*scores_per_stage)]
        pred_instances, _ = fast_rcnn_inference(boxes, scores, image_sizes, predictor.test_score_thresh,
                                                predictor.test_nms_thresh, predictor.test_topk_per_image)
        return pred_instances
