"""Helpers for tiny training runs and synthetic batches (torch and detectron2 only, no pytest): the test-suite
uses them, and so can a method's own checks. The suite's pytest helpers are in tests/helpers.py."""
import json
import math
import os

import torch
from torchvision.ops import clip_boxes_to_image

__all__ = ["smoke_trainer", "smoke_train", "read_losses", "tiny_shapes_opts", "synthetic_batch", "train_step_losses"]


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


def train_step_losses(model, batch):
    """One training forward/backward of ``model`` on ``batch``; returns the loss dict as floats and checks
    every loss and every gradient is finite."""
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
    out = {k: float(v) for k, v in losses.items()}
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    assert not bad, f"non-finite losses: {bad}"
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    return out
