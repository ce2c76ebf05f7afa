"""IFR's test-time cost against Mask R-CNN, measured in the same run: whole-model inference, batch 1.

    python benchmarks/ifr_test_cost.py                       # CPU, 1 thread, shapes configs (R-18, 192 px)
    python benchmarks/ifr_test_cost.py --device cuda --json out.json
    python benchmarks/ifr_test_cost.py --profile             # also IFR's top ops (torch.profiler)
    python benchmarks/ifr_test_cost.py --weights W.pth --baseline-weights B.pth \
        --config configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes_pretrained.yaml \
        --baseline-config configs/Baselines/mask_rcnn_R_18_FPN_shapes_pretrained.yaml   # trained, on shapes_val

Models: configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml and configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml
(its test-time solve: Anderson, F_MAX_ITER_TEST evaluations), random weights. Both are built after the same seed:
the backbone, RPN and box head (created before the mask head) get identical weights, so both models see the same
detections, and the mask head runs on exactly ``--detections`` RoIs per image (TEST.DETECTIONS_PER_IMAGE, score
threshold 0; default 27, the trained IFR's mean on shapes_tune in docs/results/ifr_test_budget.json). IFR's solve
runs all its evaluations (its tolerance is set to 0, as a trained model's does at this budget: f_evals_mean = 8.0
in that record), so random weights cost what a checkpoint costs.
Time: median over ``--repeats`` images (random 192x192 images, the same for both), runs interleaved (Mask R-CNN,
IFR, ...) so that a change of load hits both. With ``--weights`` and ``--baseline-weights`` (trained checkpoints)
the models keep their configs' detection settings and run on the first ``--repeats`` images of ``--dataset``.
Rows: ``case | Mask R-CNN ms | IFR ms | ratio``. On one CPU thread IFR's block convolves on NNPACK at test time
(d2_refine/layers/nnpack_conv.py); on the CPU the run also times IFR with NNPACK switched off
(``torch.backends.nnpack.flags``: PyTorch's default oneDNN convs, as Mask R-CNN's head runs), the last two columns.
After the timing each model runs the last image once more under ``d2_refine.utils.host_sync.HostSyncCounter``: the
ops that make the host wait for the device (``.item()``, ``nonzero``, boolean indexing, ...), per model and op, with
NNPACK off (its tiled convolution, CPU only, reads one value per call: the count is the one a GPU would see).
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml"
IFR = "configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml"


def build(config, device, detections, opts=(), weights=None):
    """The model of ``config``: random weights (seed 0) and ``detections`` RoIs per image, or ``weights``."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_refine.engine import setup_cfg

    fixed = [] if weights else ["TEST.DETECTIONS_PER_IMAGE", str(detections),
                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = setup_cfg(os.path.join(ROOT, config),
                    ["MODEL.DEVICE", device, "MODEL.WEIGHTS", weights or "", *fixed, *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if weights:
        DetectionCheckpointer(model).load(weights)
    return model, cfg


def dataset_images(cfg, name, n):
    """The first ``n`` inputs of the registered dataset ``name`` as the test loader maps them (detectron2's
    DatasetMapper, the config's test-time resize), as d2_refine's timing pass and tools/ifr_test_budget.py read them."""
    import itertools

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer

    prepare_datasets(cfg)
    return list(itertools.islice(Trainer.build_test_loader(cfg, name), n))


def images(n, size, device):
    g = torch.Generator().manual_seed(0)
    return [[{"image": (torch.rand(3, size, size, generator=g) * 255).to(device), "height": size, "width": size}]
            for _ in range(n)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(models, inputs, device):
    """Median ms per image of each model, runs interleaved image by image."""
    runs = [[] for _ in models]
    with torch.no_grad():
        for m in models:  # warm-up
            m(inputs[0])
        for batch in inputs:
            for m, r in zip(models, runs):
                sync(device)
                t0 = time.perf_counter()
                m(batch)
                sync(device)
                r.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(r) for r in runs]


def host_syncs(model, batch):
    """{op: calls} of the ops that make the host wait for the device in one call of ``model`` (any device)."""
    from d2_refine.utils.host_sync import HostSyncCounter

    # NNPACK off: its tiled convolution (one CPU thread) reads one value per call, on the CPU only
    with torch.no_grad(), torch.backends.nnpack.flags(enabled=False), HostSyncCounter() as counter:
        model(batch)
    return dict(sorted(counter.counts.items()))


def _extra(base, ours):
    diff = {k: ours.get(k, 0) - base.get(k, 0) for k in sorted(set(base) | set(ours))}
    return ", ".join(f"{k} {v:+d}" for k, v in diff.items() if v) or "none"


class _NoNNPACK(torch.nn.Module):
    """``model`` with ``torch.backends.nnpack`` switched off during its calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        with torch.backends.nnpack.flags(enabled=False):
            return self.model(inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--detections", type=int, default=27, help="RoIs per image through the mask head")
    parser.add_argument("--repeats", type=int, default=30, help="timed images per model (median)")
    parser.add_argument("--profile", action="store_true", help="print IFR's top ops (torch.profiler, 5 images)")
    parser.add_argument("--config", default=IFR)
    parser.add_argument("--baseline-config", default=BASELINE)
    parser.add_argument("--weights", help="IFR checkpoint (with --baseline-weights: trained models, real images)")
    parser.add_argument("--baseline-weights", help="Mask R-CNN checkpoint")
    parser.add_argument("--dataset", default="shapes_val", help="images of the trained models' run")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if bool(args.weights) != bool(args.baseline_weights):
        parser.error("--weights and --baseline-weights go together")
    for path in (args.weights, args.baseline_weights):
        if path and not os.path.isfile(path):
            parser.error(f"no such checkpoint: {path}")
    torch.set_num_threads(args.threads)
    base, cfg = build(args.baseline_config, args.device, args.detections, weights=args.baseline_weights)
    # random weights: every solve runs all its evaluations, as a trained model's does at this budget
    ifr, _ = build(args.config, args.device, args.detections, [] if args.weights else ["MODEL.IFR.F_TOL", "0.0"],
                   weights=args.weights)
    trained = bool(args.weights)
    inputs = dataset_images(cfg, args.dataset, args.repeats) if trained else \
        images(args.repeats, args.size, args.device)
    with torch.no_grad():  # detections per image (the mask head's RoIs), over the first 10 images
        n_base = statistics.mean(len(base(x)[0]["instances"]) for x in inputs[:10])
        n_ifr = statistics.mean(len(ifr(x)[0]["instances"]) for x in inputs[:10])
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    what = (f"trained weights, the first {len(inputs)} images of {args.dataset}" if trained else
            f"random weights, {args.size}x{args.size} random images")
    print(f"# device: {dev}, torch {torch.__version__}, python {sys.version.split()[0]}, batch 1, {what}, "
          f"{n_base:.1f} / {n_ifr:.1f} detections per image (Mask R-CNN / IFR)")
    cpu = args.device == "cpu"
    base_ms, ifr_ms, *off = time_pair([base, ifr] + ([_NoNNPACK(ifr)] if cpu else []), inputs, args.device)
    off_ms = off[0] if off else None
    syncs = [host_syncs(m, inputs[-1]) for m in (base, ifr)]
    solver = ifr.roi_heads.mask_head.deq
    case = (f"trained, {args.dataset}" if trained else f"R-18 {args.size}px, {args.detections} RoIs") + \
        f", IFR {solver.f_solver_test} {solver.f_max_iter_test}"
    print("case | Mask R-CNN ms | IFR ms | ratio" + (" | IFR without NNPACK ms | ratio" if cpu else ""))
    print(f"{case} | {base_ms:.1f} | {ifr_ms:.1f} | {ifr_ms / base_ms:.2f}x"
          + (f" | {off_ms:.1f} | {off_ms / base_ms:.2f}x" if cpu else ""), flush=True)
    print(f"host synchronisations on one image (d2_refine.utils.host_sync, as dispatched from Python): Mask R-CNN "
          f"{sum(syncs[0].values())}, IFR {sum(syncs[1].values())} (IFR's extra: {_extra(syncs[0], syncs[1])})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in inputs[:5]:
                ifr(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.json:
        from d2_refine.benchmark.record import git_commit

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(command="python benchmarks/ifr_test_cost.py " + shlex.join(sys.argv[1:]), code=git_commit(),
                           device=dev, torch=torch.__version__, rows=[dict(
                case=case, base_ms=base_ms, ours_ms=ifr_ms, ratio=ifr_ms / base_ms, ours_ms_without_nnpack=off_ms,
                ratio_without_nnpack=off_ms / base_ms if off_ms else None,
                detections=None if trained else args.detections, detections_mean=[n_base, n_ifr],
                weights=[args.baseline_weights, args.weights] if trained else None,
                images=f"{args.dataset}[:{len(inputs)}]" if trained else f"random {args.size}px",
                size=args.size, solver=solver.f_solver_test, budget=solver.f_max_iter_test,
                host_syncs_per_image=[sum(c.values()) for c in syncs], host_syncs=syncs)]), f, indent=1)


if __name__ == "__main__":
    main()
