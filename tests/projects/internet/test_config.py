"""MODEL.INTERNET defaults (paper and original-code settings) on a plain fvcore CfgNode, no detectron2 needed."""
from fvcore.common.config import CfgNode as CN

from d2_refine.projects.internet.config import add_internet_config
from helpers import bare_model_cfg


def _cfg():
    return bare_model_cfg(add_internet_config)


def test_adding_twice_keeps_user_values():
    cfg = _cfg()
    cfg.MODEL.INTERNET.LOSS = "ot"
    add_internet_config(cfg)
    assert cfg.MODEL.INTERNET.LOSS == "ot"


def test_yaml_merge_of_nested_nodes():
    cfg = _cfg()
    cfg.merge_from_other_cfg(CN({"MODEL": {"INTERNET": {"OT": {"ITERS": 7}, "MAKEUP": {"NORM": "BN"}}}}))
    assert cfg.MODEL.INTERNET.OT.ITERS == 7 and cfg.MODEL.INTERNET.MAKEUP.NORM == "BN"
