import pytest
import torch

from d2_refine.ops import iou_guided_nms
from d2_refine.projects.iounet.inference import iounet_inference_single_image
from d2_refine.projects.iounet.jitter import pairwise_iou


def _case(seed=0, num_props=60, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_props, 2, generator=g) * 150
    wh = 10 + torch.rand(num_props, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], 1).repeat(1, num_classes)
    boxes = boxes + torch.randn(boxes.shape, generator=g) * 2
    logits = torch.randn(num_props, num_classes + 1, generator=g) * 2
    return boxes, logits.softmax(1)


def _iou_fn(gt):
    def fn(b):  # a perfect, differentiable 'IoU head': best true IoU, the same for every class
        return pairwise_iou(b, gt).max(dim=1).values[:, None]

    return fn


def test_all_stages_off_is_detectron2_inference():
    d2 = pytest.importorskip("detectron2.modeling.roi_heads.fast_rcnn")
    boxes, scores = _case()
    out = iounet_inference_single_image(boxes, scores, (200, 190), lambda b: None, nms="plain", refine=False,
                                        score_times_iou=False)
    ref, _ = d2.fast_rcnn_inference_single_image(boxes, scores, (200, 190), 0.05, 0.5, 100)
    torch.testing.assert_close(out["boxes"], ref.pred_boxes.tensor)
    torch.testing.assert_close(out["scores"], ref.scores)
    assert torch.equal(out["classes"], ref.pred_classes)
    assert out["ious"] is None


def test_refinement_raises_true_iou_and_scores_use_it():
    boxes, scores = _case(1)
    gt = boxes[::6, :4] + 3.0  # the proposals are a few pixels off these
    base = iounet_inference_single_image(boxes, scores, (200, 190), _iou_fn(gt), nms="plain", refine=False,
                                         score_times_iou=True)
    ref = iounet_inference_single_image(boxes, scores, (200, 190), _iou_fn(gt), nms="plain", refine=True,
                                        score_times_iou=True)
    assert len(ref["boxes"]) == len(base["boxes"]) > 0
    assert ref["refine_gain"].mean() > 0.02 and torch.isfinite(ref["boxes"]).all()
    true_iou = pairwise_iou(ref["boxes"], gt).max(1).values
    torch.testing.assert_close(ref["ious"], true_iou.clamp(0, 1))
    assert (ref["scores"][:-1] >= ref["scores"][1:]).all()
    assert ref["boxes"][:, 0::2].max() <= 190 and ref["boxes"][:, 1::2].max() <= 200


def _iou_guided_expected(boxes, scores, image_size, iou_fn, guide, topk=100):
    """The IoU-guided path built step by step: candidates (proposal, class) with p >= 0.05, each with the clipped box
    of its proposal's argmax class and that box's IoU, then the unpadded op, then the topk."""
    per_class = boxes.reshape(len(boxes), -1, 4).clone()
    per_class[..., 0::2] = per_class[..., 0::2].clamp(0, image_size[1])
    per_class[..., 1::2] = per_class[..., 1::2].clamp(0, image_size[0])
    fg = scores[:, :-1]
    rows, cls = torch.nonzero(fg >= 0.05, as_tuple=True)
    cand = per_class[rows, fg.argmax(1)[rows]]
    ious = iou_fn(cand)[:, 0]
    keep, kept = iou_guided_nms(cand, fg[rows, cls], ious, cls, 0.5, guide=guide)
    keep, kept = keep[:topk], kept[:topk]
    return cand[keep], kept, cls[keep], ious[keep]


@pytest.mark.parametrize("mode,guide", [("iou_guided", "rank"), ("iou_guided_score_x_iou", "weight")])
def test_iou_guided_nms_path_is_the_op_on_the_candidates(mode, guide):
    boxes, scores = _case(2)
    fn = _iou_fn(boxes[::5, :4] + 2.0)
    out = iounet_inference_single_image(boxes, scores, (200, 190), fn, nms=mode, refine=False, score_times_iou=False)
    ref_boxes, ref_scores, ref_classes, ref_ious = _iou_guided_expected(boxes, scores, (200, 190), fn, guide)
    assert 10 < len(ref_boxes) <= 100
    torch.testing.assert_close(out["boxes"], ref_boxes)
    torch.testing.assert_close(out["scores"], ref_scores)
    assert torch.equal(out["classes"], ref_classes)
    torch.testing.assert_close(out["ious"], ref_ious.clamp(0, 1))


def test_iou_guided_nms_path_and_empty_image():
    boxes, scores = _case(2)
    gt = boxes[::5, :4]
    out = iounet_inference_single_image(boxes, scores, (200, 190), _iou_fn(gt), nms="iou_guided", refine=True)
    assert len(out["boxes"]) > 0 and (out["scores"] >= 0).all() and out["ious"] is not None
    # no candidate above the threshold -> empty result, not an error
    low = torch.full_like(scores, 0.01)
    low[:, -1] = 1.0
    for nms in ("iou_guided", "iou_guided_score_x_iou", "plain"):
        out = iounet_inference_single_image(boxes, low, (200, 190), _iou_fn(gt), nms=nms, refine=True)
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["classes"].shape == (0,)
    out = iounet_inference_single_image(torch.zeros((0, 12)), torch.zeros((0, 4)), (20, 20), _iou_fn(gt))
    assert out["boxes"].shape == (0, 4)


def test_score_times_iou_uses_the_iou_of_the_output_clipped_box():
    boxes, scores = _case(3)

    def fn(b):  # a toy class-agnostic predictor that prefers right edges further right (past the image)
        return ((b[:, 2] - 100.0) / 100.0).clamp(0, 1)[:, None]

    kw = dict(nms="plain", refine=True, refine_kwargs=dict(step_size=20.0, early_stop=0.0), topk=-1)
    out = iounet_inference_single_image(boxes, scores, (200, 190), fn, score_times_iou=True, **kw)
    plain = iounet_inference_single_image(boxes, scores, (200, 190), fn, score_times_iou=False, **kw)
    assert (out["boxes"][:, 2] == 190).sum() > 5  # refined boxes pushed past the right border, then clipped
    torch.testing.assert_close(out["ious"], fn(out["boxes"])[:, 0])
    # each detection's score is its cls score times the IoU of the box that is output
    key = lambda o: [tuple(b) + (int(c),) for b, c in zip(o["boxes"].tolist(), o["classes"].tolist())]  # noqa: E731
    cls_score = dict(zip(key(plain), plain["scores"].tolist()))
    expected = torch.tensor([cls_score[k] for k in key(out)]) * out["ious"]
    torch.testing.assert_close(out["scores"], expected)
