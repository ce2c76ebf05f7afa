from fvcore.common.config import CfgNode as CN

from d2_refine.projects.iounet.config import add_iounet_config


def _cfg():
    cfg = CN()
    cfg.MODEL = CN()
    return cfg


def test_adds_spec_defaults():
    cfg = add_iounet_config(_cfg())
    c = cfg.MODEL.IOU_NET
    assert (c.POOLER_RESOLUTION, c.NUM_FC, c.FC_DIM, c.CLS_AGNOSTIC) == (7, 2, 1024, False)
    assert (c.LOSS, c.LOSS_WEIGHT, c.SMOOTH_L1_BETA) == ("smooth_l1", 5.0, 1.0)
    assert (c.NUM_ROIS, c.FG_IOU, c.BIN_POOL, c.XY_STEPS, c.WH_STEPS) == (1000, 0.5, 4000, 16, 16)
    assert (c.NMS_GUIDE, c.NMS_THRESH, c.IOU_NMS, c.REFINE, c.PRE_REFINE) == ("rank", 0.5, True, True, 100)
    assert (c.STEPS, c.STEP_SIZE, c.EARLY_STOP, c.DEGRADE_TOL) == (5, 0.5, 0.001, -0.01)
    assert (c.REVERT_ON_DEGRADE, c.SCORE_TIMES_IOU) == (False, True)


def test_second_call_keeps_values():
    cfg = add_iounet_config(_cfg())
    cfg.MODEL.IOU_NET.STEPS = 3
    add_iounet_config(cfg)
    assert cfg.MODEL.IOU_NET.STEPS == 3


def test_unknown_key_is_rejected():
    import pytest

    cfg = add_iounet_config(_cfg())
    with pytest.raises((KeyError, AssertionError), match="NOT_A_KEY"):
        cfg.merge_from_list(["MODEL.IOU_NET.NOT_A_KEY", 1])


def test_merges_yaml_into_detectron2_cfg(tmp_path):
    import pytest

    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    cfg = add_iounet_config(get_cfg())
    f = tmp_path / "c.yaml"
    f.write_text("MODEL:\n  IOU_NET:\n    STEPS: 2\n    LOSS: bce\n")
    cfg.merge_from_file(str(f))
    assert cfg.MODEL.IOU_NET.STEPS == 2 and cfg.MODEL.IOU_NET.LOSS == "bce"
