import hashlib
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from d2_refine.data.shapes import SHAPES_CLASSES, ShapesParams, generate_shapes_split, shapes_split_dir

PARAMS = ShapesParams(num_images=24, image_size=128, seed=3)


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, generate_shapes_split(root, "train", PARAMS, progress=False)


def test_pycocotools_loads_it(split):
    _, files = split
    coco = COCO(files["json_file"])
    assert len(coco.getImgIds()) == PARAMS.num_images
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES_CLASSES)
    assert len(coco.getAnnIds()) >= PARAMS.num_images * PARAMS.min_objects // 2
    for img in coco.loadImgs(coco.getImgIds()):
        assert os.path.exists(os.path.join(files["image_root"], img["file_name"]))


def test_each_mask_lies_inside_its_box(split):
    _, files = split
    coco = COCO(files["json_file"])
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        m = coco.annToMask(ann)
        assert m.sum() > 0
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        # polygons are rasterised by pycocotools with its own rounding: allow one pixel
        assert xs.min() >= x - 1 and ys.min() >= y - 1 and xs.max() <= x + w and ys.max() <= y + h
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        rle = mask_util.frPyObjects(ann["segmentation"], img["height"], img["width"])
        assert abs(float(mask_util.area(mask_util.merge(rle))) - ann["area"]) <= 0.35 * ann["area"] + 8


def test_objects_range_from_tiny_to_large(tmp_path):
    files = generate_shapes_split(str(tmp_path), "val", ShapesParams(num_images=60, seed=0), progress=False)
    anns = json.load(open(files["json_file"]))["annotations"]
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns])
    areas = np.array([a["area"] for a in anns])
    assert (sides < 16).any(), "no tiny object"
    assert (areas > 0.4 * 192 * 192).any() or (sides > 0.6 * 192).any(), "no large object"
    assert len({a["category_id"] for a in anns}) == len(SHAPES_CLASSES)


def test_same_seed_gives_same_bytes(tmp_path, split):
    root, _ = split
    generate_shapes_split(str(tmp_path), "train", PARAMS, progress=False)
    assert _digest(shapes_split_dir(str(tmp_path), "train", PARAMS)) == _digest(shapes_split_dir(root, "train", PARAMS))


def test_other_seed_or_split_differs(tmp_path, split):
    root, _ = split
    other = ShapesParams(num_images=PARAMS.num_images, image_size=PARAMS.image_size, seed=PARAMS.seed + 1)
    generate_shapes_split(str(tmp_path), "train", other, progress=False)
    generate_shapes_split(str(tmp_path), "val", PARAMS, progress=False)
    ref = _digest(shapes_split_dir(root, "train", PARAMS))
    assert _digest(shapes_split_dir(str(tmp_path), "train", other)) != ref
    assert _digest(shapes_split_dir(str(tmp_path), "val", PARAMS)) != ref


def test_progress_is_shown(tmp_path, capsys):
    generate_shapes_split(str(tmp_path), "train", ShapesParams(num_images=5, image_size=64), progress=True)
    err = capsys.readouterr().err
    assert f"generating shapes 'train' in {tmp_path}" in err and "5/5" in err


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_images=0), "num_images"),
    (dict(image_size=8), "image_size"),
    (dict(min_objects=5, max_objects=2), "min_objects"),
    (dict(difficulty=1.5), "difficulty"),
    (dict(seed=-1), "seed"),
])
def test_parameters_are_validated(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_shapes_split(str(tmp_path), "train", ShapesParams(**kwargs), progress=False)


def test_images_without_objects_are_allowed(tmp_path):
    files = generate_shapes_split(str(tmp_path), "train", ShapesParams(num_images=3, min_objects=0, max_objects=0),
                                  progress=False)
    data = json.load(open(files["json_file"]))
    assert len(data["images"]) == 3 and data["annotations"] == []


def _generate(root, barrier=None):
    if barrier is not None:  # every process has written its annotations before any of them moves them in place
        real_replace = os.replace

        def replace(src, dst):
            if dst.endswith("annotations.json"):
                barrier.wait(60)
            real_replace(src, dst)

        os.replace = replace  # in this child process only
    generate_shapes_split(root, "train", ShapesParams(num_images=40, image_size=64, seed=3), progress=False)


def test_two_processes_generating_one_split_at_once_both_succeed(tmp_path):
    """Two trainings started together on a fresh machine generate the same split at the same time: neither may
    fail on the other's temporary file, and the result is the split one process writes alone."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_generate, args=(str(tmp_path / "both"), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    _generate(str(tmp_path / "alone"))
    both = sorted(p.relative_to(tmp_path / "both") for p in (tmp_path / "both").rglob("*") if p.is_file())
    alone = sorted(p.relative_to(tmp_path / "alone") for p in (tmp_path / "alone").rglob("*") if p.is_file())
    assert both == alone  # no temporary file left behind
    assert all((tmp_path / "both" / f).read_bytes() == (tmp_path / "alone" / f).read_bytes() for f in alone)
