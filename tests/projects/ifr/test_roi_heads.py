"""IFRCascadeROIHeads: detectron2's inf/NaN-features test (zero detections, no assertion), which detectron2's own
CascadeROIHeads fails, and detectron2's exact result on finite inputs; the Cascade Mask R-CNN baseline config."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.roi_heads import CascadeROIHeads  # noqa: E402
from detectron2.structures import Boxes, ImageList, Instances  # noqa: E402

from d2_refine.engine.config import setup_cfg  # noqa: E402
from d2_refine.projects.ifr import IFRCascadeROIHeads  # noqa: E402

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "IFR",
                       "ifr_cascade_mask_rcnn_R_18_FPN_shapes.yaml")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = setup_cfg(_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.IFR.F_MAX_ITER_TEST", "3"])
    return build_model(cfg).eval()


def _features(model, fill=None, size=128):
    out = {}
    for name, spec in model.backbone.output_shape().items():
        shape = (1, spec.channels, size // spec.stride, size // spec.stride)
        out[name] = torch.full(shape, fill) if fill is not None else torch.randn(shape)
    return out


def _one_proposal(size=128):
    props = Instances((size - 2, size - 2))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0]]))
    props.objectness_logits = torch.tensor([1.0])
    return [props]


@pytest.mark.parametrize("fill", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_roiheads_inf_nan_data(model, fill):
    assert isinstance(model.roi_heads, IFRCascadeROIHeads)
    images = ImageList(torch.full((1, 3, 128, 128), fill), [(126, 126)])
    with torch.no_grad():
        det, _ = model.roi_heads(images, _features(model, fill), _one_proposal())
    assert len(det[0]) == 0


def test_detectron2_cascade_asserts_on_the_same_data(model):
    """What the class is for: detectron2's CascadeROIHeads with the same weights stops at Boxes.clip."""
    stock = model.roi_heads
    stock.__class__ = CascadeROIHeads
    try:
        images = ImageList(torch.full((1, 3, 128, 128), float("nan")), [(126, 126)])
        with torch.no_grad(), pytest.raises(AssertionError, match="infinite or NaN"):
            stock(images, _features(model, float("nan")), _one_proposal())
    finally:
        stock.__class__ = IFRCascadeROIHeads


def test_finite_inputs_give_detectron2s_result(model):
    torch.manual_seed(1)
    features = _features(model)
    images = ImageList(torch.rand(1, 3, 128, 128), [(126, 126)])
    props = Instances((126, 126))
    xy = torch.rand(40, 2) * 80
    props.proposal_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(40, 2) * 40], dim=1))
    props.objectness_logits = torch.rand(40)
    heads = model.roi_heads
    for predictor in heads.box_predictor:
        predictor.test_score_thresh = 0.0  # untrained: keep every detection
    with torch.no_grad():
        ours, _ = heads(images, features, [props])
        heads.__class__ = CascadeROIHeads
        try:
            theirs, _ = heads(images, features, [props])
        finally:
            heads.__class__ = IFRCascadeROIHeads
    assert len(ours[0]) > 0
    torch.testing.assert_close(ours[0].pred_boxes.tensor, theirs[0].pred_boxes.tensor)
    torch.testing.assert_close(ours[0].scores, theirs[0].scores)
    torch.testing.assert_close(ours[0].pred_masks, theirs[0].pred_masks)


def test_the_cascade_baseline_differs_from_cascade_ifr_only_in_the_mask_head():
    """configs/Baselines/cascade_mask_rcnn_R_18_FPN_shapes.yaml is the reference of Cascade + IFR: the same
    cascade, detectron2's CascadeROIHeads and its standard mask head."""
    baseline = os.path.join(os.path.dirname(_CONFIG), "..", "Baselines", "cascade_mask_rcnn_R_18_FPN_shapes.yaml")
    base, ifr = setup_cfg(baseline), setup_cfg(_CONFIG)
    assert (base.MODEL.ROI_HEADS.NAME, base.MODEL.ROI_MASK_HEAD.NAME) == ("CascadeROIHeads", "MaskRCNNConvUpsampleHead")
    assert base.MODEL.ROI_BOX_CASCADE_HEAD.IOUS == (0.5, 0.6, 0.7) and base.MODEL.MASK_ON
    base.defrost()
    base.MODEL.ROI_HEADS.NAME, base.MODEL.ROI_MASK_HEAD.NAME = ifr.MODEL.ROI_HEADS.NAME, ifr.MODEL.ROI_MASK_HEAD.NAME
    base.MODEL.IFR, base.OUTPUT_DIR = ifr.MODEL.IFR, ifr.OUTPUT_DIR
    assert base.dump() == ifr.dump()
    model = build_model(setup_cfg(baseline, ["MODEL.DEVICE", "cpu"]))
    assert type(model.roi_heads) is CascadeROIHeads and len(model.roi_heads.box_predictor) == 3
