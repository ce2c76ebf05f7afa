"""Checks before launch (d2_refine/engine/checks.py) and the trainer's device decision for DistributedDataParallel."""
import os

import pytest

from helpers import ROOT

pytest.importorskip("detectron2")

CONFIG = os.path.join(ROOT, "configs", "Baselines", "faster_rcnn_R_18_FPN_shapes.yaml")


@pytest.mark.parametrize("weights", ["detectron2://ImageNetPretrained/MSRA/R-50.pkl",
                                     "detectron2://ImageNetPretrained/torchvision/R-50.pkl",
                                     "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-101.pkl",
                                     "catalog://ImageNetPretrained/MSRA/R-50",
                                     "d2_refine://pretrained/R-18-shapes.pkl"])
def test_eval_only_refuses_backbone_only_weights(weights, tmp_path):
    from d2_refine.engine import ConfigError, check_weights, setup_cfg

    cfg = setup_cfg(CONFIG, ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ConfigError, match="only initialises the backbone") as e:
        check_weights(cfg, eval_only=True)
    assert str(tmp_path / "model_final.pth") in str(e.value) and "\n" not in str(e.value)
    check_weights(cfg)  # training from them is what they are for
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    check_weights(cfg, eval_only=True, resume=True)  # --resume evaluates OUTPUT_DIR's checkpoint


def test_trained_model_zoo_weights_are_accepted():
    from d2_refine.engine import check_weights, setup_cfg

    trained = "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x/137260431/model_final_a54504.pkl"
    check_weights(setup_cfg(CONFIG, ["MODEL.WEIGHTS", trained]), eval_only=True)


def test_amp_off_cuda_is_refused_in_one_line_before_the_trainer_builds_anything(monkeypatch):
    """detectron2's AMPTrainer asserts CUDA at its first step, after the data and the model are built; the check
    names the key and the fix instead, and lets AMP through on CUDA and with AMP off."""
    import d2_refine.engine.trainer as trainer_module
    from d2_refine.engine import ConfigError, Trainer, check_amp, setup_cfg

    cfg = setup_cfg(CONFIG, ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"])
    with pytest.raises(ConfigError, match=r"^SOLVER.AMP.ENABLED: .*needs a CUDA device, and MODEL.DEVICE is 'cpu'") \
            as e:
        check_amp(cfg)
    assert "set SOLVER.AMP.ENABLED False" in str(e.value) and "\n" not in str(e.value)
    built = []
    monkeypatch.setattr(trainer_module.Trainer, "build_model", classmethod(lambda cls, cfg: built.append(cfg)))
    with pytest.raises(ConfigError, match="SOLVER.AMP.ENABLED"):
        Trainer(cfg)
    assert not built, "the model was built before the check"
    check_amp(setup_cfg(CONFIG, ["MODEL.DEVICE", "cpu"]))  # AMP off: nothing to refuse
    on_cuda = setup_cfg(CONFIG, ["SOLVER.AMP.ENABLED", "True"], freeze=False)
    on_cuda.MODEL.DEVICE = "cuda:0"  # set after setup_cfg, which falls back to the CPU where CUDA is absent
    check_amp(on_cuda)


@pytest.mark.parametrize("device,device_ids", [("cpu", {"device_ids": None}), ("cpu:0", {"device_ids": None}),
                                               ("cuda", {}), ("cuda:1", {})])
def test_ddp_gets_no_device_ids_for_any_cpu_spelling(device, device_ids):
    """``MODEL.DEVICE cpu:0 --num-gpus 2`` passed device ids to DistributedDataParallel, which refuses them for a CPU
    model: the device type decides, not the string."""
    from d2_refine.engine import setup_cfg
    from d2_refine.engine.trainer import ddp_device_kwargs

    cfg = setup_cfg(CONFIG, freeze=False)
    cfg.MODEL.DEVICE = device  # set after setup_cfg, which falls back to the CPU where CUDA is absent
    assert ddp_device_kwargs(cfg) == device_ids


def test_trainer_wraps_a_cpu0_model_without_device_ids(tmp_path, monkeypatch):
    """What Trainer's constructor passes to create_ddp_model for MODEL.DEVICE cpu:0 (one process here)."""
    import d2_refine.engine.trainer as trainer_module
    from d2_refine.utils.testing import smoke_trainer

    seen = []

    def create_ddp_model(model, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(trainer_module, "create_ddp_model", create_ddp_model)
    smoke_trainer(CONFIG, tmp_path, ["MODEL.DEVICE", "cpu:0"])
    assert seen == [{"broadcast_buffers": False, "device_ids": None}]
