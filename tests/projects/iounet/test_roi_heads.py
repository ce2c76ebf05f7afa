import copy
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import d2_refine  # noqa: E402
from d2_refine.projects.iounet import IoUNetROIHeads, PrRoIPooler  # noqa: E402
from helpers import ROOT  # noqa: E402

CONFIG = "configs/IoUNet/iounet_R_18_FPN_shapes.yaml"
SIZE = 96


def _cfg(*opts):
    import os

    cfg = d2_refine.add_d2_refine_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
                         "MODEL.IOU_NET.FC_DIM", 64, "MODEL.IOU_NET.NUM_ROIS", 64, "MODEL.RPN.POST_NMS_TOPK_TEST", 40,
                         "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
                         *opts])
    return cfg


def _input(gt=((8.0, 10.0, 50.0, 60.0), (40.0, 30.0, 90.0, 80.0)), classes=(1, 4), blank=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(3, SIZE, SIZE) if blank else torch.rand(3, SIZE, SIZE, generator=g) * 255
    inst = Instances((SIZE, SIZE))
    inst.gt_boxes = Boxes(torch.tensor(gt, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64).reshape(-1)
    return {"image": img, "instances": inst, "height": SIZE, "width": SIZE}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg())


def test_registered_with_prroi_poolers(model):
    heads = model.roi_heads
    assert isinstance(heads, IoUNetROIHeads)
    assert isinstance(heads.box_pooler, PrRoIPooler) and isinstance(heads.iou_pooler, PrRoIPooler)
    assert heads.iou_head.predictor.out_features == 6


def test_one_training_step_with_an_image_without_gt(model):
    m = copy.deepcopy(model).train()
    with EventStorage() as storage:
        losses = m([_input(), _input(gt=(), classes=(), seed=1)])
        assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_iou", "loss_rpn_cls", "loss_rpn_loc"}
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_iou"] > 0
        sum(losses.values()).backward()
        assert storage.latest()["iou_net/num_rois"][0] > 0
        assert "iou_net/mae" in storage.latest()
    g = m.roi_heads.iou_head.predictor.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the IoU loss is trained jointly: it reaches the backbone
    m.zero_grad()
    with EventStorage():
        m([_input()])["loss_iou"].backward()
    assert m.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0


def test_batch_without_any_gt_gives_zero_iou_loss(model):
    m = copy.deepcopy(model).train()
    with EventStorage():
        losses = m([_input(gt=(), classes=()), _input(gt=(), classes=(), seed=3)])
    assert losses["loss_iou"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("nms,refine,score_times_iou", [("iou_guided", True, True), ("iou_guided", False, False),
                                                         ("iou_guided_score_x_iou", True, True),
                                                         ("plain", True, True), ("plain", False, False)])
def test_inference_stages_and_blank_image(model, nms, refine, score_times_iou):
    m = copy.deepcopy(model).eval()
    m.roi_heads.nms, m.roi_heads.refine, m.roi_heads.score_times_iou = nms, refine, score_times_iou
    m.roi_heads.box_predictor.test_score_thresh = 0.0  # untrained weights: keep candidates
    with torch.no_grad():
        out = m([_input(), _input(blank=True)])
    for o in out:
        inst = o["instances"]
        assert len(inst) <= 100
        assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert inst.has("pred_ious") == (nms != "plain" or refine or score_times_iou)
    if refine:
        assert m.roi_heads.refine_stats()["boxes"] > 0


def test_evaluation_logs_its_refinement_statistics(model, caplog):
    """detectron2's inference_on_dataset on a few images: when it ends, one log line gives the images, the boxes
    refined, the mean steps and the mean predicted-IoU gain, and the statistics start again from zero."""
    import logging
    import math
    import re

    from detectron2.evaluation import inference_on_dataset

    m = copy.deepcopy(model).train()  # as the trainer's periodic evaluation finds it
    m.roi_heads.box_predictor.test_score_thresh = 0.0  # untrained weights: keep candidates
    batches = [[_input(seed=i)] for i in range(3)]
    with caplog.at_level(logging.INFO, logger="d2_refine.projects.iounet.roi_heads"):
        inference_on_dataset(m, batches, None)
    lines = [r.getMessage() for r in caplog.records if r.name == "d2_refine.projects.iounet.roi_heads"]
    assert len(lines) == 1, lines
    found = re.search(r"on (\d+) images: (\d+) boxes refined \(([\d.]+) per image\), ([\d.]+) steps and "
                      r"([-+][\d.]+) predicted IoU", lines[0])
    assert found, lines[0]
    images, boxes, per_image, steps, gain = (float(g) for g in found.groups())
    assert images == 3 and 0 < boxes <= 3 * m.roi_heads.pre_refine and per_image == pytest.approx(boxes / 3, abs=0.05)
    assert 1 <= steps <= m.roi_heads.refine_kwargs["steps"] and math.isfinite(gain)  # untrained head: any size
    assert m.training and m.roi_heads.refine_stats()["images"] == 0  # mode restored, statistics reset


def test_refinement_under_no_grad_with_frozen_params_and_inference_mode(model):
    m = copy.deepcopy(model).eval()
    m.requires_grad_(False)
    m.roi_heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        out = m([_input()])
    with torch.inference_mode():
        out2 = m([_input()])
    assert all(p.grad is None for p in m.parameters())
    for o in (out, out2):
        assert len(o[0]["instances"]) > 0 and torch.isfinite(o[0]["instances"].pred_boxes.tensor).all()
    assert m.roi_heads.refine_stats()["mean_steps"] >= 1


def test_iou_gradient_wrt_box_matches_finite_differences(model):
    heads = copy.deepcopy(model.roi_heads).eval()
    g = torch.Generator().manual_seed(0)
    # a smooth feature pyramid (random maps, smoothed) keeps finite differences well conditioned
    feats = [torch.nn.functional.avg_pool2d(torch.randn(1, 32, SIZE // s, SIZE // s, generator=g), 3, 1, 1)
             for s in (4, 8, 16, 32)]
    fn = heads._iou_fn(feats)
    boxes = torch.tensor([[10.3, 12.7, 40.2, 45.1], [30.4, 20.6, 70.9, 66.2]])  # away from level boundaries
    b = boxes.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(b)[:, 2].sum(), b)
    eps = 0.05
    fd = torch.zeros_like(boxes)
    with torch.no_grad():
        for i in range(2):
            for j in range(4):
                p, q = boxes.clone(), boxes.clone()
                p[i, j] += eps
                q[i, j] -= eps
                fd[i, j] = (fn(p)[i, 2] - fn(q)[i, 2]) / (2 * eps)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, fd, rtol=0.05, atol=2e-4 * float(fd.abs().max()) + 1e-6)


def test_missing_config_node_and_bad_nms_raise():
    with pytest.raises(KeyError, match="IOU_NET"):
        cfg = get_cfg()
        cfg.MODEL.ROI_HEADS.NAME = "IoUNetROIHeads"
        cfg.MODEL.DEVICE = "cpu"
        build_model(cfg)
    with pytest.raises(ValueError, match="NMS_TEST must be one of"):
        build_model(_cfg("MODEL.IOU_NET.NMS_TEST", "best"))


def test_mask_rcnn_variant_masks_follow_refined_boxes():
    torch.manual_seed(0)
    m = build_model(_cfg("MODEL.MASK_ON", True, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "PrRoIPool",
                         "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1))
    assert isinstance(m.roi_heads.mask_pooler, PrRoIPooler)
    inp = _input()
    inp["instances"].gt_masks = __import__("detectron2.structures", fromlist=["BitMasks"]).BitMasks(
        torch.zeros(2, SIZE, SIZE, dtype=torch.bool))
    m.train()
    with EventStorage():
        losses = m([inp])
    assert "loss_mask" in losses and "loss_iou" in losses and all(torch.isfinite(v) for v in losses.values())
    m.eval()
    m.roi_heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        inst = m([_input()])[0]["instances"]
    assert inst.has("pred_masks") and inst.has("pred_ious") and len(inst.pred_masks) == len(inst)


def _iou_training_step(heads, feats, targets, autocast):
    """loss_iou and the gradients of the IoU head's parameters and the feature maps after one backward, the
    features passing through a 1x1 identity conv that autocast runs in bfloat16 (as the FPN would)."""
    heads = copy.deepcopy(heads).train()
    feats = {k: f.clone().requires_grad_() for k, f in feats.items()}
    conv = torch.nn.Conv2d(32, 32, 1)
    torch.nn.init.dirac_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    torch.manual_seed(0)  # the jitter's draws
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = heads._forward_iou_losses({k: conv(f) for k, f in feats.items()}, targets)["loss_iou"]
    loss.backward()
    grads = [p.grad for p in heads.iou_head.parameters()] + [f.grad for f in feats.values()]
    return loss, grads


def test_iou_head_training_step_under_autocast_matches_float32(model):
    g = torch.Generator().manual_seed(4)
    feats = {f"p{i}": torch.nn.functional.avg_pool2d(torch.randn(2, 32, SIZE // s, SIZE // s, generator=g), 3, 1, 1)
             for i, s in zip(range(2, 6), (4, 8, 16, 32))}
    targets = [_input()["instances"], _input(gt=((5.0, 6.0, 30.0, 70.0),), classes=(2,))["instances"]]
    loss, grads = _iou_training_step(model.roi_heads, feats, targets, autocast=True)
    expected, expected_grads = _iou_training_step(model.roi_heads, feats, targets, autocast=False)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    # the pooled features, the FC layers and their gradients in bfloat16 (8 significant bits): the loss within
    # 2 %, every gradient within 5 % of the largest float32 gradient of its tensor
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    for a, b in zip(grads, expected_grads):
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, rtol=0, atol=5e-2 * float(b.abs().max()))


def test_one_training_step_under_autocast(model):
    m = copy.deepcopy(model).train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m([_input(), _input(gt=(), classes=(), seed=1)])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_iou"] > 0
    sum(losses.values()).backward()
    g = m.roi_heads.iou_head.predictor.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cuda_build_without_cuda_kernels_refused(monkeypatch):
    """On a GPU whose d2_refine._C lacks the CUDA kernels, PrRoIPool's pure-PyTorch fallback (memory RoIs x channels
    x height x bins) runs out of memory at COCO scale: building IoU-Net for CUDA is an error naming the fix. Tested
    on the CPU: the kernel table says no CUDA kernel, and MODEL.DEVICE is set to cuda after the config's check."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_roi_heads

    from d2_refine.ops import _library

    monkeypatch.setitem(_library._KERNELS, "cuda", {op: False for op in _library._KERNELS["cuda"]})
    shapes = {f"p{i}": ShapeSpec(channels=32, stride=2 ** i) for i in range(2, 7)}
    cfg = _cfg()
    cfg.MODEL.DEVICE = "cuda:0"
    with pytest.raises(RuntimeError) as e:
        build_roi_heads(cfg, shapes)
    msg = str(e.value)
    assert "\n" not in msg and "IoU-Net" in msg and "prroi_pool" in msg and "FORCE_CUDA=1" in msg, msg
    monkeypatch.setitem(_library._KERNELS, "cuda", {op: True for op in _library._KERNELS["cuda"]})
    assert isinstance(build_roi_heads(cfg, shapes), IoUNetROIHeads)  # with the kernels: built
    cfg.MODEL.DEVICE = "cpu"
    monkeypatch.setitem(_library._KERNELS, "cpu", {op: False for op in _library._KERNELS["cpu"]})
    assert isinstance(build_roi_heads(cfg, shapes), IoUNetROIHeads)  # the CPU fallback stays (tests, small runs)


def test_nms_mode_none_names_what_became_of_it():
    """NMS_GUIDE "none" (IoU-guided candidates ranked by the cls score) was removed with the move to NMS_TEST."""
    from d2_refine.engine import ConfigError, setup_cfg

    with pytest.raises(ConfigError) as e:  # the old key, in a config file or on the command line
        setup_cfg(os.path.join(ROOT, CONFIG), ["MODEL.IOU_NET.NMS_GUIDE", "none"])
    assert 'NMS_GUIDE "none"' in str(e.value) and "removed" in str(e.value) and '"plain"' in str(e.value)
    with pytest.raises(ValueError) as e:  # the old value under the new key
        build_model(_cfg("MODEL.IOU_NET.NMS_TEST", "none"))
    assert '"none"' in str(e.value) and "removed" in str(e.value) and '"plain"' in str(e.value)
