"""End to end on a tiny `shapes` set: the shared Trainer trains RDSNet (MBRM on at evaluation) a few iterations
and COCOEvaluator scores both bbox and segm."""
import math
import os

import pytest

pytest.importorskip("detectron2")

from d2_refine.utils.testing import read_losses, smoke_trainer  # noqa: E402
from helpers import ROOT  # noqa: E402

_CONFIG = os.path.join(ROOT, "configs", "RDSNet", "rdsnet_R_18_FPN_shapes.yaml")


def test_smoke_train_and_coco_eval_bbox_and_segm(tmp_path):
    trainer = smoke_trainer(_CONFIG, tmp_path, ["MODEL.RDSNET.MBRM.ENABLED", "True"])
    refined = []  # boxes MBRM refined at the evaluation
    trainer.model.mbrm.register_forward_hook(lambda module, args, out: refined.append(len(out)))
    trainer.train()  # detectron2's EvalHook evaluates after the last iteration
    # the evaluation at the end of training is logged to metrics.json as "<task>/<metric>"; COCOEvaluator gives NaN
    # where the model detected nothing
    aps = {task: read_losses(tmp_path, f"{task}/AP") for task in ("bbox", "segm")}
    for ap in aps.values():
        assert len(ap) == 1 and (math.isnan(ap[0]) or 0 <= ap[0] <= 100), ap
    if not math.isnan(aps["bbox"][0]):  # detections were scored: MBRM refined their boxes
        assert sum(refined) > 0
    losses = read_losses(tmp_path, "loss_mask")
    assert losses and all(math.isfinite(v) for v in losses)
    assert os.path.exists(tmp_path / "model_final.pth")
