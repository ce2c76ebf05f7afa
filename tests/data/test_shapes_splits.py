"""The registered shapes splits: ``shapes_tune`` is a held-out split of its own (for choosing test-time settings
without looking at ``shapes_val``), generated only when a config uses it."""
import os

import pytest

from helpers import ROOT

pytest.importorskip("detectron2")


def _cfg(tmp_path, test):
    from d2_refine.engine import setup_cfg

    return setup_cfg(os.path.join(ROOT, "configs", "Baselines", "faster_rcnn_R_18_FPN_shapes.yaml"),
                     ["DATASETS.SHAPES.ROOT", str(tmp_path), "DATASETS.SHAPES.IMAGE_SIZE", "64",
                      "DATASETS.SHAPES.NUM_TRAIN", "2", "DATASETS.SHAPES.NUM_VAL", "3", "DATASETS.SHAPES.NUM_TUNE", "4",
                      "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", str(test)])


def test_tune_split_is_its_own_and_generated_only_when_used(tmp_path):
    from detectron2.data import DatasetCatalog

    from d2_refine.data import prepare_datasets

    prepare_datasets(_cfg(tmp_path, ("shapes_val",)))
    assert sorted(p.split("_")[0] for p in os.listdir(tmp_path)) == ["train", "val"]  # no tune files yet
    prepare_datasets(_cfg(tmp_path, ("shapes_val", "shapes_tune")))
    assert sorted(p.split("_")[0] for p in os.listdir(tmp_path)) == ["train", "tune", "val"]
    tune, val = DatasetCatalog.get("shapes_tune"), DatasetCatalog.get("shapes_val")
    assert len(tune) == 4 and len(val) == 3
    boxes = lambda ds: [tuple(round(v, 3) for a in d["annotations"] for v in a["bbox"]) for d in ds]  # noqa: E731
    assert not set(boxes(tune)) & set(boxes(val))  # other images, not a copy of val
