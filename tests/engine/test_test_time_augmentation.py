"""TEST.AUG.ENABLED: detectron2's GeneralizedRCNNWithTTA evaluation after the plain one (results keyed "<task>_TTA"),
for every R-CNN method of the project; one line before launch for the models it cannot wrap."""
import math
import os

import pytest

from helpers import ROOT

pytest.importorskip("detectron2")

TTA = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(96, 128)", "TEST.AUG.MAX_SIZE", "128",
       "TEST.AUG.FLIP", "True"]
# every R-CNN config family of the project: GeneralizedRCNNWithTTA runs their ROI heads on given boxes for masks
RCNN_CONFIGS = [
    "Baselines/faster_rcnn_R_18_FPN_shapes.yaml",
    "Baselines/cascade_mask_rcnn_R_18_FPN_shapes.yaml",
    "IoUNet/iounet_R_18_FPN_shapes.yaml",
    "IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml",
    "IFR/ifr_cascade_mask_rcnn_R_18_FPN_shapes.yaml",
    "InterNet/internet_l2_R_18_FPN_shapes.yaml",
    "FPT/mask_rcnn_fpt_lite_R_18_shapes.yaml",
]


def test_training_then_tta_evaluation_and_expected_results(tmp_path):
    from d2_refine.engine import Trainer
    from d2_refine.utils.testing import smoke_trainer

    config = os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes.yaml")
    trainer = smoke_trainer(config, tmp_path, TTA)
    trainer.train()
    results = trainer._last_eval_results
    assert sorted(results) == ["bbox", "bbox_TTA", "segm", "segm_TTA"]
    for task in results:
        assert math.isfinite(results[task]["AP50"]), task
    assert (tmp_path / "inference_TTA" / "shapes_val" / "coco_instances_results.json").is_file()

    # --eval-only's evaluation: the same results again, checked against TEST.EXPECTED_RESULTS as detectron2 does
    cfg = trainer.cfg.clone()
    cfg.defrost()
    cfg.TEST.EXPECTED_RESULTS = [["bbox_TTA", "AP50", results["bbox_TTA"]["AP50"], 1e-6]]
    again = Trainer.evaluate(cfg, trainer.model)
    assert again["bbox_TTA"]["AP50"] == pytest.approx(results["bbox_TTA"]["AP50"], abs=1e-6)
    cfg.TEST.EXPECTED_RESULTS = [["bbox_TTA", "AP50", results["bbox_TTA"]["AP50"] + 50, 1e-6]]
    with pytest.raises(SystemExit):
        Trainer.evaluate(cfg, trainer.model)


@pytest.mark.parametrize("config", RCNN_CONFIGS)
def test_every_rcnn_method_runs_under_tta(config):
    import torch
    from detectron2.modeling import GeneralizedRCNNWithTTA

    from d2_refine.engine import Trainer, check_test_aug, setup_cfg

    cfg = setup_cfg(os.path.join(ROOT, "configs", config),
                    TTA + ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    check_test_aug(cfg)  # accepted
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    image = (torch.rand(3, 112, 128) * 255).to(torch.uint8)
    with torch.no_grad():
        out = GeneralizedRCNNWithTTA(cfg, model)([{"image": image, "height": 112, "width": 128}])[0]["instances"]
    assert out.image_size == (112, 128) and len(out) > 0
    assert torch.isfinite(out.pred_boxes.tensor).all()
    if cfg.MODEL.MASK_ON:
        assert out.pred_masks.shape[-2:] == (112, 128)


@pytest.mark.parametrize("config,arch", [("Baselines/retinanet_R_18_FPN_shapes.yaml", "RetinaNet"),
                                         ("RDSNet/rdsnet_R_18_FPN_shapes.yaml", "RDSNet")])
def test_tta_of_one_stage_models_is_refused(config, arch):
    from d2_refine.engine import ConfigError, check_test_aug, setup_cfg

    cfg = setup_cfg(os.path.join(ROOT, "configs", config), TTA)
    with pytest.raises(ConfigError, match=f"META_ARCHITECTURE {arch}: set TEST.AUG.ENABLED False") as e:
        check_test_aug(cfg)
    assert "\n" not in str(e.value)
    cfg = setup_cfg(os.path.join(ROOT, "configs", config))
    check_test_aug(cfg)  # TTA off: nothing to refuse
