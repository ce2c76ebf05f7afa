"""The shipped pretrained trunk: reached through ``d2_refine://pretrained/...`` (detectron2's PathManager), checked
against its sha256 and its record, loaded into the trunk only (FPN and heads start fresh), and the fine-tune configs
differ from the from-scratch ones only in detectron2's ImageNet recipe."""
import glob
import hashlib
import json
import os
import pickle
import shutil

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402

import d2_refine.pretrained as pretrained  # noqa: E402
from d2_refine.engine import setup_cfg  # noqa: E402
from helpers import ROOT  # noqa: E402

TRUNK = "d2_refine://pretrained/R-18-shapes-pretrain.pkl"
TRUNK_FILE = os.path.join(ROOT, "d2_refine", "pretrained", "R-18-shapes-pretrain.pkl")
RECORD = os.path.join(ROOT, "docs", "results", "pretrain_trunk.json")
FINETUNE = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*_pretrained.yaml"))
                  if os.path.basename(os.path.dirname(p)) != "Combined")
COMBINED = sorted(glob.glob(os.path.join(ROOT, "configs", "Combined", "*_pretrained.yaml")))
RECIPE = {"MODEL.WEIGHTS": TRUNK, "MODEL.BACKBONE.FREEZE_AT": 2, "MODEL.RESNETS.NORM": "FrozenBN"}
FINETUNE_ITERS = 1000  # the fine-tune schedule, chosen on shapes_tune (docs/results/finetune_recipe_detection_tune.md)


def _trunk():
    """The shipped trunk's tensors by name (stem.*, res2.* ... res5.*)."""
    with open(TRUNK_FILE, "rb") as f:
        return pickle.load(f)["model"]


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_trunk_is_shipped_with_its_sha256_and_the_record_that_made_it():
    digest = _sha256(TRUNK_FILE)
    with open(TRUNK_FILE + ".sha256") as f:
        assert f.read().split()[0] == digest
    with open(RECORD) as f:
        record = json.load(f)
    assert record["sha256"] == digest and record["weights"] == "d2_refine/pretrained/R-18-shapes-pretrain.pkl"
    assert record["command"].startswith("python tools/pretrain_trunk.py") and record["commit"]
    assert os.path.getsize(TRUNK_FILE) <= 50 * 2**20
    # the source set shares no class with shapes
    from d2_refine.data.shapes import SHAPES_CLASSES
    assert record["source_set"]["classes"] and not set(record["source_set"]["classes"]) & set(SHAPES_CLASSES)


def test_the_address_resolves_through_detectron2s_path_manager():
    assert PathManager.get_local_path(TRUNK) == TRUNK_FILE
    with pytest.raises(FileNotFoundError, match="no such file in this installation.*R-18-shapes-pretrain.pkl"):
        PathManager.get_local_path("d2_refine://pretrained/R-50.pkl")
    with pytest.raises(ValueError, match="inside the d2_refine package"):
        PathManager.get_local_path("d2_refine://../setup.py")


def test_a_copy_that_does_not_match_its_sha256_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    shutil.copy(TRUNK_FILE + ".sha256", folder)
    (folder / "R-18-shapes-pretrain.pkl").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    monkeypatch.setattr(pretrained, "_PACKAGE", str(tmp_path))
    with pytest.raises(ValueError, match="does not match its sha256"):
        PathManager.get_local_path(TRUNK)


def test_only_the_trunk_is_loaded_the_fpn_and_heads_start_fresh():
    cfg = setup_cfg(os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes_pretrained.yaml"),
                    ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    fresh = build_model(cfg).state_dict()
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    trunk = _trunk()
    loaded = model.state_dict()
    prefix = "backbone.bottom_up."
    trunk_keys = {k for k in loaded if k.startswith(prefix)}
    assert {prefix + k for k in trunk} == trunk_keys  # every trunk tensor has its weight, and nothing else does
    for key, value in loaded.items():
        if key in trunk_keys:
            assert torch.equal(value, torch.as_tensor(trunk[key[len(prefix):]]).to(value.dtype)), key
        else:
            assert torch.equal(value, fresh[key]), f"{key} was loaded from the trunk file"
    assert not any(torch.equal(loaded[k], fresh[k]) for k in trunk_keys if k.endswith("conv1.weight"))
    # detectron2's ImageNet recipe: stem and res2 frozen, FrozenBN everywhere in the trunk
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith((prefix + "stem.", prefix + "res2.")) for n in frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.bottom_up.modules())


def _is_scratch_config_in_the_imagenet_recipe(scratch, finetune, method_config):
    """``finetune`` is ``scratch`` + the recipe + the schedule the campaign gives ``method_config``'s entry."""
    from d2_refine.benchmark.entries import ENTRIES, schedule_opts

    a, b = setup_cfg(scratch), setup_cfg(finetune)
    assert (a.MODEL.WEIGHTS, a.MODEL.RESNETS.NORM, a.MODEL.BACKBONE.FREEZE_AT) == ("", "BN", 0)
    assert (b.MODEL.WEIGHTS, b.MODEL.BACKBONE.FREEZE_AT, b.MODEL.RESNETS.NORM) == tuple(RECIPE.values())
    assert b.SOLVER.MAX_ITER == FINETUNE_ITERS < a.SOLVER.MAX_ITER
    entry = next(e for e in ENTRIES if os.path.join(ROOT, e.config) == method_config)
    a.defrost()
    # the configs checkpoint every quarter of their schedule (the campaign's runs more often: run_opts)
    a.merge_from_list([v for k, val in RECIPE.items() for v in (k, val)] + schedule_opts(FINETUNE_ITERS, a.SEED)
                      + entry.opts(FINETUNE_ITERS) + ["SOLVER.CHECKPOINT_PERIOD", str(FINETUNE_ITERS // 4),
                                                      "OUTPUT_DIR", b.OUTPUT_DIR])
    assert a.dump() == b.dump()


@pytest.mark.parametrize("finetune", FINETUNE, ids=[os.path.basename(p) for p in FINETUNE])
def test_each_finetune_config_is_its_scratch_config_in_the_imagenet_recipe(finetune):
    """The scratch config + detectron2's ImageNet recipe + the fine-tune schedule, which is the campaign's
    (``tools/benchmark_table.py --regime finetune --iters 1000``): nothing else differs."""
    scratch = finetune.replace("_pretrained.yaml", ".yaml")
    _is_scratch_config_in_the_imagenet_recipe(scratch, finetune, scratch)


@pytest.mark.parametrize("combined", COMBINED, ids=[os.path.basename(p) for p in COMBINED])
def test_each_combined_finetune_config_is_its_scratch_combination_in_the_imagenet_recipe(combined):
    """configs/Combined: the from-scratch combination + the recipe and schedule of its method's fine-tune config;
    the trunk loads into FPT's bottom-up ResNet as into the FPN's."""
    import yaml

    scratch = combined.replace("_pretrained.yaml", ".yaml")
    with open(scratch) as f:
        method = os.path.normpath(os.path.join(os.path.dirname(scratch), yaml.safe_load(f)["_BASE_"][0]))
    _is_scratch_config_in_the_imagenet_recipe(scratch, combined, method)
    cfg = setup_cfg(combined, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    trunk = _trunk()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    bottom_up = next(m for n, m in model.backbone.named_modules() if n.endswith("bottom_up")).state_dict()
    assert set(trunk) == set(bottom_up)
    for key in trunk:
        assert torch.equal(bottom_up[key], torch.as_tensor(trunk[key]).to(bottom_up[key].dtype)), key


def test_every_row_of_the_campaign_has_a_finetune_config():
    names = {os.path.basename(p) for p in FINETUNE}
    assert names == {"mask_rcnn_R_18_FPN_shapes_pretrained.yaml", "faster_rcnn_R_18_FPN_shapes_pretrained.yaml",
                     "retinanet_R_18_FPN_shapes_pretrained.yaml", "iounet_R_18_FPN_shapes_pretrained.yaml",
                     "mask_rcnn_fpt_lite_R_18_shapes_pretrained.yaml", "ifr_mask_rcnn_R_18_FPN_shapes_pretrained.yaml",
                     "internet_l2_R_18_FPN_shapes_pretrained.yaml", "rdsnet_R_18_FPN_shapes_pretrained.yaml",
                     "internet_makeup_only_R_18_FPN_shapes_pretrained.yaml",
                     "ifr_ws_mask_rcnn_R_18_FPN_shapes_pretrained.yaml", "internet_ot_R_18_FPN_shapes_pretrained.yaml",
                     "cascade_mask_rcnn_R_18_FPN_shapes_pretrained.yaml",
                     "ifr_cascade_mask_rcnn_R_18_FPN_shapes_pretrained.yaml"}
