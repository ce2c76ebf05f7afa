"""MODEL.RDSNET: defaults, idempotence, and the YAML configs merge and build (detectron2 parts skip without it)."""
import glob
import os

import pytest

from d2_refine.projects.rdsnet.config import add_rdsnet_config
from d2_refine.projects.rdsnet.mbrm import MBRM_DEFAULT_BIAS, MBRM_DEFAULT_KERNEL
from helpers import ROOT, bare_model_cfg

_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "RDSNet", "*.yaml")))


def test_mbrm_defaults_are_the_modules_own_and_a_second_call_keeps_values():
    cfg = bare_model_cfg(add_rdsnet_config)
    cfg.MODEL.RDSNET.REP_DIM = 7
    add_rdsnet_config(cfg)  # second call is a no-op
    r = cfg.MODEL.RDSNET
    assert r.REP_DIM == 7
    assert tuple(r.MBRM.KERNEL) == MBRM_DEFAULT_KERNEL and r.MBRM.BIAS == MBRM_DEFAULT_BIAS


@pytest.mark.parametrize("path", _CONFIGS, ids=[os.path.basename(p) for p in _CONFIGS])
def test_yaml_configs_merge_and_build(path):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from d2_refine.config import add_d2_refine_config

    cfg = get_cfg()
    add_d2_refine_config(cfg)
    cfg.merge_from_file(path)
    assert cfg.MODEL.META_ARCHITECTURE == "RDSNet" and cfg.MODEL.MASK_ON
    assert cfg.MODEL.RDSNET.MBRM.ENABLED == ("mbrm" in os.path.basename(path))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert (model.mbrm is not None) == cfg.MODEL.RDSNET.MBRM.ENABLED
    cfg.merge_from_list(["MODEL.RDSNET.MBRM.ENABLED", "True", "MODEL.RDSNET.MBRM.DECODE", "expectation"])
    assert cfg.MODEL.RDSNET.MBRM.ENABLED is True


def test_old_key_gives_one_line_naming_the_new_key():
    from d2_refine.projects.rdsnet.config import RENAMED_KEYS

    assert RENAMED_KEYS == {"MODEL.RDSNET.MASK_THRESHOLD": "MODEL.RDSNET.MASK_THRESH_TEST"}
    cfg = bare_model_cfg(add_rdsnet_config)
    with pytest.raises(KeyError, match="MODEL.RDSNET.MASK_THRESHOLD was renamed to MODEL.RDSNET.MASK_THRESH_TEST"):
        cfg.merge_from_list(["MODEL.RDSNET.MASK_THRESHOLD", "0.5"])


_SHAPES_CONFIGS = [p for p in _CONFIGS if "shapes" in os.path.basename(p)]


@pytest.mark.parametrize("path", _SHAPES_CONFIGS, ids=[os.path.basename(p) for p in _SHAPES_CONFIGS])
def test_shapes_configs_share_the_retinanet_baselines_one_stage_recipe(path):
    """RDSNet's shapes rows are compared with the RetinaNet baseline: both must train with the same one-stage recipe
    (anchors, matcher, focal loss, head, solver, input), so that a recipe change moves both rows together."""
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from d2_refine.config import add_d2_refine_config

    def load(p):
        cfg = get_cfg()
        add_d2_refine_config(cfg)
        cfg.merge_from_file(p)
        return cfg

    # the pretrained-trunk configs against the pretrained-trunk baseline
    baseline = "retinanet_R_18_FPN_shapes" + ("_pretrained" if path.endswith("_pretrained.yaml") else "") + ".yaml"
    ours, base = load(path), load(os.path.join(ROOT, "configs", "Baselines", baseline))
    for node in ("RETINANET", "ANCHOR_GENERATOR", "BACKBONE", "RESNETS", "FPN"):
        assert ours.MODEL[node] == base.MODEL[node], node
    if path.endswith("_short.yaml"):  # the CPU-budget schedule: a shorter run, everything else the same
        base.SOLVER.update({k: ours.SOLVER[k] for k in ("MAX_ITER", "STEPS", "CHECKPOINT_PERIOD")})
    for node in ("SOLVER", "INPUT", "DATASETS"):
        assert ours[node] == base[node], node
    # the shapes recipe (docs/results/rdsnet.md, "One-stage recipe")
    assert base.MODEL.RETINANET.FOCAL_LOSS_GAMMA == 1.0
    ours.MODEL.DEVICE = "cpu"
    model = build_model(ours)
    assert (model.focal_loss_gamma, model.focal_loss_alpha) == (1.0, 0.25)
