"""Smoke tests of the shared trainer: a few iterations of each baseline on tiny shapes images, then
COCOEvaluator; --eval-only on the checkpoint reproduces the AP; images without annotations are fine."""
import math
import os

import pytest

from helpers import ROOT

pytest.importorskip("detectron2")

BASELINES = {
    "faster_rcnn": ("configs/Baselines/faster_rcnn_R_18_FPN_shapes.yaml", ["bbox"]),
    "mask_rcnn": ("configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml", ["bbox", "segm"]),
    "retinanet": ("configs/Baselines/retinanet_R_18_FPN_shapes.yaml", ["bbox"]),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_trains_and_is_scored(name, tmp_path):
    from d2_refine.utils.testing import read_losses, smoke_train

    config, tasks = BASELINES[name]
    results = smoke_train(os.path.join(ROOT, config), tmp_path)
    assert sorted(results) == tasks
    for task in tasks:
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP90"):
            assert key in results[task]
            assert math.isfinite(results[task][key]) or key in ("APs", "APm", "APl")
    losses = read_losses(tmp_path)
    assert losses and all(math.isfinite(v) for v in losses)
    assert os.path.exists(tmp_path / "model_final.pth")


def test_eval_only_reproduces_training_ap(tmp_path):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_refine.engine import Trainer, setup_cfg
    from d2_refine.utils.testing import smoke_train, tiny_shapes_opts

    config = os.path.join(ROOT, BASELINES["mask_rcnn"][0])
    trained = smoke_train(config, tmp_path)
    cfg = setup_cfg(config, tiny_shapes_opts(tmp_path) + ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    with torch.no_grad():
        again = Trainer.test(cfg, model)
    for task in ("bbox", "segm"):
        for key, value in trained[task].items():
            if math.isfinite(value):
                assert again[task][key] == pytest.approx(value, abs=1e-6), (task, key)


def test_training_step_with_empty_and_half_empty_images():
    from detectron2.modeling import build_model

    from d2_refine.engine import setup_cfg
    from d2_refine.utils.testing import synthetic_batch, train_step_losses

    for name, (config, _) in BASELINES.items():
        cfg = setup_cfg(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu"])
        model = build_model(cfg)
        losses = train_step_losses(model, synthetic_batch(boxes_per_image=((3, 1), (0, 2))))
        assert losses, name
        losses = train_step_losses(model, synthetic_batch(boxes_per_image=((0, 3), (0, 4))))
        assert all(v >= 0 for v in losses.values()), name


def test_trainer_builds_what_default_trainer_builds(tmp_path):
    """Trainer writes DefaultTrainer's constructor itself (for CPU DistributedDataParallel): on one process it must
    build the same attributes, trainer loop, scheduler and hooks as detectron2's, whatever detectron2's version."""
    from detectron2.engine import DefaultTrainer

    from d2_refine.utils.testing import smoke_trainer

    ours = smoke_trainer(os.path.join(ROOT, BASELINES["faster_rcnn"][0]), tmp_path, ["SOLVER.EXACT_RESUME", "False"])
    theirs = DefaultTrainer(ours.cfg)
    assert set(vars(ours)) == set(vars(theirs))
    for name in ("_trainer", "scheduler", "model", "optimizer", "data_loader"):
        # by name: detectron2 makes a new optimizer class (gradient clipping) for each optimizer it builds
        assert type(getattr(ours, name)).__qualname__ == type(getattr(theirs, name)).__qualname__, name
    # a DetectionCheckpointer that names a checkpoint it cannot read
    assert isinstance(ours.checkpointer, type(theirs.checkpointer))
    assert type(ours.checkpointer).__qualname__ == "CheckedCheckpointer"
    assert [type(h) for h in ours._hooks] == [type(h) for h in theirs._hooks]
    assert (ours.start_iter, ours.max_iter) == (theirs.start_iter, theirs.max_iter)
