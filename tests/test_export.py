"""Export (docs/EXPORT.md): the ops and the FPT backbone under torch.export, the torch-level parts of every ROI
head under torch.export, and every method's shapes model through detectron2's export tooling (TracingAdapter +
torch.jit.trace), each checked against eager on its own inputs and on inputs it was not traced with."""
import io
import os

import pytest
import torch
from torch import nn
from torch.export import Dim

from d2_refine.ops import has_ops, iou_guided_nms, prroi_pool
from helpers import ROOT, cpu_and_cuda, ops_missing_reason

needs_ops = pytest.mark.skipif(not has_ops(), reason=f"{ops_missing_reason()}: the pure-PyTorch fallbacks branch on "
                               "tensor values in Python and do not export")


@pytest.fixture(autouse=True)
def _one_thread(threads):
    threads(1)  # tiny graphs: tracing overhead dominates, threads only add contention


def _export(module, args, dynamic_shapes=None):
    with torch.no_grad():
        return torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False)


def _assert_same(out, ref):
    out = out if isinstance(out, (tuple, list)) else (out,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def _boxes(n, extent, generator, min_size=8.0):
    xy = torch.rand(n, 2, generator=generator) * extent * 0.6
    return torch.cat([xy, xy + min_size + torch.rand(n, 2, generator=generator) * extent * 0.35], 1)


# ------------------------------------------------------------------------------------------------------ ops
class _PrRoIPool(nn.Module):
    def forward(self, input, rois):
        return prroi_pool(input, rois, (3, 2), spatial_scale=0.5, aligned=True)


class _IoUGuidedNMS(nn.Module):
    def forward(self, boxes, scores, ious, idxs):
        return iou_guided_nms(boxes, scores, ious, idxs, 0.5, guide="rank")


def _rois(n, generator, num_images=2):
    index = torch.randint(0, num_images, (n, 1), generator=generator).float()
    return torch.cat([index, _boxes(n, 16, generator)], 1)


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_prroi_pool_export_matches_eager(device):
    g = torch.Generator().manual_seed(0)
    x, rois = torch.randn(2, 4, 8, 8, generator=g).to(device), _rois(5, g).to(device)
    ep = _export(_PrRoIPool(), (x, rois), dynamic_shapes=({0: Dim("N", min=1, max=64)}, {0: Dim("K", max=4096)}))
    assert "d2_refine.prroi_pool" in str(ep.graph)  # the compiled op, not the reference
    for x, rois in ((x, rois), (x[:1], _rois(9, g, 1).to(device)), (x, rois[:0])):  # other K, N; no RoI
        _assert_same(ep.module()(x, rois), _PrRoIPool()(x, rois))


@needs_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_iou_guided_nms_export_matches_eager(device):
    g = torch.Generator().manual_seed(0)

    def inputs(n):
        return (_boxes(n, 64, g).to(device), torch.rand(n, generator=g).to(device),
                torch.rand(n, generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device))

    ep = _export(_IoUGuidedNMS(), inputs(40), dynamic_shapes=({0: Dim("N", max=100000)},) * 4)
    assert "d2_refine.iou_guided_nms" in str(ep.graph)
    for n in (40, 17, 0):  # the number of kept boxes is data-dependent (an unbacked size in the program)
        args = inputs(n)
        _assert_same(ep.module()(*args), _IoUGuidedNMS()(*args))


# ------------------------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("config", ["mask_rcnn_fpt_lite_R_18_shapes.yaml", "mask_rcnn_fpt_paper_R_18_shapes.yaml"])
def test_fpt_backbone_export_matches_eager(config):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_backbone

    from d2_refine.engine.config import setup_cfg

    cfg = setup_cfg(os.path.join(ROOT, "configs", "FPT", config), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 128, 128, generator=g)
    # any size divisible by the FPN's 32 from 96 px (a 1 x 1 p6 level at 64 px would be specialised on)
    h, w = Dim("h", min=3, max=64), Dim("w", min=3, max=64)
    ep = _export(backbone, (x,), dynamic_shapes=({0: Dim("n", min=1, max=16), 2: 32 * h, 3: 32 * w},))
    for x in (x, torch.randn(1, 3, 96, 160, generator=g)):
        with torch.no_grad():
            out, ref = ep.module()(x), backbone(x)
        assert list(out) == list(ref) == backbone._out_features
        _assert_same(list(out.values()), list(ref.values()))


# ------------------------------------------------------------------------ ROI heads: the torch-level parts
def test_iounet_iou_head_and_prroi_box_branch_export():
    """PrRoIPool pooling + the IoU head (IoU-Net's scoring of boxes), for a fixed number of boxes: detectron2's
    ROIPooler turns the box counts into a tensor with torch.as_tensor, which pins that number in the program."""
    pytest.importorskip("detectron2")
    from detectron2.structures import Boxes

    from d2_refine.projects.iounet.iou_head import IoUHead
    from d2_refine.projects.iounet.pooler import PrRoIPooler

    class IoUScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.pooler = PrRoIPooler(7, (1 / 4, 1 / 8, 1 / 16, 1 / 32))
            self.head = IoUHead(8, 7, num_classes=3, fc_dim=32)

        def forward(self, p2, p3, p4, p5, boxes):
            return self.head.decode(self.head(self.pooler([p2, p3, p4, p5], [Boxes(boxes)])))

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 128 // s, 128 // s, generator=g) for s in (4, 8, 16, 32)]
    torch.manual_seed(0)
    model = IoUScores().eval()
    ep = _export(model, (*feats, _boxes(12, 128, g)))
    if has_ops():
        assert "d2_refine.prroi_pool" in str(ep.graph)
    for _ in range(2):
        args = ([f + torch.randn(f.shape, generator=g) for f in feats], _boxes(12, 128, g))  # unseen values
        with torch.no_grad():
            _assert_same(ep.module()(*args[0], args[1]), model(*args[0], args[1]))


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_ifr_mask_head_export_matches_eager(mode):
    """The mask head's layers (fixed-point solve or K-unroll, deconv, predictor) for any number of RoIs; the
    exported solve always runs F_MAX_ITER_TEST evaluations (eager stops early once every RoI converged)."""
    pytest.importorskip("detectron2")
    pytest.importorskip("torchdeq")
    from detectron2.layers import ShapeSpec

    from d2_refine.layers.deq import DEQFixedPoint
    from d2_refine.projects.ifr import IFRMaskHead

    class Layers(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            return self.head.layers(x)

    torch.manual_seed(0)
    head = IFRMaskHead(ShapeSpec(channels=16, height=14, width=14), num_classes=2, mode=mode, num_unroll=2,
                       deq=DEQFixedPoint(f_max_iter_test=3)).eval()
    model = Layers(head)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 14, 14, generator=g)
    ep = _export(model, (x,), dynamic_shapes=({0: Dim("R", min=1, max=4096)},))
    for x in (x, torch.randn(7, 16, 14, 14, generator=g)):
        with torch.no_grad():
            _assert_same(ep.module()(x), model(x))


def test_internet_makeup_and_level_pooler_export():
    """InterNet's inference-time addition: the make-up layer on every level, then pooling from the level its
    rule assigns (fixed number of boxes, as for every detectron2 ROIPooler)."""
    pytest.importorskip("detectron2")
    from detectron2.structures import Boxes

    from d2_refine.projects.internet.makeup import MakeupLayer
    from d2_refine.projects.internet.pooler import LevelAssignedROIPooler

    strides = (4, 8, 16, 32)

    class MadeUpBoxFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.makeup = MakeupLayer(8, num_conv=1, num_levels=len(strides))
            self.pooler = LevelAssignedROIPooler(7, tuple(1 / s for s in strides), 0, "ROIAlignV2", strides=strides)

        def forward(self, p2, p3, p4, p5, boxes):
            made = [self.makeup(f, i) for i, f in enumerate((p2, p3, p4, p5))]
            return self.pooler(made, [Boxes(boxes)])

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 256 // s, 256 // s, generator=g) for s in strides]
    torch.manual_seed(0)
    model = MadeUpBoxFeatures().eval()
    ep = _export(model, (*feats, _boxes(10, 256, g, min_size=4)))
    feats2, boxes2 = [f.flip(-1) for f in feats], _boxes(10, 256, g, min_size=4)  # other levels per box
    with torch.no_grad():
        _assert_same(ep.module()(*feats2, boxes2), model(*feats2, boxes2))


def test_rdsnet_mbrm_export_matches_eager():
    """MBRM (RDSNet's box refinement from the soft masks) for any number of detections."""
    pytest.importorskip("detectron2")
    from d2_refine.projects.rdsnet.mbrm import MBRM

    class Refine(nn.Module):
        def __init__(self):
            super().__init__()
            self.mbrm = MBRM()

        def forward(self, masks, boxes):
            return self.mbrm(masks=masks, boxes=boxes)

    g = torch.Generator().manual_seed(0)
    masks, boxes = torch.rand(6, 40, 56, generator=g), _boxes(6, 40, g)
    n = Dim("N", max=1000)
    ep = _export(Refine(), (masks, boxes), dynamic_shapes=({0: n}, {0: n}))
    for k in (6, 3):
        _assert_same(ep.module()(masks[:k], boxes[:k]), Refine()(masks[:k], boxes[:k]))


# -------------------------------------------------------------- whole models: detectron2's TracingAdapter
SHAPES_MODELS = {
    "mask_rcnn": ("Baselines/mask_rcnn_R_18_FPN_shapes.yaml", []),
    "fpt": ("FPT/mask_rcnn_fpt_lite_R_18_shapes.yaml", []),
    "internet": ("InterNet/internet_l2_R_18_FPN_shapes.yaml", []),
    "ifr": ("IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml", ["MODEL.IFR.F_MAX_ITER_TEST", "3"]),
    # the refinement is autograd at test time, which tracing cannot record: see test_iounet_trace_...
    "iounet": ("IoUNet/iounet_R_18_FPN_shapes.yaml", ["MODEL.IOU_NET.REFINE_TEST", "False"]),
    "rdsnet_mbrm": ("RDSNet/rdsnet_R_18_FPN_shapes.yaml", ["MODEL.RDSNET.MBRM.ENABLED", "True"]),
}
# few proposals and candidates; untrained weights score near 1 / 7 (R-CNNs) or 0.01 (RetinaNet's prior): every
# candidate is kept until _keep_half_of sets the score threshold
_SMALL = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
          "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100",
          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]


def _shapes_model(name, opts=()):
    from detectron2.modeling import build_model

    from d2_refine.engine.config import setup_cfg

    config, extra = SHAPES_MODELS[name]
    cfg = setup_cfg(os.path.join(ROOT, "configs", config), _SMALL + extra + list(opts))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _keep_half_of(model, image):
    """Score threshold just under the median score of ``image``'s detections: other images then give other
    numbers of detections (when the untrained scores differ at all)."""
    with torch.no_grad():
        threshold = float(_inference(model, image).scores.median()) * (1 - 1e-4)
    if hasattr(model, "roi_heads"):
        model.roi_heads.box_predictor.test_score_thresh = threshold
    else:
        model.test_score_thresh = threshold


def _inference(model, image):
    """detectron2's export recipe: R-CNNs without post-processing, one-stage models through forward."""
    if hasattr(model, "roi_heads"):
        return model.inference([{"image": image}], do_postprocess=False)[0]
    return model([{"image": image, "height": image.shape[1], "width": image.shape[2]}])[0]["instances"]


def _assert_same_instances(out, ref):
    assert tuple(int(s) for s in out.image_size) == tuple(ref.image_size)  # traced: a size tensor
    assert set(out.get_fields()) == set(ref.get_fields())
    assert len(ref) > 0
    for k in ref.get_fields():
        a, b = out.get(k), ref.get(k)
        a, b = getattr(a, "tensor", a), getattr(b, "tensor", b)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit")
@pytest.mark.parametrize("name", list(SHAPES_MODELS))
def test_tracing_adapter_trace_matches_eager(name, monkeypatch):
    """TracingAdapter + torch.jit.trace on one 128 px image; the trace must reproduce eager on another image
    (R-CNNs: another size; RDSNet, whose trace keeps the traced image size, the same size) and with a different
    number of detections on each (seeded weights and images), so that no output size is frozen into the trace."""
    pytest.importorskip("detectron2")
    if name == "ifr":
        pytest.importorskip("torchdeq")
    from detectron2.export import TracingAdapter

    if name.startswith("rdsnet"):
        from d2_refine.projects.rdsnet import meta_arch

        monkeypatch.setattr(meta_arch, "_MASK_CHUNK", 4)  # several chunks: their number must not be traced
    model = _shapes_model(name)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 128, 128, generator=g) * 255
    other_size = (128, 128) if name.startswith("rdsnet") else (96, 128)
    others = [torch.rand(3, *other_size, generator=g) * 255 * s for s in (1.0, 0.3)]
    _keep_half_of(model, image)
    adapter = TracingAdapter(model, (image,), _inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
        if name == "iounet" and has_ops():  # the compiled ops are recorded as ops of the TorchScript graph
            graph = str(traced.inlined_graph)
            assert "d2_refine::prroi_pool" in graph and "d2_refine::iou_guided_nms" in graph
        buffer = io.BytesIO()  # saved and loaded back, as deployed
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        traced = torch.jit.load(buffer)
        counts = []
        for x in [image] + others:
            ref = _inference(model, x)
            _assert_same_instances(adapter.outputs_schema(traced(x)), ref)
            counts.append(len(ref))
    assert len(set(counts)) == len(counts), f"{name}: detections per image {counts}"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit")
def test_iounet_trace_refuses_refinement():
    """The refinement differentiates the IoU head w.r.t. the boxes at test time: neither torch.jit.trace (it
    cannot see the tensors autograd saves) nor torch.export (fake constants) records it. One clear error."""
    pytest.importorskip("detectron2")
    from detectron2.export import TracingAdapter

    model = _shapes_model("iounet", ["MODEL.IOU_NET.REFINE_TEST", "True"])
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    adapter = TracingAdapter(model, (image,), _inference)
    with pytest.raises(RuntimeError, match="MODEL.IOU_NET.REFINE_TEST False"), torch.no_grad():
        torch.jit.trace(adapter, (image,), check_trace=False)
