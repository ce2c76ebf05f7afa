"""MODEL.INTERNET defaults (paper and original-code settings) on a plain fvcore CfgNode, no detectron2 needed."""
from fvcore.common.config import CfgNode as CN
from helpers import bare_model_cfg

from d2_refine.projects.internet.config import add_internet_config


def _cfg():
    return bare_model_cfg(add_internet_config)


def test_defaults_are_the_released_setting():
    c = _cfg().MODEL.INTERNET
    assert c.ENABLED and c.ASSIGNMENT == "fpn" and c.FEAT_POOL_SIZE == 14 and c.CRITIC_DIM == 1024
    assert (c.MAKEUP.NUM_CONV, c.MAKEUP.UPSAMPLE_FACTOR, c.MAKEUP.MULTI) == (1, 1, False)
    assert (c.LOSS, c.LOSS_WEIGHT, c.BUFFER_SIZE, c.INSTANCE_LEVEL, c.WARMUP_ITERS) == ("l2", 10.0, 1, False, 0)
    assert list(c.LEVELS) == ["p2", "p3", "p4"]
    assert (c.OT.EPSILON, c.OT.ITERS, c.OT.COST) == (1.0, 5, "sqeuclidean")


def test_adding_twice_keeps_user_values():
    cfg = _cfg()
    cfg.MODEL.INTERNET.LOSS = "ot"
    add_internet_config(cfg)
    assert cfg.MODEL.INTERNET.LOSS == "ot"


def test_yaml_merge_of_nested_nodes():
    cfg = _cfg()
    cfg.merge_from_other_cfg(CN({"MODEL": {"INTERNET": {"OT": {"ITERS": 7}, "MAKEUP": {"NORM": "BN"}}}}))
    assert cfg.MODEL.INTERNET.OT.ITERS == 7 and cfg.MODEL.INTERNET.MAKEUP.NORM == "BN"
