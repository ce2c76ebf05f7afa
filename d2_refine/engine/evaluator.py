"""COCOEvaluator that also reports AP at single IoU thresholds (AP60, AP70, AP80, AP90), read from the same
COCOeval precision array as AP50/AP75, for localisation-quality comparisons."""
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


class D2RefineCOCOEvaluator(COCOEvaluator):
    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if iou_type != "keypoints":
            for iou in EXTRA_IOU_THRESHOLDS:  # NaN like the other metrics when there is nothing to evaluate
                results[f"AP{int(round(iou * 100))}"] = float("nan") if coco_eval is None else ap_at_iou(coco_eval, iou)
        return results
