"""tools/pretrain_trunk.py: a tiny run writes the trunk in detectron2's format (trunk keys only, no classifier), its
sha256 and a record naming the source set, schedule, command and commit; the detection pretext keeps only a
checkpoint's trunk; the source set shares no class and no image with shapes; the held-out mAP is the usual ranking
AP."""
import json
import os
import pickle

import numpy as np
import pytest

from helpers import load_tool

pretrain_trunk = load_tool("pretrain_trunk")


def test_mean_average_precision_ranks_the_images():
    labels = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], np.float32)
    perfect = labels + 0.1
    assert pretrain_trunk.mean_average_precision(perfect, labels) == pytest.approx(1.0)
    worst = -labels
    # class 0: positives ranked 3rd and 4th of 4 -> (1/3 + 2/4) / 2; class 1: 4th -> 1/4
    assert pretrain_trunk.mean_average_precision(worst, labels) == pytest.approx(((1 / 3 + 2 / 4) / 2 + 1 / 4) / 2)


def test_the_source_set_has_other_classes_and_other_images():
    from d2_refine.data.shapes import SHAPES_CLASSES, SOURCE_CLASSES

    assert not set(SOURCE_CLASSES) & set(SHAPES_CLASSES)
    images, labels = pretrain_trunk.render_source_set(6, 64, seed=0, split="train")
    val, _ = pretrain_trunk.render_source_set(6, 64, seed=0, split="val")
    assert images.shape == (6, 64, 64, 3) and labels.shape == (6, len(SOURCE_CLASSES)) and labels.sum() > 0
    assert not any(np.array_equal(a, b) for a in images for b in val)


def test_a_tiny_run_writes_the_trunk_its_sha256_and_its_record(tmp_path):
    pytest.importorskip("detectron2")
    out, record = tmp_path / "trunk.pkl", tmp_path / "record.json"
    rec = pretrain_trunk.main(["--pretext", "classification", "--out", str(out), "--record", str(record),
                               "--num-images", "8", "--num-val", "4",
                               "--image-size", "64", "--iters", "2", "--batch", "4", "--eval-period", "2"])
    with open(out, "rb") as f:
        weights = pickle.load(f)
    assert weights["matching_heuristics"] and "stem.conv1.weight" in weights["model"]
    assert all(k.startswith(("stem.", "res")) for k in weights["model"])  # the classifier head is not saved
    assert {k.split(".")[0] for k in weights["model"]} == {"stem", "res2", "res3", "res4", "res5"}
    from d2_refine.pretrained import sha256_file
    assert (tmp_path / "trunk.pkl.sha256").read_text().split()[0] == sha256_file(str(out)) == rec["sha256"]
    assert json.loads(record.read_text()) == rec
    assert rec["command"].startswith("python tools/pretrain_trunk.py --pretext classification") and "commit" in rec
    assert rec["schedule"]["iters"] == 2 and rec["history"][-1]["iteration"] == 2


def test_the_detection_pretext_keeps_only_the_trunk_of_a_checkpoint(tmp_path):
    pytest.importorskip("detectron2")
    import torch

    state = {"backbone.bottom_up.stem.conv1.weight": torch.ones(2, 3, 1, 1),
             "backbone.bottom_up.res2.0.conv1.norm.running_var": torch.full((2,), 2.0),
             "backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked": torch.tensor(5),
             "backbone.fpn_lateral2.weight": torch.zeros(1), "roi_heads.box_predictor.cls_score.weight": torch.zeros(1)}
    ckpt, out, record = tmp_path / "model_final.pth", tmp_path / "trunk.pkl", tmp_path / "record.json"
    torch.save({"model": state, "iteration": 9}, ckpt)
    rec = pretrain_trunk.main(["--pretext", "detection", "--checkpoint", str(ckpt), "--out", str(out),
                               "--record", str(record)])
    with open(out, "rb") as f:
        weights = pickle.load(f)["model"]
    assert sorted(weights) == ["res2.0.conv1.norm.running_var", "stem.conv1.weight"]  # no FPN, head or counter
    assert weights["res2.0.conv1.norm.running_var"].dtype == np.float16
    assert weights["res2.0.conv1.norm.running_var"].tolist() == [2.0, 2.0]
    assert rec["pretext"] == "detection" and rec["pretext_config"] == pretrain_trunk.PRETEXT_CONFIG
    assert rec["source_set"]["train"] == "shapes_source_train" and rec["source_set"]["num_train"] == 4000
    torch.save({"model": {"head.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(SystemExit, match="no backbone.bottom_up"):
        pretrain_trunk.main(["--checkpoint", str(ckpt), "--out", str(out), "--record", ""])


def test_the_detection_pretext_config_trains_on_the_source_set_only():
    pytest.importorskip("detectron2")
    from d2_refine.data import DatasetError, check_datasets
    from d2_refine.data.datasets import SPLITS
    from d2_refine.engine import setup_cfg
    from helpers import ROOT

    config = os.path.join(ROOT, pretrain_trunk.PRETEXT_CONFIG)
    cfg = setup_cfg(config, [])
    assert [SPLITS[n] for n in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST] == ["source_train", "source_val"]
    check_datasets(cfg)  # 8 classes, 8 source families
    with pytest.raises(DatasetError, match="'shapes_source_train': it has 8 categories but MODEL.ROI_HEADS"):
        check_datasets(setup_cfg(config, ["MODEL.ROI_HEADS.NUM_CLASSES", "6"]))
