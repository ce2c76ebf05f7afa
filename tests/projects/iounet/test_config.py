import pytest

from d2_refine.projects.iounet.config import add_iounet_config
from helpers import bare_model_cfg


def _cfg():
    return bare_model_cfg()


def test_second_call_keeps_values():
    cfg = add_iounet_config(_cfg())
    cfg.MODEL.IOU_NET.REFINE_STEPS_TEST = 3
    add_iounet_config(cfg)
    assert cfg.MODEL.IOU_NET.REFINE_STEPS_TEST == 3


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
    f.write_text("MODEL:\n  IOU_NET:\n    REFINE_STEPS_TEST: 2\n    LOSS: bce\n")
    cfg.merge_from_file(str(f))
    assert cfg.MODEL.IOU_NET.REFINE_STEPS_TEST == 2 and cfg.MODEL.IOU_NET.LOSS == "bce"


@pytest.mark.parametrize("old,new", [("IOU_NMS", "NMS_TEST"), ("NMS_GUIDE", "NMS_TEST"),
                                     ("NMS_THRESH", "NMS_THRESH_TEST"), ("REFINE", "REFINE_TEST"),
                                     ("PRE_REFINE", "REFINE_TOPK_TEST"), ("STEPS", "REFINE_STEPS_TEST"),
                                     ("SCORE_TIMES_IOU", "SCORE_TIMES_IOU_TEST")])
def test_old_names_are_one_line_errors_naming_the_new_key(tmp_path, old, new):
    cfg = add_iounet_config(_cfg())
    msg = f"MODEL.IOU_NET.{old} was renamed to MODEL.IOU_NET.{new};"
    with pytest.raises(KeyError, match=msg):
        cfg.merge_from_list([f"MODEL.IOU_NET.{old}", "1"])
    f = tmp_path / "old.yaml"
    f.write_text(f"MODEL:\n  IOU_NET:\n    {old}: 1\n")
    with pytest.raises(KeyError, match=msg) as e:
        cfg.merge_from_file(str(f))
    assert "\n" not in str(e.value)
    if new == "NMS_TEST":  # the note says how the old values map
        assert '-> "plain"' in str(e.value)
