"""Benchmark of the op library (d2_refine.ops) against torchvision on the same inputs, in one run.

    python benchmarks/ops.py [--device cpu|cuda] [--no-reference] [--only prroi_pool|iou_guided_nms] [--json PATH]
                             [--min-run-time S] [--rounds N] [--tiny]

Rows: ``case | base ms | ours ms | ratio`` with ratio = ours / base (lower is better; < 1 means ours is faster).
- PrRoIPool forward+backward (w.r.t. the features; "+ box grad" also w.r.t. the boxes) vs
  ``torchvision.ops.roi_align`` (7x7, aligned, sampling_ratio 0 and 2) on 512 RoIs over a 256x200x304 map
  (stride 4 of an 800x1216 image), and vs the pure-PyTorch reference ``_prroi_pool_reference``.
- IoU-guided NMS vs ``torchvision.ops.batched_nms`` (the same number of boxes, classes, threshold 0.5).
Timings: medians of torch.utils.benchmark's blocked_autorange, base and ours measured alternately over 3 rounds
(so that both see the same load); run on a quiet machine (default threads). ``--tiny`` shrinks every case (a few
RoIs on a small map, a few hundred boxes) to check that the script runs; its timings mean nothing.
"""
import argparse
import json
import os
import statistics

import torch
import torch.utils.benchmark as benchmark
import torchvision
from torchvision.ops import batched_nms, roi_align

from d2_refine.ops import _prroi_pool_reference, has_ops, iou_guided_nms, prroi_pool

SETTINGS = dict(min_run_time=1.0, rounds=3, tiny=False)


def _time(fn, min_run_time=1.0):
    fn()  # warm-up
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def _compare(base, ours, min_run_time=None):
    """Median times (ms) of base and ours, measured alternately in SETTINGS["rounds"] rounds so that both see the
    same machine load."""
    if min_run_time is None:
        min_run_time = SETTINGS["min_run_time"]
    else:  # the reference rows: a fraction of the default time
        min_run_time = min(min_run_time, SETTINGS["min_run_time"])
    tb, to = [], []
    for _ in range(SETTINGS["rounds"]):
        tb.append(_time(base, min_run_time))
        to.append(_time(ours, min_run_time))
    return statistics.median(tb), statistics.median(to)


ROWS = []  # every printed row, for --json


def _row(case, base_ms, ours_ms):
    ROWS.append(dict(case=case, base_ms=base_ms, ours_ms=ours_ms, ratio=ours_ms / base_ms))
    print(f"{case} | {base_ms:.2f} | {ours_ms:.2f} | {ours_ms / base_ms:.2f}x", flush=True)


def _random_rois(num, image_hw, generator, device):
    h, w = image_hw
    size = torch.empty(num, 2).uniform_(16, 400, generator=generator)  # (w, h) in pixels
    x1 = torch.rand(num, generator=generator) * (w - size[:, 0])
    y1 = torch.rand(num, generator=generator) * (h - size[:, 1])
    boxes = torch.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1)
    return torch.cat([torch.zeros(num, 1), boxes], 1).to(device)


def bench_prroi_pool(device, with_reference):
    g = torch.Generator().manual_seed(0)
    num, channels, (h, w) = (16, 8, (50, 76)) if SETTINGS["tiny"] else (512, 256, (200, 304))
    features = torch.randn(1, channels, h, w, generator=g).to(device)
    rois = _random_rois(num, (4 * h, 4 * w), g, device)
    grad = torch.randn(num, channels, 7, 7, generator=g).to(device)
    scale = 0.25

    def run(pool, box_grad=False):
        def fn():
            x = features.detach().requires_grad_()
            r = rois.detach().requires_grad_(box_grad)
            out = pool(x, r)
            torch.autograd.backward(out, grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return fn

    ours = run(lambda x, r: prroi_pool(x, r, 7, scale, aligned=True))
    ours_box = run(lambda x, r: prroi_pool(x, r, 7, scale, aligned=True), box_grad=True)
    for ratio in (0, 2):
        base = run(lambda x, r: roi_align(x, r, 7, scale, sampling_ratio=ratio, aligned=True))
        _row(f"prroi_pool fwd+bwd vs roi_align(sampling_ratio={ratio}), {num} RoIs, {channels}x{h}x{w}",
             *_compare(base, ours))
        _row(f"prroi_pool fwd+bwd + box grad vs roi_align(sampling_ratio={ratio})", *_compare(base, ours_box))
    if with_reference:
        reference = run(lambda x, r: _prroi_pool_reference(x, r, 7, scale, aligned=True))
        _row("prroi_pool fwd+bwd vs _prroi_pool_reference", *_compare(reference, ours, min_run_time=0.1))
        reference_box = run(lambda x, r: _prroi_pool_reference(x, r, 7, scale, aligned=True), box_grad=True)
        _row("prroi_pool fwd+bwd + box grad vs _prroi_pool_reference + box grad",
             *_compare(reference_box, ours_box, min_run_time=0.1))


def _nms_inputs(num_boxes, num_classes, shared_boxes, generator, device):
    """num_boxes random boxes; shared_boxes: every box is a candidate of every class (IoU-Net's inference: one
    regressed box per proposal, a candidate per class), else each box has one random class."""
    xy = torch.rand(num_boxes, 2, generator=generator) * 1000
    wh = torch.empty(num_boxes, 2).uniform_(20, 300, generator=generator)
    boxes = torch.cat([xy, xy + wh], 1)
    if shared_boxes:
        boxes = boxes.repeat(num_classes, 1)
        idxs = torch.arange(num_classes).repeat_interleave(num_boxes)
    else:
        idxs = torch.randint(0, num_classes, (num_boxes,), generator=generator)
    n = boxes.size(0)
    scores = torch.empty(n).uniform_(0.05, 1.0, generator=generator)
    ious = torch.rand(n, generator=generator)
    return boxes.to(device), scores.to(device), ious.to(device), idxs.to(device)


def bench_nms(device):
    g = torch.Generator().manual_seed(0)
    cases = [
        ("1000 boxes x 80 classes (80,000 candidates)", 1000, 80, True),
        ("1000 boxes, 80 classes (random labels)", 1000, 80, False),
        ("5000 boxes, 1 class", 5000, 1, False),
        ("5000 boxes, 80 classes (random labels)", 5000, 80, False),
    ]
    for name, num_boxes, num_classes, shared in cases:
        if SETTINGS["tiny"]:
            num_boxes, num_classes = num_boxes // 50, min(num_classes, 4)
            name = f"{num_boxes} boxes, {num_classes} classes (--tiny)"
        boxes, scores, ious, idxs = _nms_inputs(num_boxes, num_classes, shared, g, device)

        def base():
            batched_nms(boxes, ious, idxs, 0.5)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def ours():
            iou_guided_nms(boxes, scores, ious, idxs, 0.5, "rank")
            if device.type == "cuda":
                torch.cuda.synchronize()

        _row(f"iou_guided_nms vs batched_nms, {name}", *_compare(base, ours))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow pure-PyTorch reference rows")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file (tools/plots.py)")
    parser.add_argument("--only", choices=("prroi_pool", "iou_guided_nms"), help="run the rows of one op only")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating base/ours rounds (medians)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the script runs (dry runs)")
    args = parser.parse_args()
    SETTINGS.update(min_run_time=args.min_run_time, rounds=args.rounds, tiny=args.tiny)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | torchvision {torchvision.__version__} | "
          f"compiled ops: {has_ops()}")
    print("case | base ms | ours ms | ratio (ours/base)")
    if args.only in (None, "prroi_pool"):
        bench_prroi_pool(device, with_reference=not args.no_reference)
    if args.only in (None, "iou_guided_nms"):
        bench_nms(device)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, torchvision=torchvision.__version__,
                           compiled_ops=has_ops(), settings=SETTINGS, rows=ROWS), f, indent=1)


if __name__ == "__main__":
    main()
