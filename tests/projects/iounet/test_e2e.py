import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

from d2_refine.utils.testing import read_losses, smoke_train, tiny_shapes_opts  # noqa: E402
from helpers import ROOT  # noqa: E402

CONFIG = os.path.join(ROOT, "configs/IoUNet/iounet_R_18_FPN_shapes.yaml")
OPTS = ["MODEL.IOU_NET.NUM_ROIS", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


def test_smoke_train_evaluate_and_ablate_shapes_config(tmp_path):
    results = smoke_train(CONFIG, tmp_path, OPTS)
    assert "bbox" in results and all(k in results["bbox"] for k in ("AP", "AP50", "AP75", "AP90"))
    assert all(math.isfinite(v) for v in read_losses(tmp_path, "loss_iou"))
    assert len(read_losses(tmp_path, "loss_iou")) > 0

    # tools/iounet_ablation.py on the trained checkpoint: every row scored on the same images, the
    # Faster R-CNN baseline row included (its config, the same weights loaded where the names match).
    weights = os.path.join(tmp_path, "model_final.pth")
    out = os.path.join(tmp_path, "ablation")
    opts = tiny_shapes_opts(tmp_path) + OPTS
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/iounet_ablation.py"), "--config-file", CONFIG,
                    "--weights", weights, "--baseline-weights", weights, "--max-images", "2", "--output", out,
                    *opts], check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.load(open(os.path.join(out, "ablation.json")))
    assert report["images"] == 2
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["Faster R-CNN baseline", "IoU head only (unused at test)", "+ IoU-guided NMS",
                          "+ IoU-guided NMS + refinement (full)", "+ refinement, plain NMS",
                          "full, NMS ranked by cls x IoU"]
    for r in rows.values():
        assert r["ms_per_img"] > 0
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("AP", "AP50"))
    # the refinement rows report what the refinement did; the others do not refine
    assert rows["+ IoU-guided NMS + refinement (full)"]["refinement"].startswith("refined")
    assert rows["+ IoU-guided NMS"]["refinement"] == ""
