"""train_net.py's command line: detectron2's arguments, and one line (no traceback, before any worker starts) for
--eval-only without weights, missing weights and datasets that are not there."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT, load_script

pytest.importorskip("detectron2")

CONFIG = os.path.join(ROOT, "configs", "Baselines", "faster_rcnn_R_18_FPN_shapes.yaml")


def _train_net(tmp_path, *args, env=None):
    from d2_refine.utils.testing import tiny_shapes_opts

    opts = list(args) + tiny_shapes_opts(tmp_path / "out", num_train=2, num_val=2, iters=1)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), *opts], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    assert "Command Line Args" not in r.stdout, "launched anyway"
    return lines[0]


def test_parser_has_detectron2_arguments_and_defaults():
    from detectron2.engine import default_argument_parser

    ours, theirs = load_script("train_net.py").get_parser(), default_argument_parser()
    argv = ["--config-file", "c.yaml", "--resume", "--eval-only", "--num-gpus", "2", "--num-machines", "3",
            "--machine-rank", "1", "--dist-url", "tcp://h:1", "A.B", "1"]
    for a in ([], argv):
        assert vars(ours.parse_args(a)) == vars(theirs.parse_args(a))


def test_eval_only_without_weights_refuses(tmp_path):
    line = _one_line_error(_train_net(tmp_path, "--config-file", CONFIG, "--eval-only"))
    assert "--eval-only needs trained weights" in line and "MODEL.WEIGHTS" in line and "model_final.pth" in line
    assert not (tmp_path / "out" / "inference").exists()


def test_missing_weights_file_refuses(tmp_path):
    line = _one_line_error(_train_net(tmp_path, "--config-file", CONFIG, "--eval-only",
                                      "MODEL.WEIGHTS", str(tmp_path / "nope.pth")))
    assert line == f"error: MODEL.WEIGHTS not found: {tmp_path / 'nope.pth'}"


def test_missing_coco_names_the_expected_path(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    line = _one_line_error(_train_net(tmp_path, "--config-file", CONFIG, "DATASETS.TRAIN", "('coco_2017_train',)",
                                      env=env))
    expected = tmp_path / "datasets" / "coco" / "annotations" / "instances_train2017.json"
    assert f"dataset 'coco_2017_train': json file not found: {expected}" in line and "DETECTRON2_DATASETS" in line
    # the json there, the images not: the image folder is named
    expected.parent.mkdir(parents=True)
    expected.write_text("{}")
    line = _one_line_error(_train_net(tmp_path, "--config-file", CONFIG, "DATASETS.TRAIN", "('coco_2017_train',)",
                                      env=env))
    assert f"image folder not found: {tmp_path / 'datasets' / 'coco' / 'train2017'}" in line


def test_unregistered_dataset_refuses(tmp_path):
    line = _one_line_error(_train_net(tmp_path, "--config-file", CONFIG, "DATASETS.TEST", "('my_val',)"))
    assert "dataset 'my_val' is not registered" in line and "DATASETS.COCO_FORMAT" in line


def test_eval_only_with_imagenet_backbone_weights_refuses(tmp_path):
    """The COCO configs' MODEL.WEIGHTS is the ImageNet trunk: --eval-only must not download it and score random
    heads (it died in a URLError traceback)."""
    config = os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_50_FPN_1x_coco.yaml")
    line = _one_line_error(_train_net(tmp_path, "--config-file", config, "--eval-only"))
    assert "--eval-only needs trained weights" in line and "detectron2://ImageNetPretrained/MSRA/R-50.pkl" in line
    assert "backbone" in line and "model_final.pth" in line


def test_test_time_augmentation_of_retinanet_refuses(tmp_path):
    config = os.path.join(ROOT, "configs", "Baselines", "retinanet_R_18_FPN_shapes.yaml")
    line = _one_line_error(_train_net(tmp_path, "--config-file", config, "TEST.AUG.ENABLED", "True"))
    assert "TEST.AUG.ENABLED" in line and "RetinaNet" in line and "GeneralizedRCNN" in line


def test_amp_on_the_cpu_refuses_before_the_dataset_is_made(tmp_path):
    """SOLVER.AMP.ENABLED on a CPU run was detectron2's AMPTrainer assertion after the dataset and the model were
    built; --eval-only does not train, so it is not refused there."""
    line = _one_line_error(_train_net(tmp_path, "--config-file", CONFIG, "SOLVER.AMP.ENABLED", "True",
                                      "MODEL.DEVICE", "cpu"))
    assert line.startswith("error: SOLVER.AMP.ENABLED: mixed-precision training") and "MODEL.DEVICE is 'cpu'" in line
    assert not (tmp_path / "out" / "shapes").exists(), "the dataset was made first"


@pytest.mark.parametrize("config, opts, expected", [
    ("IoUNet/iounet_R_18_FPN_shapes.yaml", ("MODEL.IOU_NET.NMS_TEST", "bogus"),
     "error: MODEL.IOU_NET.NMS_TEST must be one of"),
    ("IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml", ("MODEL.IFR.MODE", "implict"),
     "error: MODEL.IFR.MODE must be 'implicit' or 'explicit', got 'implict'"),
    ("Baselines/faster_rcnn_R_18_FPN_shapes.yaml", ("MODEL.ROI_HEADS.NAME", "StandardROIHead"),
     "error: MODEL.ROI_HEADS.NAME 'StandardROIHead': no such component in detectron2's ROI_HEADS registry"),
])
def test_a_config_value_the_model_refuses_is_one_line_before_launch(tmp_path, config, opts, expected):
    """The methods check their config values when the model is built; train_net.py builds it once on the CPU before
    anything starts, so a wrong value is one line, not a traceback after the dataset is made."""
    line = _one_line_error(_train_net(tmp_path, "--config-file", os.path.join(ROOT, "configs", config), *opts))
    assert line.startswith(expected), line
    assert not (tmp_path / "out" / "shapes").exists(), "the dataset was made first"


def test_check_model_turns_only_config_errors_into_one_line(monkeypatch):
    import torch

    from d2_refine.engine import ConfigError, check_model, checks, setup_cfg

    cfg = setup_cfg(CONFIG, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(3)
    check_model(cfg)  # a valid config: nothing raised, and the caller's generator did not move
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))

    def raising(exc):
        def build(cfg):
            raise exc
        return build

    monkeypatch.setattr(checks, "build_model", raising(ValueError("MODEL.FPT.INPUT must be one of ('a',)\nmore")))
    with pytest.raises(ConfigError, match=r"^MODEL.FPT.INPUT must be one of \('a',\)$"):
        check_model(cfg)
    for exc in (ValueError("shape mismatch in a layer"), KeyError("bbox"), RuntimeError("MODEL.X.Y")):
        monkeypatch.setattr(checks, "build_model", raising(exc))
        with pytest.raises(type(exc)) as e:  # not a config value: propagates as it is
            check_model(cfg)
        assert type(e.value) is type(exc)
    monkeypatch.setattr(checks, "build_model", raising(KeyError("No object named 'Nope' found in 'X' registry!")))
    with pytest.raises(ConfigError, match=r"^a config key 'Nope': no such component in detectron2's X registry"):
        check_model(cfg)


def test_a_checkpoint_that_cannot_be_read_is_one_line(tmp_path):
    """A corrupt MODEL.WEIGHTS: one line naming the file (torch's own message advises weights_only=False, wrong for a
    corrupt file), with --eval-only and for training alike."""
    bad = tmp_path / "corrupt.pth"
    bad.write_text("garbage")
    for extra in (["--eval-only"], []):
        r = _train_net(tmp_path, "--config-file", CONFIG, *extra, "MODEL.WEIGHTS", str(bad))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: checkpoint {bad} cannot be read (UnpicklingError: ") and \
            "not a PyTorch / detectron2 checkpoint" in last, last


def test_the_package_lines_reach_log_txt(tmp_path):
    # d2_refine's own loggers (here IFR's solver statistics after the evaluation) were set up by nobody: detectron2's
    # default_setup configures its own and fvcore's, and Python drops INFO lines without a handler
    config = os.path.join(ROOT, "configs", "IFR", "ifr_mask_rcnn_R_18_FPN_shapes.yaml")
    r = _train_net(tmp_path, "--config-file", config, "MODEL.IFR.PRETRAIN_STEPS", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "IFRMaskHead: implicit fixed-point refinement from iteration 0 on." in log
    assert "IFRMaskHead test-time solves:" in log
