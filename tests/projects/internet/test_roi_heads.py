"""InterNetROIHeads inside detectron2's Mask R-CNN: training step, inference, checkpoint (needs detectron2)."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from d2_refine.engine.config import setup_cfg  # noqa: E402
from d2_refine.projects.internet.pooler import LevelAssignedROIPooler  # noqa: E402
from d2_refine.projects.internet.roi_heads import InterNetROIHeads  # noqa: E402
from helpers import ROOT, cpu_and_cuda  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")

SIZE = 128
BASE = os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes.yaml")


def _cfg(*opts):
    return setup_cfg(BASE, [
        "MODEL.ROI_HEADS.NAME", "InterNetROIHeads", "MODEL.DEVICE", "cpu",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.INTERNET.CRITIC_DIM", "64", "MODEL.INTERNET.OT.DIM", "16", *opts])


def _image(seed, boxes, classes):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((SIZE, SIZE))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    m = torch.zeros(len(classes), SIZE, SIZE, dtype=torch.bool)
    for i, b in enumerate(boxes.long()):
        m[i, b[1]:b[3], b[0]:b[2]] = True
    inst.gt_masks = BitMasks(m)
    return {"image": torch.rand(3, SIZE, SIZE, generator=g) * 255, "instances": inst, "height": SIZE,
            "width": SIZE}


def _batch():
    # small (P2) and large (P3, sqrt(wh) >= 79 px) objects of the same classes: both sets are non-empty
    return [_image(0, [[4, 4, 20, 18], [10, 20, 110, 120], [60, 60, 70, 72]], [1, 1, 3]),
            _image(1, [[30, 5, 120, 100], [80, 100, 96, 124]], [3, 3])]


def _train_step(model, batch, storage):
    model.train()
    losses = model(batch)
    sum(losses.values()).backward()
    storage.step()
    return losses


@pytest.mark.parametrize("loss", ["l2", "ot"])
def test_one_training_step(loss):
    torch.manual_seed(0)
    model = build_model(_cfg("MODEL.INTERNET.LOSS", loss, "MODEL.INTERNET.LOSS_WEIGHT", "1000.0"))
    heads = model.roi_heads
    assert isinstance(heads, InterNetROIHeads) and isinstance(heads.box_pooler, LevelAssignedROIPooler)
    with EventStorage(0) as storage:
        losses = _train_step(model, _batch(), storage)
        assert "loss_intertwiner" in losses
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["loss_intertwiner"].item() > 0
        # classes 1 and 3 have large (reliable) and small (less reliable) RoIs
        assert heads.class_buffer.filled()[1] and heads.class_buffer.filled()[3]
        assert not heads.class_buffer.filled()[[0, 2, 4, 5]].any()
        assert storage.history("internet/buffer_occupancy").latest() == 2
    for module in (heads.makeup, heads.critic) + ((heads.ot,) if loss == "ot" else ()):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert heads.critic.conv1.weight.grad.abs().sum() > 0
    if loss == "ot":
        assert heads.ot.generator.weight.grad.abs().sum() > 0


def test_loss_weight_zero_is_the_makeup_layer_alone():
    # the ablation config: InterNet (l2) with LOSS_WEIGHT 0 and nothing else changed
    l2, ablation = (setup_cfg(os.path.join(CONFIGS, f"internet_{name}_R_18_FPN_shapes.yaml"))
                    for name in ("l2", "makeup_only"))
    assert ablation.MODEL.INTERNET.LOSS_WEIGHT == 0.0 and l2.MODEL.INTERNET.LOSS_WEIGHT > 0
    ablation.defrost()
    ablation.MODEL.INTERNET.LOSS_WEIGHT, ablation.OUTPUT_DIR = l2.MODEL.INTERNET.LOSS_WEIGHT, l2.OUTPUT_DIR
    assert ablation.dump() == l2.dump()
    # trained with it, the buffer still fills but the critic gets no gradient; the make-up layer learns from the
    # detection losses alone
    torch.manual_seed(0)
    model = build_model(_cfg("MODEL.INTERNET.LOSS_WEIGHT", "0.0"))
    heads = model.roi_heads
    with EventStorage(0) as storage:
        losses = _train_step(model, _batch(), storage)
    assert losses["loss_intertwiner"].item() == 0.0 and heads.class_buffer.occupancy == 2
    assert all(p.grad is None or not p.grad.any() for p in heads.critic.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads.makeup.parameters())
    assert sum(p.grad.abs().sum() for p in heads.makeup.parameters()) > 0


def test_empty_and_missing_levels_are_finite():
    model = build_model(_cfg())
    # only small objects (no reliable set), then an image without annotations
    batch = [_image(0, [[4, 4, 20, 18]], [2]), _image(1, [], [])]
    with EventStorage(0) as storage:
        losses = _train_step(model, batch, storage)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_intertwiner"].item() == 0.0
    assert model.roi_heads.class_buffer.occupancy == 0


def test_inference_uses_makeup_and_returns_instances():
    model = build_model(_cfg()).eval()
    calls = []
    model.roi_heads.makeup.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model([{"image": torch.rand(3, SIZE, SIZE) * 255, "height": SIZE, "width": SIZE}])
    inst = out[0]["instances"]
    assert inst.has("pred_boxes") and inst.has("pred_masks") and len(calls) == 4  # p2..p5


def test_checkpoint_round_trip_keeps_buffer(tmp_path):
    model = build_model(_cfg("MODEL.INTERNET.BUFFER_SIZE", "3"))
    with EventStorage(0) as storage:
        _train_step(model, _batch(), storage)
    buf = model.roi_heads.class_buffer
    assert buf.occupancy == 2
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    fresh = build_model(_cfg("MODEL.INTERNET.BUFFER_SIZE", "3"))
    assert fresh.roi_heads.class_buffer.occupancy == 0
    DetectionCheckpointer(fresh).load(str(tmp_path / "model_final.pth"))
    for k, v in buf.state_dict().items():
        assert torch.equal(fresh.roi_heads.class_buffer.state_dict()[k], v), k


def test_upsampling_makeup_and_roi_size_assignment_train():
    model = build_model(_cfg("MODEL.INTERNET.MAKEUP.UPSAMPLE_FACTOR", "2", "MODEL.INTERNET.ASSIGNMENT", "roi_size",
                             "MODEL.INTERNET.LEVELS", "['p2', 'p3', 'p4', 'p5']", "MODEL.INTERNET.MAKEUP.MULTI",
                             "True", "MODEL.INTERNET.MAKEUP.NORM", "BN", "MODEL.INTERNET.CRITIC_NORM", "BN"))
    assert model.roi_heads.box_pooler.level_poolers[0].spatial_scale == 0.5
    with EventStorage(0) as storage:
        losses = _train_step(model, _batch(), storage)
    assert all(torch.isfinite(v) for v in losses.values())


def test_disabled_is_plain_heads_with_internet_levels():
    model = build_model(_cfg("MODEL.INTERNET.ENABLED", "False"))
    heads = model.roi_heads
    assert heads.makeup is None and heads.critic is None and heads.class_buffer is None
    with EventStorage(0) as storage:
        losses = _train_step(model, _batch(), storage)
    assert "loss_intertwiner" not in losses and all(torch.isfinite(v) for v in losses.values())


def test_level_pooler_pools_each_box_from_its_rounded_level():
    pooler = LevelAssignedROIPooler(2, (1 / 4, 1 / 8), 0, "ROIAlignV2", strides=[4, 8])
    x = [torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 16, 16)]
    boxes = Boxes(torch.tensor([[0.0, 0.0, 78.0, 78.0], [0.0, 0.0, 81.0, 81.0]]))  # 78 -> p2, 81 -> p3
    out = pooler(x, [boxes])
    assert out[0].abs().sum() == 0 and torch.allclose(out[1], torch.ones(1, 2, 2))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="LEVELS"):
        build_model(_cfg("MODEL.INTERNET.LEVELS", "['p7']"))
    with pytest.raises(ValueError, match="LOSS must be one of"):
        build_model(_cfg("MODEL.INTERNET.LOSS", "l3"))


CONFIGS = os.path.join(os.path.dirname(BASE), os.pardir, "InterNet")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_configs_load(name):
    cfg = setup_cfg(os.path.join(CONFIGS, name))
    assert cfg.MODEL.ROI_HEADS.NAME == "InterNetROIHeads" and cfg.MODEL.INTERNET.ENABLED
    assert cfg.MODEL.INTERNET.LOSS in ("l2", "ot")
    if "shapes" in name:
        assert cfg.DATASETS.TRAIN == ("shapes_train",) and cfg.MODEL.RESNETS.DEPTH == 18
    else:
        assert cfg.MODEL.RESNETS.DEPTH in (50, 101) and cfg.MODEL.WEIGHTS.endswith(f"R-{cfg.MODEL.RESNETS.DEPTH}.pkl")


def test_warmup_iters_fill_buffer_without_loss(monkeypatch):
    from detectron2.data import DatasetCatalog

    def no_dataset(name):
        raise AssertionError(f"building the model loaded the dataset {name}")

    monkeypatch.setattr(DatasetCatalog, "get", no_dataset)  # the warm-up needs no dataset size any more
    model = build_model(_cfg("MODEL.INTERNET.WARMUP_ITERS", "2"))
    assert model.roi_heads.warmup_iters == 2
    with EventStorage(0) as storage:
        got = [_train_step(model, _batch(), storage)["loss_intertwiner"].item() for _ in range(3)]
        assert model.roi_heads.class_buffer.occupancy == 2
    assert got[0] == 0.0 and got[1] == 0.0 and got[2] > 0


def test_warmup_fraction_is_a_one_line_error_naming_warmup_iters():
    with pytest.raises(ValueError, match="MODEL.INTERNET.WARMUP_FRACTION was renamed to MODEL.INTERNET.WARMUP_ITERS"):
        _cfg("MODEL.INTERNET.WARMUP_FRACTION", "0.4")
    with pytest.raises(ValueError, match="WARMUP_ITERS must be >= 0"):
        build_model(_cfg("MODEL.INTERNET.WARMUP_ITERS", "-1"))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("loss", ["l2", "ot"])
def test_training_step_on_a_device_matches_the_cpu(loss, device):
    """InterNet's ROI heads (make-up layer, critic, class buffer, the OT loss on POT's device backend) on ``device`` in
    float32 and with AMP against the CPU in float32, from the same weights and batch (on the CPU: AMP in float16, and
    losses that do not depend on the random numbers)."""
    from d2_refine.utils.testing import SAMPLE_ALL_OPTS, device_step_against_cpu

    torch.manual_seed(0)
    model = build_model(_cfg("MODEL.INTERNET.LOSS", loss, *SAMPLE_ALL_OPTS))
    device_step_against_cpu(model, _batch(), device)
