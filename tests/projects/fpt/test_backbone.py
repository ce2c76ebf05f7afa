"""FPTBackbone on detectron2: same outputs as the wrapped FPN, registered builders, lateral input, checkpoints,
gradients, and one Mask R-CNN training step on odd-sized images."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.modeling.backbone import BACKBONE_REGISTRY  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from d2_refine.config import add_d2_refine_config  # noqa: E402
from d2_refine.projects.fpt import FPTBackbone  # noqa: E402

C = 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _cfg(name="build_resnet_fpt_backbone", setting=None, **fpt):
    """A small R-18 FPT config; ``setting``: "lite" / "paper" / "release" merges configs/FPT/Base-FPT-<setting>.yaml."""
    cfg = get_cfg()
    add_d2_refine_config(cfg)
    if setting:
        cfg.merge_from_file(os.path.join(ROOT, "configs", "FPT", f"Base-FPT-{setting}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = C
    retina = "retinanet" in name or "retinanet" in fpt.get("WRAPPED_BACKBONE", "")
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"] if retina else ["res2", "res3", "res4", "res5"]
    for key, value in fpt.items():
        node = cfg.MODEL.FPT
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _fpn_twin(cfg, name):
    torch.manual_seed(0)
    return BACKBONE_REGISTRY.get(name)(cfg, _shape())


def _shape():
    from detectron2.layers import ShapeSpec
    return ShapeSpec(channels=3)


@pytest.mark.parametrize("name,fpn_name,levels", [
    ("build_resnet_fpt_backbone", "build_resnet_fpn_backbone", ["p2", "p3", "p4", "p5"]),
    ("build_retinanet_resnet_fpt_backbone", "build_retinanet_resnet_fpn_backbone", ["p3", "p4", "p5", "p6", "p7"]),
])
def test_output_levels_shapes_and_strides_match_the_wrapped_fpn(name, fpn_name, levels):
    cfg = _cfg(name)
    bb = build_backbone(cfg).eval()
    fpn = _fpn_twin(cfg, fpn_name).eval()
    assert isinstance(bb, FPTBackbone) and bb.in_features == levels
    assert bb.output_shape() == fpn.output_shape()
    assert bb.size_divisibility == fpn.size_divisibility and bb.padding_constraints == fpn.padding_constraints
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        out, ref = bb(x), fpn(x)
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape, k
    channels = {lv: (6 if len(levels) == 5 else 5) * C for lv in bb.pyramid.levels}
    assert bb.pyramid.input_channels() == channels


def test_p6_is_repooled_from_the_transformed_p5():
    bb = build_backbone(_cfg()).eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2])


def test_fpt_lite_preset_keeps_p2_and_transforms_p3_p5():
    cfg = _cfg(setting="lite")
    bb = build_backbone(cfg).eval()
    assert bb.in_features == ["p3", "p4", "p5"] and sorted(bb.pyramid.st.keys()) == ["p4", "p5"]
    assert bb.pyramid.fuse["p3"].conv.kernel_size == (1, 1)
    assert all(gt.mode == "dot" for gt in bb.pyramid.gt.values())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out, fpn_out = bb(x), bb.fpn(x)
    torch.testing.assert_close(out["p2"], fpn_out["p2"])
    assert not torch.allclose(out["p3"], fpn_out["p3"])
    torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2])


def test_lateral_input_deletes_the_output_convs_and_accepts_odd_sizes():
    bb = build_backbone(_cfg(setting="release")).train()
    names = [n for n, _ in bb.named_parameters()]
    assert not any("fpn_output" in n for n in names) and any("fpn_lateral2" in n for n in names)
    assert isinstance(bb.pyramid.st["p2"].out.norm, torch.nn.BatchNorm2d)
    out = bb(torch.randn(2, 3, 97, 75))  # not a multiple of 32: no top-down path to break
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(25, 19), (13, 10), (7, 5), (4, 3), (2, 2)]
    # every parameter is used (nothing left for DDP's find_unused_parameters)
    sum(v.sum() for v in out.values()).backward()
    unused = [n for n, p in bb.named_parameters() if p.grad is None]
    assert not unused, unused


def test_build_fpt_backbone_wraps_the_named_backbone():
    cfg = _cfg("build_fpt_backbone", WRAPPED_BACKBONE="build_retinanet_resnet_fpn_backbone")
    bb = build_backbone(cfg)
    assert list(bb.output_shape()) == ["p3", "p4", "p5", "p6", "p7"] and len(bb.pyramid.levels) == 5
    with pytest.raises(ValueError, match="WRAPPED_BACKBONE"):
        build_backbone(_cfg("build_fpt_backbone", WRAPPED_BACKBONE="build_fpt_backbone"))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="not outputs of the wrapped FPN"):
        build_backbone(_cfg(IN_FEATURES=["p3", "p9"]))
    with pytest.raises(ValueError, match="top block"):
        build_backbone(_cfg(IN_FEATURES=["p5", "p6"]))
    with pytest.raises(ValueError, match="INPUT"):
        build_backbone(_cfg(INPUT="laterals"))
    with pytest.raises(ValueError, match="SELF.LEVELS"):
        build_backbone(_cfg(IN_FEATURES=["p3", "p4"], SELF__LEVELS=["p5"]))
    with pytest.raises(ValueError, match="GROUNDING.MODE"):
        build_backbone(_cfg(GROUNDING__MODE="cosine"))


def test_loads_a_detectron2_fpn_checkpoint():
    cfg = _cfg()
    fpn = torch.nn.Module()
    fpn.backbone = _fpn_twin(cfg, "build_resnet_fpn_backbone")
    model = torch.nn.Module()
    model.backbone = build_backbone(cfg)
    result = model.load_state_dict(fpn.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("backbone.pyramid.") for k in result.missing_keys)
    for k, v in fpn.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.fpn.state_dict()[k], v)
    # its own checkpoints round-trip unchanged
    again = torch.nn.Module()
    again.backbone = build_backbone(cfg)
    assert not again.load_state_dict(model.state_dict()).missing_keys


def test_gradients_reach_every_transformer_parameter():
    bb = build_backbone(_cfg(GROUNDING__MIXTURES=2)).train()
    for gt in bb.pyramid.gt.values():  # GT starts silent (gamma = beta = 0): open it for this check
        torch.nn.init.ones_(gt.out.norm.weight)
    out = bb(torch.randn(2, 3, 128, 128))  # p5 pooled to 2x2: a softmax over one key would have no gradient
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    dead = [n for n, p in bb.pyramid.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def _instances(h, w, n):
    inst = Instances((h, w))
    x0 = torch.tensor([4.0, 30.0, 10.0][:n])
    y0 = torch.tensor([6.0, 12.0, 40.0][:n])
    boxes = torch.stack([x0, y0, x0 + 25, y0 + 20], 1)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.arange(n) % 3
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i, b in enumerate(boxes.long()):
        masks[i, b[1]:b[3], b[0]:b[2]] = True
    inst.gt_masks = BitMasks(masks)
    return inst


@pytest.mark.parametrize("setting", ["lite", "paper"])
def test_one_mask_rcnn_training_step_on_odd_sizes(setting):
    cfg = _cfg(setting=setting)
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.ROI_HEADS.IN_FEATURES = "StandardROIHeads", ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = "FastRCNNConvFCHead", 2
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [{"image": torch.rand(3, 75, 101) * 255, "instances": _instances(75, 101, 3)},
             {"image": torch.rand(3, 61, 83) * 255, "instances": _instances(61, 83, 2)}]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    opt.zero_grad()
    total.backward()
    grads = [p.grad for p in model.backbone.pyramid.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    before = model.backbone.pyramid.fuse["p3"].conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.backbone.pyramid.fuse["p3"].conv.weight)
    model.eval()
    with torch.no_grad():
        preds = model([{"image": torch.rand(3, 75, 101) * 255}])
    assert preds[0]["instances"].image_size == (75, 101)
