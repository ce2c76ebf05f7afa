"""Every YAML under configs/ loads on top of add_d2_refine_config, and config mistakes give one clear line."""
import glob
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytest.importorskip("detectron2")

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_config_loads(path):
    from d2_refine.engine import setup_cfg

    cfg = setup_cfg(path)
    assert cfg.MODEL.META_ARCHITECTURE
    if "shapes" in os.path.basename(path):
        assert all(n.startswith("shapes_") for n in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        if "_pretrained" not in os.path.basename(path):
            assert cfg.MODEL.WEIGHTS == "", "shapes configs train from scratch"


def test_add_d2_refine_config_is_idempotent():
    from detectron2.config import get_cfg

    from d2_refine import add_d2_refine_config

    cfg = add_d2_refine_config(get_cfg())
    before = cfg.dump()
    add_d2_refine_config(cfg)
    assert cfg.dump() == before
    assert cfg.DATASETS.SHAPES.NUM_TRAIN > 0


@pytest.mark.parametrize("args, needle", [
    (["--config-file", "configs/does_not_exist.yaml"], "config file not found: configs/does_not_exist.yaml"),
    (["--config-file", "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml", "MODEL.NO_SUCH_KEY", "1"],
     "unknown config key MODEL.NO_SUCH_KEY"),
    (["--config-file", "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml", "SOLVER.BASE_LR"], "KEY VALUE pairs"),
])
def test_train_net_config_errors_are_one_line(args, needle):
    r = subprocess.run([sys.executable, "train_net.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_yaml_with_unknown_key_names_the_file(tmp_path):
    from d2_refine.engine import ConfigError, setup_cfg

    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{ROOT}/configs/Base-RCNN-FPN.yaml"\nMODEL:\n  TYPO_KEY: 3\n')
    with pytest.raises(ConfigError, match=r"bad.yaml.*MODEL.TYPO_KEY"):
        setup_cfg(str(bad))


def test_yaml_can_set_shapes_keys(tmp_path):
    from d2_refine.engine import setup_cfg

    f = tmp_path / "small.yaml"
    f.write_text(f'_BASE_: "{ROOT}/configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml"\n'
                 "DATASETS:\n  SHAPES:\n    NUM_TRAIN: 50\n    DIFFICULTY: 0.2\n")
    cfg = setup_cfg(str(f))
    assert cfg.DATASETS.SHAPES.NUM_TRAIN == 50 and cfg.DATASETS.SHAPES.DIFFICULTY == 0.2
