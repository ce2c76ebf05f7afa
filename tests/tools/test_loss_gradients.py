"""tools/loss_gradients.py: one loss's share of the shared parameters' gradient, on a tiny IoU-Net."""
import os

import pytest

from d2_refine.utils.testing import tiny_shapes_opts
from helpers import ROOT, load_tool

pytest.importorskip("detectron2")
lg = load_tool("loss_gradients")
CONFIG = os.path.join(ROOT, "configs", "IoUNet", "iounet_R_18_FPN_shapes.yaml")


def test_share_of_the_iou_loss_and_the_clipping_counts(tmp_path):
    out = lg.main(["--config-file", CONFIG, "--loss", "loss_iou", "--batches", "2", "--json", str(tmp_path / "g.json"),
                   *tiny_shapes_opts(tmp_path)])
    assert out["parameters"] > 10 and out["batches"] == 2 and out["clip_norm"] == 2.0
    assert 0 < out["median_ratio"] <= out["max_ratio"]  # the IoU head's loss reaches the backbone
    assert (0 <= out["over_clip_without"] <= 2 * out["parameters"]
            and 0 <= out["over_clip_with"] <= 2 * out["parameters"])
    assert (tmp_path / "g.json").is_file()
    top = out["top"]  # the parameters the loss reaches most, largest ratio first, the maximum among them
    assert len(top) == 5 and all(t["name"].startswith("backbone") for t in top)
    assert [t["median_ratio"] for t in top] == sorted((t["median_ratio"] for t in top), reverse=True)
    assert top[0]["median_ratio"] <= out["max_ratio"]
    with pytest.raises(SystemExit, match="not a loss of this model"):
        lg.main(["--config-file", CONFIG, "--loss", "loss_nope", "--batches", "1", *tiny_shapes_opts(tmp_path)])
    with pytest.raises(SystemExit, match="no trainable parameter"):
        lg.main(["--config-file", CONFIG, "--loss", "loss_iou", "--prefix", "nothing", *tiny_shapes_opts(tmp_path)])


def test_full_model_clipping_is_reported(tmp_path):
    """``CLIP_TYPE "full_model"`` clips the norm of all the model's gradients together (d2_refine/solver/build.py):
    the tool counts the batches whose total norm exceeds it, with and without the loss (it reported no clipping)."""
    opts = ["SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1e-6"]
    out = lg.main(["--config-file", CONFIG, "--loss", "loss_iou", "--batches", "2", *tiny_shapes_opts(tmp_path), *opts])
    assert out["clip_type"] == "full_model" and out["clip_norm"] == 1e-6
    assert out["over_clip_without"] == 2 and out["over_clip_with"] == 2  # every batch's total norm is over 1e-6
    assert len(out["total_norm_without"]) == len(out["total_norm_with"]) == 2
    assert all(w > 0 for w in out["total_norm_with"])
