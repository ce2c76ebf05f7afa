"""DATASETS.COCO_FORMAT: the user's own COCO-format data, named in a config or on the command line, registered
before training and evaluation, with one line for a file that is not there."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

pytest.importorskip("detectron2")

CONFIG = os.path.join(ROOT, "configs", "Baselines", "faster_rcnn_R_18_FPN_shapes.yaml")
CLASSES = ("box", "bar")


def _write_coco(folder, num_images=4, size=96, seed=0):
    """A tiny COCO-format set: ``folder/images/*.png`` and ``folder/train.json`` / ``val.json`` (the same images),
    light rectangles ("box") and thin bars ("bar") on a dark background."""
    import cv2

    rng = np.random.default_rng(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        img = np.full((size, size, 3), 30, np.uint8)
        for _ in range(2):
            cls = int(rng.integers(2))
            w, h = (int(rng.integers(20, 40)),) * 2 if cls == 0 else (int(rng.integers(30, 60)), 8)
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            img[y:y + h, x:x + w] = 200 if cls == 0 else 120
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        cv2.imwrite(str(images_dir / f"{i}.png"), img)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    for split in ("train", "val"):
        (folder / f"{split}.json").write_text(json.dumps(coco))
    return folder


def _opts(data):
    return ["DATASETS.COCO_FORMAT", repr([("mine_train", str(data / "train.json"), str(data / "images")),
                                          ("mine_val", str(data / "val.json"), str(data / "images"))]),
            "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(CLASSES))]


def test_train_net_trains_and_evaluates_a_coco_format_dataset(tmp_path):
    from d2_refine.utils.testing import tiny_shapes_opts

    data = _write_coco(tmp_path / "mine")
    out = tmp_path / "out"
    tiny = tiny_shapes_opts(out, image_size=96, iters=2)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG, *tiny,
                        *_opts(data)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model_final.pth").exists()
    assert not (out / "shapes").exists(), "the shapes set was generated though the config does not use it"
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 1  # two iterations
    ap = [m["bbox/AP"] for m in metrics if "bbox/AP" in m]
    assert len(ap) == 1 and math.isfinite(ap[0])
    # the class names come from the json: the evaluation's per-class table names them
    assert "bbox/AP-box" in metrics[-1] and "bbox/AP-bar" in metrics[-1]


def test_yaml_config_registers_and_is_checked(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2_refine.data import DatasetError, check_datasets, register_coco_format
    from d2_refine.engine import setup_cfg

    data = _write_coco(tmp_path / "yaml_data", num_images=2)
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text(f"_BASE_: {CONFIG}\nDATASETS:\n  COCO_FORMAT: [[\"yaml_train\", \"{data / 'train.json'}\", "
                        f"\"{data / 'images'}\"]]\n  TRAIN: (\"yaml_train\",)\n  TEST: ()\n")
    cfg = setup_cfg(str(cfg_file))
    check_datasets(cfg)
    register_coco_format(cfg)  # again: nothing changes
    assert len(DatasetCatalog.get("yaml_train")) == 2
    assert MetadataCatalog.get("yaml_train").thing_classes == list(CLASSES)

    os.remove(data / "train.json")
    with pytest.raises(DatasetError, match=f"dataset 'yaml_train': json file not found: {data / 'train.json'}"):
        check_datasets(setup_cfg(str(cfg_file)))


@pytest.mark.parametrize("entry, message", [
    ("[('coco_2017_val', 'a.json', 'images')]", "already the name of a registered dataset"),
    ("[('only_two', 'a.json')]", "entries are (name, json file, image folder)"),
])
def test_bad_entries_refused_in_one_line(tmp_path, entry, message):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG,
                        "DATASETS.COCO_FORMAT", entry], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: DATASETS.COCO_FORMAT") and message in r.stderr


def _with_categories(folder, n, name="cats.json"):
    """A copy of the tiny set's json with ``n`` categories (the annotations use the first two), the categories last
    as in COCO's files, and the word "categories" inside an earlier value."""
    coco = json.loads((folder / "train.json").read_text())
    coco = {"info": {"description": "no \"categories\": [here]"}, "images": coco["images"],
            "annotations": coco["annotations"], "categories": [{"id": k + 1, "name": f"c{k}"} for k in range(n)]}
    (folder / name).write_text(json.dumps(coco, indent=1))
    return str(folder / name)


@pytest.mark.parametrize("config, key", [
    (CONFIG, "MODEL.ROI_HEADS.NUM_CLASSES"),
    (os.path.join(ROOT, "configs", "Baselines", "retinanet_R_18_FPN_shapes.yaml"), "MODEL.RETINANET.NUM_CLASSES"),
    (os.path.join(ROOT, "configs", "RDSNet", "rdsnet_R_18_FPN_shapes.yaml"), "MODEL.RETINANET.NUM_CLASSES"),
])
def test_more_categories_than_classes_refused_in_one_line(tmp_path, config, key):
    """8 categories with 6 classes died deep in the loss (IndexError: Target 7 is out of bounds)."""
    from d2_refine.data import DatasetError, check_datasets
    from d2_refine.engine import setup_cfg

    data = _write_coco(tmp_path / "mine", num_images=2)
    json_file = _with_categories(data, 8)
    opts = ["DATASETS.COCO_FORMAT", repr([("eight_train", json_file, str(data / "images"))]),
            "DATASETS.TRAIN", "('eight_train',)", "DATASETS.TEST", "()"]
    with pytest.raises(DatasetError) as e:
        check_datasets(setup_cfg(config, opts))
    assert str(e.value) == (f"dataset 'eight_train': {json_file} has 8 categories but {key} is 6: set {key} 8 "
                            "(or use a dataset with 6 categories)")
    check_datasets(setup_cfg(config, opts + [key, "8"]))
    check_datasets(setup_cfg(config, opts), train=False)  # --eval-only on DATASETS.TEST only: not used


def test_fewer_categories_than_classes_warn_once(tmp_path, caplog):
    from detectron2.data.datasets import register_coco_instances

    from d2_refine.data import check_datasets
    from d2_refine.engine import setup_cfg

    data = _write_coco(tmp_path / "mine", num_images=2)
    # a dataset registered with detectron2 directly (as its builtin COCO ones), not through DATASETS.COCO_FORMAT
    register_coco_instances("four_cats_val", {}, _with_categories(data, 4), str(data / "images"))
    with caplog.at_level("WARNING", logger="d2_refine.data"):
        check_datasets(setup_cfg(CONFIG, ["DATASETS.TEST", "('four_cats_val', 'shapes_val')"]))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("d2_refine.data")]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "'four_cats_val'" in lines[0] and "4 categories" in lines[0] and "MODEL.ROI_HEADS.NUM_CLASSES 6" in lines[0]


def test_shapes_configs_pass_the_class_count_check(caplog):
    from d2_refine.data import check_datasets
    from d2_refine.engine import setup_cfg

    for config in ("Baselines/faster_rcnn_R_18_FPN_shapes.yaml", "Baselines/retinanet_R_18_FPN_shapes.yaml",
                   "RDSNet/rdsnet_R_18_FPN_shapes.yaml"):
        with caplog.at_level("WARNING", logger="d2_refine.data"):
            check_datasets(setup_cfg(os.path.join(ROOT, "configs", config)))
    assert not [r for r in caplog.records if r.name.startswith("d2_refine.data")]
