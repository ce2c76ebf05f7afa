import copy

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import d2_refine  # noqa: E402
from helpers import ROOT  # noqa: E402
from d2_refine.projects.iounet import IoUNetROIHeads, PrRoIPooler  # noqa: E402

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


@pytest.mark.parametrize("iou_nms,refine,score_times_iou", [(True, True, True), (True, False, False),
                                                              (False, True, True), (False, False, False)])
def test_inference_stages_and_blank_image(model, iou_nms, refine, score_times_iou):
    m = copy.deepcopy(model).eval()
    m.roi_heads.iou_nms, m.roi_heads.refine, m.roi_heads.score_times_iou = iou_nms, refine, score_times_iou
    m.roi_heads.box_predictor.test_score_thresh = 0.0  # untrained weights: keep candidates
    with torch.no_grad():
        out = m([_input(), _input(blank=True)])
    for o in out:
        inst = o["instances"]
        assert len(inst) <= 100
        assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert inst.has("pred_ious") == (iou_nms or refine or score_times_iou)
    if refine:
        assert m.roi_heads.refine_stats()["boxes"] > 0


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


def test_missing_config_node_and_bad_guide_raise():
    with pytest.raises(KeyError, match="IOU_NET"):
        cfg = get_cfg()
        cfg.MODEL.ROI_HEADS.NAME = "IoUNetROIHeads"
        cfg.MODEL.DEVICE = "cpu"
        build_model(cfg)
    with pytest.raises(ValueError, match="NMS_GUIDE"):
        build_model(_cfg("MODEL.IOU_NET.NMS_GUIDE", "best"))


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
