import math
import os

import pytest

pytest.importorskip("detectron2")

from d2_refine.utils.testing import read_losses, smoke_train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_smoke_train_and_evaluate_shapes_config(tmp_path):
    cfg = os.path.join(ROOT, "configs/IoUNet/iounet_R_18_FPN_shapes.yaml")
    results = smoke_train(cfg, tmp_path, ["MODEL.IOU_NET.NUM_ROIS", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"])
    assert "bbox" in results and all(k in results["bbox"] for k in ("AP", "AP50", "AP75", "AP90"))
    assert all(math.isfinite(v) for v in read_losses(tmp_path, "loss_iou"))
    assert len(read_losses(tmp_path, "loss_iou")) > 0
