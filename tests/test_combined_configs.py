"""Every config in configs/Combined/ builds the components it names (methods composed by registry name only) and
trains a few iterations on tiny shapes images, with finite losses, then is scored by COCOEvaluator."""
import glob
import math
import os

import pytest

pytest.importorskip("detectron2")

from helpers import ROOT  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "Combined", "*.yaml")))
# CPU budget of the smoke run: fewer IoU-Net RoIs and test proposals; IFR leaves its explicit warm-up after one
# iteration so the implicit (DEQ) path trains too
SMOKE_OPTS = ["MODEL.IOU_NET.NUM_ROIS", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.IFR.PRETRAIN_STEPS", "1"]


def test_there_are_combined_configs():
    assert len(CONFIGS) >= 3


def _expected_modules(cfg):
    """Class names the model must contain: FPT's backbone plus the method's ROI heads or mask head."""
    names = {"FPTBackbone"}
    if cfg.MODEL.ROI_HEADS.NAME != "StandardROIHeads":
        names.add(cfg.MODEL.ROI_HEADS.NAME)
    if cfg.MODEL.MASK_ON and cfg.MODEL.ROI_MASK_HEAD.NAME != "MaskRCNNConvUpsampleHead":
        names.add(cfg.MODEL.ROI_MASK_HEAD.NAME)
    return names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_combined_config_builds_trains_and_is_scored(path, tmp_path):
    from d2_refine.utils.testing import read_losses, smoke_trainer

    trainer = smoke_trainer(path, tmp_path, SMOKE_OPTS)
    cfg = trainer.cfg
    expected = _expected_modules(cfg)
    assert len(expected) >= 2, "a combined config composes FPT with another method"
    classes = {type(m).__name__ for m in trainer.model.modules()}
    assert expected <= classes, f"missing {expected - classes}"

    trainer.train()  # detectron2's EvalHook evaluates after the last iteration
    results = trainer._last_eval_results
    tasks = ["bbox", "segm"] if cfg.MODEL.MASK_ON else ["bbox"]
    assert sorted(results) == tasks
    for task in tasks:
        assert math.isfinite(results[task]["AP"]), (task, results[task])
    losses = read_losses(tmp_path)
    assert len(losses) > 0 and all(math.isfinite(v) for v in losses)
