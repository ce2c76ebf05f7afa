"""MODEL.FPT: keys, idempotence, presets (detectron2-free)."""
import pytest
from fvcore.common.config import CfgNode as CN

from d2_refine.projects.fpt.config import FPT_PRESETS, add_fpt_config, resolve_fpt_config


def _cfg():
    cfg = CN({"MODEL": {}})
    add_fpt_config(cfg)
    return cfg


def test_defaults_follow_the_spec():
    c = _cfg().MODEL.FPT
    assert (c.PRESET, c.WRAPPED_BACKBONE, c.IN_FEATURES, c.INPUT, c.NORM) == \
        ("", "build_resnet_fpn_backbone", [], "fpn", "GN")
    assert (c.FUSE_KERNEL, c.FUSE_NORM, c.CROSS_RANGE, c.ATTN_IMPL, c.QUERY_CHUNK) == (3, "", "all", "auto", 4096)
    assert (c.ST.ENABLED, c.ST.LEVELS, c.ST.MIXTURES, c.ST.POOL_KV, c.ST.SHARE_QK, c.ST.DROPOUT, c.ST.SCALE) == \
        (True, [], 2, True, True, 0.1, 0.0)
    assert (c.GT.ENABLED, c.GT.MODE, c.GT.INTER_CHANNELS, c.GT.MIXTURES, c.GT.TEMPERATURE) == \
        (True, "euclidean", 0, 1, 0.0)
    assert (c.RT.ENABLED, c.RT.ORDER) == (True, "conv_then_weight")


def test_add_twice_is_a_noop():
    cfg = _cfg()
    cfg.MODEL.FPT.NORM = "BN"
    add_fpt_config(cfg)
    assert cfg.MODEL.FPT.NORM == "BN"


def test_nodes_take_the_class_of_the_config():
    class MyCN(CN):
        pass

    cfg = MyCN({"MODEL": {}})
    add_fpt_config(cfg)
    assert type(cfg.MODEL.FPT) is MyCN and type(cfg.MODEL.FPT.ST) is MyCN


@pytest.mark.parametrize("preset", sorted(FPT_PRESETS))
def test_presets_set_their_keys(preset):
    cfg = _cfg()
    cfg.MODEL.FPT.PRESET = preset
    out = resolve_fpt_config(cfg)
    for key, value in FPT_PRESETS[preset].items():
        node = out
        for part in key.split("."):
            node = node[part]
        assert node == value
    assert cfg.MODEL.FPT.NORM == "GN"  # the input config is left untouched


def test_fpt_lite_and_release_contents():
    cfg = _cfg()
    cfg.MODEL.FPT.PRESET = "fpt_lite"
    lite = resolve_fpt_config(cfg)
    assert (lite.IN_FEATURES, lite.ST.LEVELS, lite.GT.MODE, lite.FUSE_KERNEL) == (["p3", "p4", "p5"], ["p4", "p5"],
                                                                                  "dot", 1)
    cfg.MODEL.FPT.PRESET = "fpt_release"
    rel = resolve_fpt_config(cfg)
    assert (rel.INPUT, rel.GT.MODE, rel.NORM) == ("lateral", "dot", "BN")
    cfg.MODEL.FPT.PRESET = "fpt_paper"
    paper = resolve_fpt_config(cfg)
    paper.PRESET = ""
    assert paper == resolve_fpt_config(_cfg())  # fpt_paper = the defaults


def test_explicit_keys_override_the_preset():
    cfg = _cfg()
    cfg.MODEL.FPT.PRESET = "fpt_lite"
    cfg.MODEL.FPT.GT.MODE = "euclidean"  # the default: the preset wins (documented)
    cfg.MODEL.FPT.FUSE_KERNEL = 5
    cfg.MODEL.FPT.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    out = resolve_fpt_config(cfg)
    assert (out.FUSE_KERNEL, out.IN_FEATURES, out.GT.MODE) == (5, ["p2", "p3", "p4", "p5"], "dot")


def test_unknown_preset_is_a_clear_error():
    cfg = _cfg()
    cfg.MODEL.FPT.PRESET = "fpt_huge"
    with pytest.raises(ValueError, match="MODEL.FPT.PRESET"):
        resolve_fpt_config(cfg)
