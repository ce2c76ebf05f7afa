"""tools/demo.py draws a model's detections on shapes images (a file, or a folder into a folder) at the images' own
size, and refuses missing inputs and weights with one line."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

from helpers import ROOT  # noqa: E402

DEMO = os.path.join(ROOT, "tools", "demo.py")
CONFIG = os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes.yaml")
SIZE = 96  # the shapes images; the model sees them at 128 px, the drawings must keep 96


def _run_demo(*args):
    # the repository on the path as for train_net.py run from the root, whatever the (editable) install points to
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, DEMO, "--config-file", CONFIG, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo():
    from helpers import load_tool

    return load_tool("demo")


@pytest.fixture(scope="module")
def images_and_weights(tmp_path_factory):
    """Two shapes images and an untrained Mask R-CNN checkpoint (threshold 0 keeps its low-score detections)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_refine.data.shapes import ShapesParams, generate_shapes_split
    from d2_refine.engine import setup_cfg

    tmp = tmp_path_factory.mktemp("demo")
    files = generate_shapes_split(str(tmp), "val", ShapesParams(num_images=2, image_size=SIZE), progress=False)
    torch.manual_seed(0)
    model = build_model(setup_cfg(CONFIG, ["MODEL.DEVICE", "cpu"]))
    DetectionCheckpointer(model, save_dir=str(tmp)).save("untrained")
    return files["image_root"], str(tmp / "untrained.pth")


def test_demo_writes_drawings_at_image_size(images_and_weights, tmp_path):
    import numpy as np
    from PIL import Image

    image_root, weights = images_and_weights
    images = sorted(os.listdir(image_root))
    opts = ["--confidence-threshold", "0", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "TEST.DETECTIONS_PER_IMAGE", "10"]
    one = tmp_path / "one.png"
    r = _run_demo("--input", os.path.join(image_root, images[0]), "--output", str(one), *opts)
    assert r.returncode == 0, r.stderr
    assert "10 detections" in r.stdout, r.stdout
    with Image.open(one) as im, Image.open(os.path.join(image_root, images[0])) as src:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        assert not np.array_equal(np.asarray(im), np.asarray(src.convert("RGB"))), "nothing was drawn"

    r = _run_demo("--input", image_root, "--output", str(tmp_path / "out"), *opts)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == images
    for name in images:
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size == (SIZE, SIZE)


@pytest.mark.parametrize("case, needle", [
    ("input", "input not found: "),
    ("empty_dir", "no image files"),
    ("no_weights", "MODEL.WEIGHTS is empty"),
    ("missing_weights", "MODEL.WEIGHTS not found: "),
    ("config", "config file not found: "),
    ("unreadable", "empty.png: not an image (empty or corrupt file)"),
    ("output_file", "is a file: with 2 inputs"),
    ("config_value", "MODEL.ROI_HEADS.NAME 'Nope': no such component"),
    ("corrupt_weights", "corrupt.pth cannot be read (UnpicklingError"),
])
def test_demo_errors_are_one_line(demo, images_and_weights, tmp_path, capsys, case, needle):
    image_root, weights = images_and_weights
    argv = ["--config-file", CONFIG, "--input", image_root, "--output", str(tmp_path / "out"),
            "MODEL.WEIGHTS", weights]
    if case == "input":
        argv[3] = str(tmp_path / "missing.png")
    elif case == "empty_dir":
        argv[3] = str(tmp_path)
    elif case == "no_weights":
        argv[-1] = ""
    elif case == "missing_weights":
        argv[-1] = str(tmp_path / "missing.pth")
    elif case == "unreadable":
        argv[3] = str(tmp_path / "empty.png")
        (tmp_path / "empty.png").write_bytes(b"")
    elif case == "output_file":
        argv[5] = str(tmp_path / "out")
        (tmp_path / "out").write_text("")
    elif case == "config_value":
        argv += ["MODEL.ROI_HEADS.NAME", "Nope"]
    elif case == "corrupt_weights":
        argv[-1] = str(tmp_path / "corrupt.pth")
        (tmp_path / "corrupt.pth").write_text("garbage")
    else:
        argv[1] = str(tmp_path / "missing.yaml")
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert str(e.value).startswith("error: ") and needle in str(e.value)
    assert case == "output_file" or not os.path.exists(tmp_path / "out")
