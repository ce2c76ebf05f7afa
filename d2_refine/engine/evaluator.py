"""COCOEvaluator that also reports AP at single IoU thresholds (AP60, AP70, AP80, AP90), read from the same
COCOeval precision array as AP50/AP75, for localisation-quality comparisons."""
import logging

import numpy as np
from detectron2.evaluation import COCOEvaluator

EXTRA_IOU_THRESHOLDS = (0.6, 0.7, 0.8, 0.9)


def ap_at_iou(coco_eval, iou: float) -> float:
    """AP (in %) at one IoU threshold, all areas, maxDets 100, from ``coco_eval.eval["precision"]``."""
    thrs = coco_eval.params.iouThrs
    t = int(np.argmin(np.abs(thrs - iou)))
    if abs(thrs[t] - iou) > 1e-6:
        raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {list(thrs)}")
    precision = coco_eval.eval["precision"][t, :, :, 0, -1]  # (recall, class)
    valid = precision[precision > -1]
    return float(valid.mean() * 100) if valid.size else float("nan")


def drop_invalid_polygons(coco_api, json_file: str = "") -> int:
    """Remove from the ground truth of ``coco_api`` (a pycocotools COCO) the polygons of fewer than three points,
    and the (non-crowd or crowd) annotations left without one, as detectron2's ``load_coco_json`` does for
    training; pycocotools would fail on them (a 2-point polygon reads as a box). Returns how many annotations were
    removed, with a warning."""
    annotations, kept, fixed = coco_api.dataset.get("annotations", []), [], 0
    for ann in annotations:
        segm = ann.get("segmentation")
        if isinstance(segm, list) and segm and isinstance(segm[0], list):
            valid = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
            if len(valid) != len(segm):
                fixed += 1
                if not valid:
                    continue
                ann["segmentation"] = valid
        kept.append(ann)
    removed = len(annotations) - len(kept)
    if fixed:
        coco_api.dataset["annotations"] = kept
        coco_api.createIndex()
        logging.getLogger(__name__).warning(
            "%s: %d annotations had polygons of fewer than 3 points: those polygons are ignored in evaluation, and "
            "the %d annotations left without a polygon too (as in training).", json_file or "ground truth", fixed,
            removed)
    return removed


class D2RefineCOCOEvaluator(COCOEvaluator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        drop_invalid_polygons(self._coco_api, getattr(self._metadata, "json_file", ""))

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if iou_type != "keypoints":
            for iou in EXTRA_IOU_THRESHOLDS:  # NaN like the other metrics when there is nothing to evaluate
                results[f"AP{int(round(iou * 100))}"] = float("nan") if coco_eval is None else ap_at_iou(coco_eval, iou)
        return results
