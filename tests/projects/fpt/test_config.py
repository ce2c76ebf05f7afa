"""MODEL.FPT: keys, idempotence, the Base-FPT-*.yaml settings, renamed keys, and overrides that always win."""
import os

import pytest
from fvcore.common.config import CfgNode as CN

from d2_refine.projects.fpt.config import add_fpt_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FPT_CONFIGS = os.path.join(ROOT, "configs", "FPT")
LITE = os.path.join(FPT_CONFIGS, "mask_rcnn_fpt_lite_R_18_shapes.yaml")


def _cfg():
    cfg = CN({"MODEL": {}})
    add_fpt_config(cfg)
    return cfg


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
    assert type(cfg.MODEL.FPT) is MyCN and type(cfg.MODEL.FPT.SELF) is MyCN


def _merged(name):
    cfg = _cfg()
    cfg.VERSION = 2  # as detectron2's config (the base files say which version they are written for)
    cfg.merge_from_file(os.path.join(FPT_CONFIGS, name))
    return cfg.MODEL.FPT


def test_base_files_hold_the_settings():
    lite = _merged("Base-FPT-lite.yaml")
    assert (lite.IN_FEATURES, lite.SELF.LEVELS, lite.GROUNDING.MODE, lite.FUSE_KERNEL) == \
        (["p3", "p4", "p5"], ["p4", "p5"], "dot", 1)
    rel = _merged("Base-FPT-release.yaml")
    assert (rel.INPUT, rel.GROUNDING.MODE, rel.NORM) == ("lateral", "dot", "BN")
    assert _merged("Base-FPT-paper.yaml") == _cfg().MODEL.FPT  # the paper's setting = the defaults


@pytest.mark.parametrize("old,new", [
    ("MODEL.FPT.ST.LEVELS", "MODEL.FPT.SELF.LEVELS"),
    ("MODEL.FPT.GT.MODE", "MODEL.FPT.GROUNDING.MODE"),
    ("MODEL.FPT.RT.ORDER", "MODEL.FPT.RENDERING.ORDER"),
])
def test_old_node_names_are_one_line_errors(tmp_path, old, new):
    cfg = _cfg()
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        cfg.merge_from_list([old, "x"])
    *nodes, leaf = old.split(".")
    f = tmp_path / "old.yaml"
    f.write_text("MODEL:\n  FPT:\n    " + nodes[2] + ":\n      " + leaf + ": 1\n")
    node = ".".join(nodes)
    with pytest.raises(KeyError, match=f"{node} was renamed to {new.rsplit('.', 1)[0]};") as e:
        cfg.merge_from_file(str(f))
    assert "\n" not in str(e.value)


def test_preset_is_a_one_line_error_naming_the_base_files(tmp_path):
    cfg = _cfg()
    with pytest.raises(KeyError, match="MODEL.FPT.PRESET was renamed to _BASE_ configs/FPT/Base-FPT-lite.yaml"):
        cfg.merge_from_list(["MODEL.FPT.PRESET", "fpt_lite"])
    f = tmp_path / "preset.yaml"
    f.write_text('MODEL:\n  FPT:\n    PRESET: "fpt_lite"\n')
    with pytest.raises(KeyError, match="Base-FPT-lite.yaml") as e:
        cfg.merge_from_file(str(f))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- what the user writes wins (detectron2)
def _built_kwargs(config_file, opts=()):
    pytest.importorskip("detectron2")
    from d2_refine.engine import setup_cfg
    from d2_refine.projects.fpt.backbone import fpt_kwargs_from_cfg

    return fpt_kwargs_from_cfg(setup_cfg(config_file, list(opts)))


def test_command_line_value_equal_to_the_default_wins():
    assert _built_kwargs(LITE)["fuse_kernel"] == 1
    kw = _built_kwargs(LITE, ["MODEL.FPT.FUSE_KERNEL", "3", "MODEL.FPT.GROUNDING.MODE", "euclidean",
                              "MODEL.FPT.IN_FEATURES", "[]"])
    assert kw["fuse_kernel"] == 3  # 3 is the default, and still replaces the lite base file's 1
    assert kw["grounding_transformer"]["mode"] == "euclidean"
    assert kw["in_features"] is None  # [] = every level


def test_yaml_value_equal_to_the_default_wins(tmp_path):
    f = tmp_path / "lite_3x3.yaml"
    f.write_text(f'_BASE_: "{LITE}"\nMODEL:\n  FPT:\n    FUSE_KERNEL: 3\n    GROUNDING:\n      MODE: "euclidean"\n')
    kw = _built_kwargs(str(f))
    assert kw["fuse_kernel"] == 3 and kw["grounding_transformer"]["mode"] == "euclidean"
    assert kw["st_levels"] == ["p4", "p5"]  # the rest of the lite setting stays


def test_paper_preset_says_which_order_is_the_release_s():
    """Base-FPT-paper.yaml renders in the release's order (conv then weight): its comment must not call it the
    paper's, and the order is spelled out in it."""
    import yaml

    path = os.path.join(ROOT, "configs", "FPT", "Base-FPT-paper.yaml")
    text = open(path).read()
    assert yaml.safe_load(text)["MODEL"]["FPT"]["RENDERING"]["ORDER"] == "conv_then_weight"
    assert "as in the paper" not in text and "release" in text and "weight_then_conv" in text
