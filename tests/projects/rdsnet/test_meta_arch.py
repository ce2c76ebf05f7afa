"""The RDSNet meta-architecture on detectron2: a training step, inference outputs, empty images, MBRM toggle."""
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from d2_refine.config import add_d2_refine_config  # noqa: E402
from d2_refine.projects.rdsnet import MBRM  # noqa: E402
from d2_refine.projects.rdsnet.meta_arch import RDSNet  # noqa: E402
from d2_refine.utils.testing import device_step_against_cpu, no_tf32  # noqa: E402
from helpers import cpu_and_cuda  # noqa: E402


def _tiny_cfg(**rdsnet):
    cfg = get_cfg()
    add_d2_refine_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "RDSNet"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 64  # GroupNorm(32) needs > 1 value per group on a 1x1 P7
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[12], [24], [48], [96], [192]]
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.RETINANET.NORM = "GN"
    cfg.MODEL.RDSNET.PIXEL_HEAD.CONV_DIM = 32
    cfg.MODEL.RDSNET.REP_DIM = 8
    for k, v in rdsnet.items():
        setattr(cfg.MODEL.RDSNET, k, v)
    return cfg


def _instances(h, w, boxes, polygons=False):
    inst = Instances((h, w))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.arange(len(boxes)) % 3
    if polygons:
        inst.gt_masks = PolygonMasks([[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes.tolist()])
    else:
        m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            m[k, y1:y2, x1:x2] = True
        inst.gt_masks = BitMasks(m)
    return inst


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_tiny_cfg())


def test_registered_and_built_from_config(model):
    assert META_ARCH_REGISTRY.get("RDSNet") is RDSNet
    assert isinstance(model, RDSNet)
    assert model.pixel_head.stride == 4
    num_anchors = model.anchor_generator.num_cell_anchors[0]  # 1 size x 3 ratios here
    assert model.head.rep_pred.out_channels == num_anchors * 2 * 8
    assert model.mbrm is None


@pytest.mark.parametrize("polygons", [False, True])
def test_one_training_step(model, polygons):
    model.train()
    inputs = [
        {"image": torch.rand(3, 70, 90) * 255, "instances": _instances(70, 90, [[5, 8, 40, 50], [30, 20, 85, 66]],
                                                                         polygons)},
        {"image": torch.rand(3, 64, 64) * 255, "instances": _instances(64, 64, [[0, 0, 64, 30]], polygons)},
    ]
    with EventStorage():
        losses = model(inputs)
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_mask"] > 0
        model.zero_grad()
        sum(losses.values()).backward()
    # the mask loss trains both streams
    assert model.pixel_head.predictor.weight.grad.abs().sum() > 0
    assert model.head.rep_pred.weight.grad.abs().sum() > 0
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


def test_empty_and_small_instances_give_zero_mask_loss(model):
    model.train()
    inputs = [
        {"image": torch.rand(3, 64, 64) * 255, "instances": _instances(64, 64, [])},
        # a GT mask of 8 x 8 = 64 px <= MASK_MIN_AREA (100): it trains boxes, not masks
        {"image": torch.rand(3, 64, 64) * 255, "instances": _instances(64, 64, [[10, 10, 18, 18]])},
    ]
    with EventStorage():
        losses = model(inputs)
        assert losses["loss_mask"].item() == 0.0
        assert all(torch.isfinite(v) for v in losses.values())
        model.zero_grad()
        sum(losses.values()).backward()
    assert torch.isfinite(model.pixel_head.predictor.weight.grad).all()


def test_missing_gt_masks_is_a_clear_error(model):
    model.train()
    inst = _instances(140, 140, [[5, 5, 50, 50]])  # one image: big enough for GroupNorm on a 2x2 P7
    inst.remove("gt_masks")
    with EventStorage(), pytest.raises(ValueError, match="gt_masks"):
        model([{"image": torch.rand(3, 140, 140) * 255, "instances": inst}])


def _infer(model, images, **kw):
    model.eval()
    with torch.no_grad():
        return [o["instances"] for o in model([dict(image=im, **kw) for im in images])]


def test_inference_outputs(model):
    model.test_score_thresh = 0.0  # random weights score ~0.01: keep everything
    try:
        (out,) = _infer(model, [torch.rand(3, 70, 90) * 255], height=140, width=180)
    finally:
        model.test_score_thresh = 0.05
    assert out.image_size == (140, 180)
    assert set(out.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    n = len(out)
    assert 0 < n <= 100
    assert out.pred_masks.shape == (n, 140, 180) and out.pred_masks.dtype == torch.bool
    b = out.pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 180).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 140).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert out.pred_classes.max() < 3 and (out.scores >= 0).all()
    assert (out.scores[:-1] >= out.scores[1:]).all()
    # masks live inside the padded crop of their box (padding 0.1, at least one pixel)
    for box, mask in zip(b, out.pred_masks):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs):
            pad = max(1.0, 0.1 * (box[2] - box[0]).item())
            assert xs.min() >= int(box[0] - pad) and xs.max() < box[2] - 1 + pad


def test_empty_image_inference(model):
    model.test_score_thresh = 1.1  # nothing passes
    try:
        (out,) = _infer(model, [torch.zeros(3, 64, 80)])
    finally:
        model.test_score_thresh = 0.05
    assert len(out) == 0 and out.image_size == (64, 80)
    assert out.pred_masks.shape == (0, 64, 80) and out.pred_boxes.tensor.shape == (0, 4)


def test_mbrm_changes_boxes_only_with_the_same_weights(model):
    model.test_score_thresh = 0.0
    image = torch.rand(3, 70, 90) * 255
    try:
        (plain,) = _infer(model, [image])
        model.mbrm = MBRM()
        (refined,) = _infer(model, [image])
    finally:
        model.mbrm = None
        model.test_score_thresh = 0.05
    assert len(plain) == len(refined) > 0
    assert torch.equal(plain.scores, refined.scores) and torch.equal(plain.pred_classes, refined.pred_classes)
    assert torch.equal(plain.pred_masks, refined.pred_masks)
    b = refined.pred_boxes.tensor
    assert torch.isfinite(b).all() and (b[:, :2] >= 0).all() and (b[:, 2] <= 90).all() and (b[:, 3] <= 70).all()
    # argmax decoding moves the detector's fractional edges to integer pixel edges
    assert torch.equal(b, b.round())
    assert not torch.equal(b, plain.pred_boxes.tensor)


def test_mbrm_enabled_from_config_and_checkpoint_independent():
    cfg = _tiny_cfg()
    cfg.MODEL.RDSNET.MBRM.ENABLED = True
    cfg.MODEL.RDSNET.MBRM.DECODE = "expectation"
    m = build_model(cfg)
    assert isinstance(m.mbrm, MBRM) and m.mbrm.decode == "expectation"
    # MBRM's kernel is config, not state: weights trained without it load with it
    assert not any(k.startswith("mbrm") for k in m.state_dict())


def _batch(empty=False):
    g = torch.Generator().manual_seed(1)
    if empty:  # an image without instances, one whose only mask is under MASK_MIN_AREA
        return [{"image": torch.rand(3, 128, 128, generator=g) * 255, "instances": _instances(128, 128, [], True)},
                {"image": torch.rand(3, 128, 128, generator=g) * 255,
                 "instances": _instances(128, 128, [[10, 10, 18, 18]], True)}]
    return [{"image": torch.rand(3, 150, 190, generator=g) * 255,
             "instances": _instances(150, 190, [[5, 8, 90, 100], [60, 40, 185, 140], [10, 100, 60, 148]], True)},
            {"image": torch.rand(3, 128, 128, generator=g) * 255,
             "instances": _instances(128, 128, [[0, 0, 128, 60]], True)}]


def _device_against_cpu(device):
    """RDSNet + MBRM on ``device`` against the CPU, from the same weights: float32 and AMP training steps (on a batch
    with masks and on one without a mask to train), and inference (boxes, classes, masks)."""
    import copy

    from torchvision.ops import box_iou

    torch.manual_seed(0)
    cfg = _tiny_cfg()
    cfg.MODEL.RDSNET.MBRM.ENABLED = True
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    base = build_model(cfg)
    for empty in (False, True):
        device_step_against_cpu(base, _batch(empty), device)
    model = copy.deepcopy(base).to(device).eval()
    images = [{"image": b["image"], "height": 300, "width": 380} for b in _batch()]
    with torch.no_grad():
        ours = [o["instances"].to("cpu") for o in model(images)]
        ref = [o["instances"] for o in base.eval()(images)]
    for a, b in zip(ref, ours):
        assert abs(len(a) - len(b)) <= 2
        a, b = a[:50], b[:50]
        iou = box_iou(a.pred_boxes.tensor, b.pred_boxes.tensor) * (a.pred_classes[:, None] == b.pred_classes)
        best, j = iou.max(dim=1)
        assert (best > 0.99).float().mean() > 0.95
        assert (a.pred_masks != b.pred_masks[j]).float().mean() < 1e-3


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_training_and_inference_on_a_device_match_the_cpu(device):
    with no_tf32():
        _device_against_cpu(device)
