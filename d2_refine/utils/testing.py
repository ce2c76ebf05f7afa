"""Helpers for tiny training runs and synthetic batches (torch and detectron2 only, no pytest): the test-suite
uses them, and so can a method's own checks. The suite's pytest helpers are in tests/helpers.py."""
import contextlib
import json
import math
import os

import torch
from torchvision.ops import clip_boxes_to_image

__all__ = ["smoke_trainer", "smoke_train", "read_losses", "tiny_shapes_opts", "synthetic_batch", "train_step_losses",
           "device_step_against_cpu", "no_tf32", "SAMPLE_ALL_OPTS"]


def cpu_and_cuda():
    """Kept for test files that import it from here; tests import it from tests/helpers.py (``from helpers import
    cpu_and_cuda``). pytest is imported when called, so that the package never needs it."""
    import pytest

    return ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="CUDA is not available")))


def tiny_shapes_opts(output_dir, image_size=128, num_train=8, num_val=4, iters=3):
    """KEY VALUE options that shrink any shapes config to a few iterations on a few tiny images."""
    return [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.SHAPES.ROOT", os.path.join(str(output_dir), "shapes"),
        "DATASETS.SHAPES.NUM_TRAIN", str(num_train), "DATASETS.SHAPES.NUM_VAL", str(num_val),
        "DATASETS.SHAPES.IMAGE_SIZE", str(image_size),
        "INPUT.MIN_SIZE_TRAIN", f"({image_size},)", "INPUT.MAX_SIZE_TRAIN", str(image_size),
        "INPUT.MIN_SIZE_TEST", str(image_size), "INPUT.MAX_SIZE_TEST", str(image_size),
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.BASE_LR", "0.002",  # a few full-size steps from scratch can blow the boxes up to inf
        "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100000",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
        # an untrained model scores below the usual 0.05: keep its detections so AP is finite
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    ]


def smoke_trainer(config_file, output_dir, opts=(), resume=False):
    """d2_refine's Trainer for ``config_file`` on a tiny shapes set (:func:`tiny_shapes_opts` + ``opts``), seeded
    as train_net.py's default_setup does (SEED + rank) and loaded with ``resume_or_load(resume)``; not trained."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer, setup_cfg

    cfg = setup_cfg(config_file, tiny_shapes_opts(output_dir) + list(opts))
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    prepare_datasets(cfg)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


def smoke_train(config_file, output_dir, opts=()):
    """Train ``config_file`` for a few iterations on a tiny shapes set with d2_refine's Trainer, then run its
    COCOEvaluator; returns the evaluation results ({"bbox": {...}, "segm": {...}}). Losses: :func:`read_losses`."""
    trainer = smoke_trainer(config_file, output_dir, opts)
    trainer.train()  # detectron2's EvalHook evaluates after the last iteration
    return trainer._last_eval_results


def read_losses(output_dir, key="total_loss"):
    """Values of ``key`` logged to ``output_dir/metrics.json`` by a training run, in order."""
    values = []
    with open(os.path.join(str(output_dir), "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                values.append(rec[key])
    return values


def synthetic_batch(image_size=128, boxes_per_image=((3, 0), (0, 0)), with_masks=True, num_classes=6):
    """Training inputs for a detectron2 model: one dict per image with ``boxes_per_image[i] = (n_boxes, seed)``
    ground-truth objects (0 gives an image without annotations)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    batch = []
    for n, seed in boxes_per_image:
        g = torch.Generator().manual_seed(seed)
        inst = Instances((image_size, image_size))
        xy = torch.rand(n, 2, generator=g) * image_size * 0.6
        wh = 8 + torch.rand(n, 2, generator=g) * image_size * 0.35
        boxes = clip_boxes_to_image(torch.cat([xy, xy + wh], 1), (image_size, image_size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        if with_masks:
            m = torch.zeros(n, image_size, image_size, dtype=torch.bool)
            for k, b in enumerate(boxes.long()):
                m[k, b[1]:b[3], b[0]:b[2]] = True
            inst.gt_masks = BitMasks(m)
        image = torch.rand(3, image_size, image_size, generator=g) * 255
        batch.append({"image": image, "instances": inst, "height": image_size, "width": image_size})
    return batch


def train_step_losses(model, batch, amp=False, start_iter=0):
    """One training forward/backward of ``model`` on ``batch`` (at ``EventStorage`` iteration ``start_iter``; with
    ``amp``, the forward under float16 autocast, as detectron2's AMPTrainer runs it); returns the loss dict as floats
    and checks every loss and every gradient is finite."""
    from detectron2.utils.events import EventStorage

    model.train()
    device = next(model.parameters()).device.type
    with EventStorage(start_iter):
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            losses = model(batch)
        total = sum(losses.values())
        total.backward()
    out = {k: float(v.detach()) for k, v in losses.items()}
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    assert not bad, f"non-finite losses: {bad}"
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    return out


@contextlib.contextmanager
def no_tf32():
    """float32 on CUDA as on the CPU inside it: cuDNN's convolutions (and cuBLAS's matmuls) without TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


#: config options under which R-CNN training samples every anchor and every proposal (positive fraction 1, batches
#: larger than any image's count), so that its losses do not depend on random numbers; 100 proposals per image keep
#: the step small
SAMPLE_ALL_OPTS = ["MODEL.RPN.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.RPN.POSITIVE_FRACTION", "1.0",
                   "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
                   "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100"]


def device_step_against_cpu(model, batch, device, start_iter=0, amp_rtol=2e-2):
    """One training step of copies of ``model`` on ``device``, in float32 and with AMP, against one on the CPU in
    float32 (TF32 off): the same losses (relative 5e-3 in float32, ``amp_rtol`` with AMP), and on the device a finite
    gradient for every trainable parameter (DDP without find_unused_parameters needs each one at every step).
    ``model`` itself is left as it is."""
    import copy

    torch.manual_seed(1)
    ref = train_step_losses(copy.deepcopy(model).cpu(), batch, start_iter=start_iter)
    for amp in (False, True):
        # a device draws other random numbers than the CPU: each step gets other ones here, so that a loss which
        # depends on them (sampled RoIs or anchors: sample them all, see SAMPLE_ALL_OPTS) fails on the CPU too
        torch.manual_seed(2 + amp)
        m = copy.deepcopy(model).to(device)
        with no_tf32():
            losses = train_step_losses(m, batch, amp=amp, start_iter=start_iter)
        missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{device}, amp={amp}: no gradient for {missing}"
        assert set(losses) == set(ref), (sorted(losses), sorted(ref))
        rtol = amp_rtol if amp else 5e-3  # float32: another summation order can move a proposal at the top-k edge
        far = {k: (losses[k], ref[k]) for k in ref if abs(losses[k] - ref[k]) > rtol * abs(ref[k]) + 1e-4}
        assert not far, f"{device}, amp={amp}: losses ({device}, cpu) apart: {far}"
