"""tools/detection_errors.py: class-aware vs class-agnostic box AP and the confusion of the top-scoring class,
on a ground truth and detections written here."""
import json

import pytest

from helpers import load_tool

pytest.importorskip("pycocotools")
de = load_tool("detection_errors")


def _write(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
                     {"id": 2, "width": 100, "height": 100, "file_name": "2.png"}],
          "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
              {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 0}]}
    dets = [  # object 1: right class on top; object 2: "circle" outscores "square"; object 3: nothing near it
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [51, 51, 40, 40], "score": 0.3},
        {"image_id": 2, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.7}]
    run = tmp_path / "run"
    (run / "inference" / "shapes_val").mkdir(parents=True)
    (run / "inference" / "shapes_val" / "coco_instances_results.json").write_text(json.dumps(dets))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return str(run), str(tmp_path / "gt.json")


def test_confusion_and_agnostic_ap(tmp_path):
    run, gt = _write(tmp_path)
    r = de.main([run, "--gt", gt, "--json", str(tmp_path / "out.json")])[0]
    assert r["classes"] == ["circle", "square"] and r["confusion"] == [[1, 0], [1, 0]]
    assert (r["objects"], r["covered"], r["missed"]) == (3, 2, 1) and r["top_class_right"] == pytest.approx(50.0)
    assert r["right_by_size"] == {"small": 100.0, "other": 0.0}  # the 20 x 20 circle is small, the square is not
    assert r["agnostic_ap"] > r["ap"] and r["agnostic_ap50"] > r["ap50"]  # the misclassified square counts there
    assert json.loads((tmp_path / "out.json").read_text())[0]["confusion"] == r["confusion"]


def test_a_run_that_was_not_evaluated_is_one_line(tmp_path):
    _, gt = _write(tmp_path)
    with pytest.raises(SystemExit, match="no .*coco_instances_results.json"):
        de.main([str(tmp_path / "elsewhere"), "--gt", gt])


def test_ground_truth_of_a_shapes_run_is_the_split_its_config_names(tmp_path):
    pytest.importorskip("detectron2")  # the look-up goes through d2_refine's dataset registration
    from d2_refine.data.shapes import ShapesParams, generate_shapes_split

    run = tmp_path / "run"
    run.mkdir()
    # a config dump of an older version: a renamed key elsewhere must not matter, only DATASETS.SHAPES is read
    (run / "config.yaml").write_text(f"DATASETS:\n  SHAPES:\n    ROOT: {tmp_path / 'shapes'}\n    NUM_VAL: 3\n"
                                     "    IMAGE_SIZE: 64\nMODEL:\n  FPT:\n    GT: True\n")
    with pytest.raises(SystemExit, match="no ground truth at"):
        de.shapes_gt_of(str(run), "shapes_val")
    files = generate_shapes_split(str(tmp_path / "shapes"), "val", ShapesParams(num_images=3, image_size=64),
                                  progress=False)
    assert de.shapes_gt_of(str(run), "shapes_val") == files["json_file"]
    with pytest.raises(SystemExit, match="not a shapes split"):
        de.shapes_gt_of(str(run), "coco_2017_val")
