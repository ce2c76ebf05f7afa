"""Broken COCO-format datasets (DATASETS.COCO_FORMAT): images without annotations, zero-area and out-of-image
boxes, polygons of fewer than three points, crowd-only images train and evaluate; a missing, empty or truncated
image file stops train_net.py with one line naming the file (docs/BAD_INPUT.md lists the cases)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

pytest.importorskip("detectron2")

MASK_RCNN = os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes.yaml")
SIZE = 64
GOOD_BOX = [12, 10, 32, 30]  # x, y, w, h of the bright rectangle drawn on every image
DEGENERATE = ("no_annotations", "zero_area", "out_of_image", "short_polygon", "crowd_only")
UNREADABLE = {"missing": "not found", "empty": r"not an image \(empty or corrupt file\)",
              "truncated": r"cannot be read \(image file is truncated"}


def write_broken_coco(folder, defects, num_good=2):
    """``folder/images/*.png`` and ``folder/data.json``: ``num_good`` ordinary images with one "box" each, then one
    image per defect of ``defects`` (names of DEGENERATE and UNREADABLE). Returns the json path."""
    import cv2

    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []

    def image(name, write=True):
        if write:
            pixels = np.full((SIZE, SIZE, 3), 30, np.uint8)
            x, y, w, h = GOOD_BOX
            pixels[y:y + h, x:x + w] = 200
            cv2.imwrite(str(images_dir / name), pixels)
        images.append({"id": len(images) + 1, "file_name": name, "width": SIZE, "height": SIZE})
        return len(images)

    def annotate(image_id, bbox=GOOD_BOX, segmentation=None, crowd=0):
        x, y, w, h = bbox
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": bbox,
                            "area": w * h, "iscrowd": crowd,
                            "segmentation": segmentation or [[x, y, x + w, y, x + w, y + h, x, y + h]]})

    for k in range(num_good):
        annotate(image(f"good{k}.png"))
    for defect in defects:
        if defect == "no_annotations":
            image("no_annotations.png")
        elif defect == "zero_area":
            i = image("zero_area.png")
            annotate(i, [12, 10, 0, 30])
            annotate(i, [12, 10, 30, 0])
            annotate(i)
        elif defect == "out_of_image":
            i = image("out_of_image.png")
            annotate(i, [SIZE + 10, SIZE + 10, 20, 20])  # wholly outside
            annotate(i, [-30, -30, 20, 20])
            annotate(i, [50, 50, 40, 40])  # partly outside
            annotate(i)
        elif defect == "short_polygon":
            i = image("short_polygon.png")
            annotate(i, segmentation=[[12, 10, 44, 40]])  # 2 points: pycocotools would read it as a box
            annotate(i, segmentation=[[12, 10]])
            annotate(i, segmentation=[[12, 10, 44, 10, 44, 40, 12, 40], [1, 1, 2, 2]])  # one valid, one not
            annotate(i)
        elif defect == "crowd_only":
            annotate(image("crowd_only.png"), crowd=1)
        elif defect == "missing":
            annotate(image("missing.png", write=False))
        elif defect == "empty":
            annotate(image("empty.png", write=False))
            (images_dir / "empty.png").write_bytes(b"")
        elif defect == "truncated":
            annotate(image("truncated.png"))
            data = (images_dir / "truncated.png").read_bytes()
            (images_dir / "truncated.png").write_bytes(data[: len(data) // 2])
        else:
            raise ValueError(defect)
    json_file = folder / "data.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "box"}]}))
    return json_file


def _opts(json_file, test=True):
    entry = ("broken", str(json_file), str(json_file.parent / "images"))
    return ["DATASETS.COCO_FORMAT", repr([entry]), "DATASETS.TRAIN", "('broken',)",
            "DATASETS.TEST", "('broken',)" if test else "()", "MODEL.ROI_HEADS.NUM_CLASSES", "1"]


def _train_net(tmp_path, json_file, test=True, opts=()):
    from d2_refine.utils.testing import tiny_shapes_opts

    tiny = tiny_shapes_opts(tmp_path / "out", image_size=SIZE, iters=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", MASK_RCNN, *tiny,
                           *_opts(json_file, test), *opts], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.mark.slow
def test_degenerate_annotations_train_and_evaluate(tmp_path):
    """Every degenerate case in one set: a Mask R-CNN trains on it and COCO evaluation (bbox and segm, on the same
    set) gives finite AP; the polygons of fewer than three points used to crash pycocotools' segm evaluation."""
    json_file = write_broken_coco(tmp_path / "data", DEGENERATE)
    r = _train_net(tmp_path, json_file)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    assert math.isfinite(metrics[-1]["bbox/AP"]) and math.isfinite(metrics[-1]["segm/AP"])
    assert "polygons of fewer than 3 points" in r.stdout + r.stderr  # the evaluator's warning


def test_evaluation_ground_truth_drops_short_polygons(tmp_path):
    """The evaluator's ground truth loses the polygons of fewer than three points, and the annotations left without
    one (detectron2's loader drops the same for training); the others are untouched."""
    from pycocotools.coco import COCO

    from d2_refine.engine.evaluator import drop_invalid_polygons

    json_file = write_broken_coco(tmp_path / "data", ["short_polygon", "crowd_only"])
    coco = COCO(str(json_file))
    before = {a["id"]: a["segmentation"] for a in coco.dataset["annotations"]}
    assert drop_invalid_polygons(coco, str(json_file)) == 2
    after = {a["id"]: a["segmentation"] for a in coco.dataset["annotations"]}
    assert sorted(before) == [1, 2, 3, 4, 5, 6, 7] and sorted(after) == [1, 2, 5, 6, 7]
    assert after[5] == before[5][:1] and after[6] == before[6] and after[7] == before[7]
    assert sorted(coco.anns) == sorted(after)  # the index was rebuilt
    assert drop_invalid_polygons(coco) == 0  # nothing left to drop


@pytest.mark.parametrize("defect", sorted(UNREADABLE))
def test_unreadable_image_named_by_the_mapper(tmp_path, defect):
    """Training and test mappers: a DatasetError naming the file, whatever PIL raised."""
    from detectron2.data import DatasetCatalog

    from d2_refine.data import CheckedDatasetMapper, DatasetError, register_coco_format
    from d2_refine.engine import Trainer, setup_cfg

    json_file = write_broken_coco(tmp_path / "data", [defect], num_good=0)
    cfg = setup_cfg(MASK_RCNN, _opts(json_file) + ["DATALOADER.NUM_WORKERS", "0"])
    register_coco_format(cfg)
    (record,) = DatasetCatalog.get("broken")
    message = rf"^image {record['file_name']}: {UNREADABLE[defect]}"
    for is_train in (True, False):
        with pytest.raises(DatasetError, match=message):
            CheckedDatasetMapper(cfg, is_train)(record)
    with pytest.raises(DatasetError, match=message):  # the loader of evaluation (and --eval-only)
        next(iter(Trainer.build_test_loader(cfg, "broken")))


def test_image_of_another_size_named_by_the_mapper(tmp_path):
    """An image whose size differs from the json's: detectron2's check_image_size message, as one DatasetError."""
    from detectron2.data import DatasetCatalog

    from d2_refine.data import CheckedDatasetMapper, DatasetError, register_coco_format
    from d2_refine.engine import setup_cfg

    json_file = write_broken_coco(tmp_path / "data", [], num_good=1)
    coco = json.loads(json_file.read_text())
    coco["images"][0]["width"] = 2 * SIZE
    json_file.write_text(json.dumps(coco))
    cfg = setup_cfg(MASK_RCNN, _opts(json_file))
    register_coco_format(cfg)
    (record,) = DatasetCatalog.get("broken")
    with pytest.raises(DatasetError, match=rf"Mismatched image shape for image {record['file_name']}"):
        CheckedDatasetMapper(cfg, True)(record)


@pytest.mark.slow
def test_truncated_image_stops_train_net_in_one_line(tmp_path):
    """End to end, with a data-loader worker: train_net.py exits with one line naming the file, no traceback on
    stderr (the log on stdout keeps detectron2's record of the exception)."""
    json_file = write_broken_coco(tmp_path / "data", ["truncated"], num_good=1)  # both images in the first batch
    r = _train_net(tmp_path, json_file, test=False, opts=["DATALOADER.NUM_WORKERS", "1"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: image {json_file.parent / 'images' / 'truncated.png'}: cannot be read (image "
                           "file is truncated"), last


@pytest.mark.parametrize("case, message", [
    ("not_json", r"not valid JSON \(Unterminated string starting at: line 1 column \d+"),
    ("not_coco", r"not a COCO-format json \(annotation file format <class 'list'> not supported\)"),
    ("unknown_category", r"not a COCO-format json \(Encountered category_id=7 but this id does not exist"),
    ("no_images", r"holds no images"),
])
def test_a_json_that_cannot_be_used_is_named_in_one_line(tmp_path, case, message):
    """Loading the dataset (what training and evaluation do first): one DatasetError naming the dataset and its
    json, instead of pycocotools' or detectron2's traceback."""
    from detectron2.data import DatasetCatalog

    from d2_refine.data import DatasetError, register_coco_format
    from d2_refine.engine import setup_cfg

    json_file = write_broken_coco(tmp_path / "data", [], num_good=1)
    coco = json.loads(json_file.read_text())
    if case == "not_json":
        json_file.write_text('{"images": [' + json.dumps(coco["images"][0])[:20])  # cut off mid-write
    elif case == "not_coco":
        json_file.write_text(json.dumps(coco["images"]))
    elif case == "unknown_category":
        coco["annotations"][0]["category_id"] = 7
        json_file.write_text(json.dumps(coco))
    else:
        json_file.write_text(json.dumps(dict(coco, images=[], annotations=[])))
    register_coco_format(setup_cfg(MASK_RCNN, _opts(json_file)))
    with pytest.raises(DatasetError, match=rf"^dataset 'broken': {json_file}: {message}"):
        DatasetCatalog.get("broken")


def test_no_image_left_to_train_on_is_one_line(tmp_path):
    """Every image without annotations or crowd-only: detectron2 filters them all out of training; the train loader
    says so in one DatasetError line instead of its assertion."""
    from d2_refine.data import DatasetError, register_coco_format
    from d2_refine.engine import Trainer, setup_cfg

    json_file = write_broken_coco(tmp_path / "data", ["no_annotations", "crowd_only"], num_good=0)
    cfg = setup_cfg(MASK_RCNN, _opts(json_file, test=False) + ["DATALOADER.NUM_WORKERS", "0"])
    register_coco_format(cfg)
    with pytest.raises(DatasetError, match=r"^DATASETS.TRAIN broken: no image to train on: every image has no "
                                           r"annotation or only crowd ones"):
        Trainer.build_train_loader(cfg)


def test_train_net_names_a_broken_json_in_one_line(tmp_path):
    """End to end: the loader's DatasetError reaches the user as train_net.py's one error line."""
    json_file = write_broken_coco(tmp_path / "data", [], num_good=1)
    json_file.write_text(json_file.read_text()[:30])
    r = _train_net(tmp_path, json_file, test=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: dataset 'broken': {json_file}: not valid JSON")
