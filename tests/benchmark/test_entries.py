"""d2_refine.benchmark.entries: the schedule, the models and their baselines, the regimes."""
import os

import pytest

from d2_refine.benchmark import entries
from helpers import ROOT


def test_schedule_scales_the_default_one():
    opts = dict(zip(*[iter(entries.schedule_opts(2000, 1))] * 2))
    assert opts["SOLVER.MAX_ITER"] == "2000" and opts["SOLVER.STEPS"] == "(1500, 1800)"
    assert opts["SOLVER.WARMUP_ITERS"] == "200" and opts["SEED"] == "1"
    assert "SOLVER.CHECKPOINT_PERIOD" not in opts  # not part of the schedule: it changes no result
    run = dict(zip(*[iter(entries.run_opts(entries.ENTRY_BY_NAME["ifr"], "out", 2000, 1))] * 2))
    assert run["SOLVER.CHECKPOINT_PERIOD"] == "100"  # what a run cut off resumes from: at most 100 iterations back
    assert dict(zip(*[iter(entries.schedule_opts(400, 3))] * 2))["SOLVER.STEPS"] == "(300, 360)"
    with pytest.raises(ValueError, match="at least 10"):
        entries.schedule_opts(5, 1)


def test_every_entry_config_exists_and_baselines_are_entries():
    for e in entries.ENTRIES:
        assert os.path.isfile(os.path.join(ROOT, e.config)), e.config
        assert e.baseline is None or e.baseline in entries.ENTRY_BY_NAME
        assert e.config == entries.CONFIGS[e.name]
    assert {"ifr_ws", "cascade_ifr", "internet_ot", "internet_makeup"} <= set(entries.ENTRY_BY_NAME)
    # Cascade + IFR is paired with the cascade alone, which is paired with Mask R-CNN
    assert entries.ENTRY_BY_NAME["cascade_ifr"].baseline == "cascade_mask_rcnn"
    assert entries.ENTRY_BY_NAME["cascade_mask_rcnn"].baseline == "mask_rcnn"
    assert entries.ROW_ORDER[-2:] == ["rdsnet", "rdsnet_mbrm"] and entries.VARIANT_OF == {"rdsnet_mbrm": "rdsnet"}


def test_ifr_warm_up_is_the_papers_fraction_of_the_schedule():
    assert entries.ENTRY_BY_NAME["ifr"].opts(900) == ["MODEL.IFR.PRETRAIN_STEPS", "500"]
    assert entries.ENTRY_BY_NAME["cascade_ifr"].opts(900) == ["MODEL.IFR.PRETRAIN_STEPS", "500"]
    assert entries.ENTRY_BY_NAME["ifr_ws"].opts(900) == []  # explicit: no warm-up


def test_finetune_regime_trains_the_main_models_with_their_pretrained_configs():
    tuned = {e.name: e for e in entries.regime_entries("finetune")}
    assert sorted(tuned) == sorted(entries.FINETUNE_MODELS)
    assert tuned["mask_rcnn"].config == "configs/Baselines/mask_rcnn_R_18_FPN_shapes_pretrained.yaml"
    assert tuned["rdsnet"].variants == entries.ENTRY_BY_NAME["rdsnet"].variants  # + MBRM, same weights
    assert tuned["ifr"].opts(900) == ["MODEL.IFR.PRETRAIN_STEPS", "500"]
    assert [e.config for e in entries.regime_entries("scratch")] == [e.config for e in entries.ENTRIES]
    with pytest.raises(ValueError, match="unknown regime"):
        entries.regime_entries("imagenet")
    # a method trains next to its baseline, and that one next to its own
    assert entries.with_baselines(["cascade_ifr"]) == ["mask_rcnn", "cascade_mask_rcnn", "cascade_ifr"]
