"""IFRMaskHead with detectron2: parameters, 0 RoIs, warm-up schedule, logging, one training step per variant."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from d2_refine.engine.config import setup_cfg  # noqa: E402
from d2_refine.projects.ifr import IFRMaskHead  # noqa: E402
from helpers import ROOT, cpu_and_cuda  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs", "IFR")


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_count():
    shape = ShapeSpec(channels=256, height=14, width=14)
    ifr = IFRMaskHead(shape, num_classes=80)
    ws = IFRMaskHead(shape, num_classes=80, mode="explicit", weight_norm=False)
    std = MaskRCNNConvUpsampleHead(shape, num_classes=80, conv_dims=[256] * 5)
    n_ifr, n_ws, n_std = _count(ifr), _count(ws), _count(std)
    print(f"\nmask head parameters: IFR {n_ifr:,}  weight sharing {n_ws:,}  standard 4-conv {n_std:,}  "
          f"IFR/standard {n_ifr / n_std:.1%}")
    assert (n_ifr, n_ws, n_std) == (1_464_656, 1_464_144, 2_643_280)


def _fg_instances(n, size=64, num_classes=3):
    inst = Instances((size, size))
    xy = torch.rand(n, 2) * (size / 2)
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + size / 3], dim=1))
    inst.gt_classes = torch.randint(num_classes, (n,))
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 10:40, 10:40] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def _small_head(**kw):
    return IFRMaskHead(ShapeSpec(channels=16, height=14, width=14), num_classes=3, num_groups=4, **kw)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_empty_rois(mode):
    head = _small_head(mode=mode).train()
    x = torch.zeros(0, 16, 14, 14)
    with EventStorage(0):
        loss = head(x, [_fg_instances(0)])["loss_mask"]
    assert loss.item() == 0.0
    loss.backward()
    head.eval()
    assert head.layers(x).shape == (0, 3, 28, 28)


def test_warmup_schedule_reads_event_storage():
    head = _small_head(pretrain_steps=10).train()
    x = torch.randn(4, 16, 14, 14)
    with EventStorage(9) as storage:
        assert not head.use_implicit()
        head(x, [_fg_instances(4)])["loss_mask"].backward()
        assert storage.history("ifr/implicit").latest() == 0.0
        assert "ifr/fwd_nstep" not in storage.histories()
    with EventStorage(10) as storage:  # e.g. after resuming at iteration 10
        assert head.use_implicit()
        head(x, [_fg_instances(4)])["loss_mask"].backward()
        h = storage.histories()
        assert h["ifr/implicit"].latest() == 1.0
        for key in ("ifr/fwd_nstep", "ifr/fwd_residual", "ifr/fwd_residual_rel", "ifr/fallbacks",
                    "ifr/bwd_nstep", "ifr/bwd_residual"):
            assert key in h, key
        assert 1 <= h["ifr/fwd_nstep"].latest() <= 15
    head.eval()
    assert head.use_implicit()
    assert not _small_head(mode="explicit").eval().use_implicit()


def test_training_output_is_one_f_call_of_the_fixed_point():
    head = _small_head().train()
    x = torch.randn(3, 16, 14, 14)
    with EventStorage(0):
        z_train = head.refine(x)
    head.eval()
    with torch.no_grad():
        z_star = head.refine(x)
        torch.testing.assert_close(z_train.detach(), head.block(z_star, x), atol=1e-5, rtol=1e-5)


def test_huge_inputs_give_finite_output():
    head = _small_head().eval()
    with torch.no_grad():
        out = head.layers(1e6 * torch.randn(5, 16, 14, 14))
    assert torch.isfinite(out).all()


def test_jacobian_loss_when_enabled():
    head = _small_head(jac_loss_weight=0.1).train()
    with EventStorage(0):
        losses = head(torch.randn(2, 16, 14, 14), [_fg_instances(2)])
    assert set(losses) == {"loss_mask", "loss_ifr_jac"} and losses["loss_ifr_jac"].item() > 0
    sum(losses.values()).backward()


def _batch(num_images=2, size=64, empty_second=True):
    batch = []
    for i in range(num_images):
        inst = Instances((size, size))
        n = 0 if (empty_second and i == 1) else 3
        xy = torch.rand(n, 2) * (size / 2)
        inst.gt_boxes = Boxes(torch.cat([xy, xy + size / 3], dim=1))
        inst.gt_classes = torch.randint(3, (n,))
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for j, b in enumerate(inst.gt_boxes.tensor.round().long()):
            masks[j, b[1]:b[3], b[0]:b[2]] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, size, size) * 255, "instances": inst, "height": size, "width": size})
    return batch


@pytest.mark.parametrize("config,start_iter", [
    ("ifr_mask_rcnn_R_18_FPN_shapes.yaml", 5000),   # implicit (after warm-up)
    ("ifr_mask_rcnn_R_18_FPN_shapes.yaml", 0),      # implicit model during warm-up (explicit unroll)
    ("ifr_ws_mask_rcnn_R_18_FPN_shapes.yaml", 0),   # weight sharing
    ("ifr_cascade_mask_rcnn_R_18_FPN_shapes.yaml", 5000),
])
def test_one_training_step(config, start_iter):
    torch.manual_seed(0)
    cfg = setup_cfg(os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
                                                    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                                                    "MODEL.IFR.F_MAX_ITER", "6", "MODEL.IFR.B_MAX_ITER", "6",
                                                    "MODEL.IFR.F_MAX_ITER_TEST", "6"])
    model = build_model(cfg).train()
    assert type(model.roi_heads.mask_head).__name__ == "IFRMaskHead"
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage(start_iter) as storage:
        losses = model(_batch())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
        grads = [p.grad for p in model.roi_heads.mask_head.block.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
        h = storage.histories()
        implicit = cfg.MODEL.IFR.MODE == "implicit" and start_iter >= cfg.MODEL.IFR.PRETRAIN_STEPS
        assert h["ifr/implicit"].latest() == float(implicit)
        assert ("ifr/bwd_nstep" in h) == implicit
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    inst = out[0]["instances"]
    assert inst.has("pred_masks") or len(inst) == 0


def test_evaluation_ends_with_the_solver_statistics(caplog):
    """inference_on_dataset on a few images: the implicit head's test-time solves are summarised in one log line
    when the evaluation ends (steps, residual, fallbacks), as training logs them to EventStorage."""
    import logging

    from detectron2.evaluation import DatasetEvaluators, inference_on_dataset

    torch.manual_seed(0)
    cfg = setup_cfg(os.path.join(CONFIGS, "ifr_mask_rcnn_R_18_FPN_shapes.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.IFR.F_MAX_ITER_TEST", "4", "MODEL.IFR.F_SOLVER_TEST", "anderson",
                     "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5"])
    model = build_model(cfg)
    images = [{"image": torch.randint(0, 255, (3, 96, 96)).float(), "height": 96, "width": 96} for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="d2_refine.projects.ifr.mask_head"):
        inference_on_dataset(model, [[im] for im in images], DatasetEvaluators([]))
    lines = [r.getMessage() for r in caplog.records if "test-time solves" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "3 solves of 15 RoIs" in lines[0] and "(anderson, at most 4)" in lines[0] and "fell back" in lines[0]
    assert model.training  # inference_context restored the mode, and the statistics were consumed
    assert model.roi_heads.mask_head.log_test_stats() is None


def test_sync_free_solve_adds_one_host_sync_per_image_and_equal_masks():
    """The test-time solve as it runs on a GPU (the stop rule on the device, ``DEQFixedPoint.sync_free``), forced on
    the CPU: the implicit head adds one host synchronisation per image (its statistics, read at once) to the model's
    own, where the per-evaluation stop test added one per evaluation, and the masks are the same."""
    from d2_refine.utils.host_sync import HostSyncCounter

    torch.manual_seed(0)
    cfg = setup_cfg(os.path.join(CONFIGS, "ifr_mask_rcnn_R_18_FPN_shapes.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                     "TEST.DETECTIONS_PER_IMAGE", "6"])
    model = build_model(cfg).eval()
    head = model.roi_heads.mask_head
    image = [{"image": torch.rand(3, 96, 96) * 255, "height": 96, "width": 96}]
    runs = {}
    for sync_free in (False, True):
        head.deq.sync_free = sync_free
        # NNPACK off: on one CPU thread its tiled convolution reads one value per call (its finiteness check), a
        # CPU-only path that would make the count depend on the number of evaluations run
        with torch.no_grad(), torch.backends.nnpack.flags(enabled=False), HostSyncCounter() as counter:
            out = model(image)[0]["instances"]
        runs[sync_free] = out, counter.total, head._test_stats[-1].nstep
    (out0, syncs0, nstep0), (out1, syncs1, nstep1) = runs[False], runs[True]
    assert len(out0) == 6 and nstep0 == nstep1 >= 2
    assert syncs0 - syncs1 == nstep0  # the per-evaluation tests are gone, the one read is left
    assert torch.equal(out1.pred_masks, out0.pred_masks) and torch.equal(out1.scores, out0.scores)
    with torch.no_grad(), HostSyncCounter() as counter:
        head(torch.zeros(0, 128, 14, 14), [out1[:0]])
    assert counter.total == 0  # no RoIs: no solve, nothing read


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("config", ["ifr_mask_rcnn_R_18_FPN_shapes.yaml", "ifr_ws_mask_rcnn_R_18_FPN_shapes.yaml"])
def test_training_step_on_a_device_matches_the_cpu(config, device):
    """The implicit model after its warm-up (Broyden forward, implicit backward through the hook) and the weight-
    sharing model, on ``device`` in float32 and with AMP against the CPU in float32, from the same weights and batch
    (on the CPU: AMP in float16, and losses that do not depend on the random numbers)."""
    from d2_refine.utils.testing import SAMPLE_ALL_OPTS, device_step_against_cpu

    torch.manual_seed(0)
    cfg = setup_cfg(os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
                                                    *SAMPLE_ALL_OPTS])
    device_step_against_cpu(build_model(cfg), _batch(), device, start_iter=5000)
