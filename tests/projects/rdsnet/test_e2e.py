"""End to end on a tiny `shapes` set: the shared Trainer trains RDSNet (MBRM on at evaluation) a few iterations
and COCOEvaluator scores both bbox and segm."""
import math
import os

import pytest

pytest.importorskip("detectron2")

from d2_refine.utils.testing import read_losses, smoke_train  # noqa: E402
from helpers import ROOT  # noqa: E402

_CONFIG = os.path.join(ROOT, "configs", "RDSNet", "rdsnet_R_18_FPN_shapes.yaml")


def test_smoke_train_and_coco_eval_bbox_and_segm(tmp_path):
    smoke_train(_CONFIG, tmp_path, ["MODEL.RDSNET.MBRM.ENABLED", "True"])
    # the evaluation at the end of training is logged to metrics.json as "<task>/<metric>"
    for task in ("bbox", "segm"):
        ap = read_losses(tmp_path, f"{task}/AP")
        assert len(ap) == 1 and (math.isfinite(ap[0]) or math.isnan(ap[0]))
    losses = read_losses(tmp_path, "loss_mask")
    assert losses and all(math.isfinite(v) for v in losses)
    assert os.path.exists(tmp_path / "model_final.pth")
