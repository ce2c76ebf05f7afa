"""IoU-Net inference laid out for the GPU: no host round-trip per refinement step or per FPN level, and the same
refinement under torch.inference_mode(), torch.no_grad() and plain mode."""
import copy
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import d2_refine  # noqa: E402
from d2_refine.utils.host_sync import HostSyncCounter  # noqa: E402
from helpers import ROOT, cpu_and_cuda  # noqa: E402

SIZE = 96

def _cfg(*opts):
    cfg = d2_refine.add_d2_refine_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs/IoUNet/iounet_R_18_FPN_shapes.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
                         "MODEL.IOU_NET.FC_DIM", 64, "MODEL.RPN.POST_NMS_TOPK_TEST", 60, *opts])
    return cfg


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, SIZE, SIZE, generator=g) * 255, "height": SIZE, "width": SIZE}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(_cfg()).eval()
    m.roi_heads.box_predictor.test_score_thresh = 0.0  # untrained weights: keep candidates
    return m


def _box_branch_inputs(m, images):
    with torch.no_grad():
        batched = m.preprocess_image(images)
        features = m.backbone(batched.tensor)
        proposals, _ = m.proposal_generator(batched, features, None)
    return features, proposals


@pytest.mark.parametrize("nms", ["iou_guided", "plain"])
def test_box_branch_synchronises_at_most_8_times_per_image(model, nms):
    """The box branch of IoU-Net's inference (box head, NMS, refinement, score x IoU) on two images: the ops that
    would make the host wait for a GPU, counted on the CPU."""
    m = copy.deepcopy(model)
    m.roi_heads.nms = nms
    images = [_image(0), _image(1)]
    features, proposals = _box_branch_inputs(m, images)
    counter = HostSyncCounter()
    with torch.no_grad(), counter:
        results = m.roi_heads._forward_box(features, proposals)
    assert all(len(r) > 0 for r in results)  # refinement ran on real boxes
    per_image = counter.total / len(images)
    print(f"{nms}: {per_image} host synchronisations per image: {counter.counts}")
    assert per_image <= 8, counter.counts


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_refinement_is_the_same_under_inference_mode_no_grad_and_plain_mode(model, device):
    """The boxes that refinement starts from are created inside the caller's mode; under inference_mode they
    are inference tensors, on which enable_grad records no graph. On CUDA the whole inference runs on the op
    library's CUDA kernels (multi-level PrRoIPool and its box gradient, padded IoU-guided NMS); compared within a
    looser tolerance there, where the three modes may not run the same library kernels (cuDNN, cuBLAS)."""
    m = copy.deepcopy(model).to(device)
    m.requires_grad_(False)
    tol = dict(rtol=1e-5, abs=1e-7) if device == "cpu" else dict(rtol=1e-3, abs=1e-4)
    close = dict() if device == "cpu" else dict(rtol=1e-4, atol=1e-3)
    outs = {}
    for name, ctx in (("plain", torch.enable_grad), ("no_grad", torch.no_grad),
                      ("inference_mode", torch.inference_mode)):
        m.roi_heads.reset_refine_stats()
        with ctx():
            inst = m([_image(2)])[0]["instances"]
        outs[name] = (inst, m.roi_heads.refine_stats())
    ref, ref_stats = outs["plain"]
    assert ref_stats["boxes"] > 0 and ref_stats["mean_steps"] > 1 and ref_stats["mean_iou_gain"] != 0
    for name in ("no_grad", "inference_mode"):
        inst, stats = outs[name]
        assert stats == pytest.approx(ref_stats, rel=tol["rtol"], abs=tol["abs"]), name
        assert len(inst) == len(ref), name
        assert inst.pred_boxes.tensor.device.type == device
        torch.testing.assert_close(inst.pred_boxes.tensor.clone(), ref.pred_boxes.tensor.detach(), msg=name, **close)
        torch.testing.assert_close(inst.scores.clone(), ref.scores.detach(), msg=name, **close)


def test_plain_mode_refinement_never_computes_the_maps_gradient(model):
    """In plain mode with parameters that require grad (a model as build_model returns it) the feature maps
    carry the backbone's graph; each refinement step asks only for the boxes' gradient, and the pooling's
    backward must not compute the maps' (a pyramid-sized buffer per step on the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = copy.deepcopy(model)
    assert all(p.requires_grad for p in m.parameters())
    need_maps = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.d2_refine._multilevel_prroi_pool_backward.default:
                need_maps.append(args[-2])
            return func(*args, **(kwargs or {}))

    m.roi_heads.reset_refine_stats()
    with Spy():
        inst = m([_image(2)])[0]["instances"]
    assert len(inst) > 0 and m.roi_heads.refine_stats()["mean_steps"] > 1
    assert need_maps and not any(need_maps), need_maps
