"""Inference latency of IoU-Net's stages vs the Faster R-CNN baseline, same inputs, same run.

Two models:

1. R-50-FPN at 800x1333, batch 1, untrained weights with pinned box counts: 1000 fixed random proposals
   (the RPN still runs), a box predictor
   whose class scores are fixed so that every proposal is a candidate for exactly ``--cands-per-box`` classes,
   and at least 100 boxes after NMS going through refinement. The baseline is Faster R-CNN
   (StandardROIHeads, ROIAlignV2) sharing the backbone/RPN/box-head weights.
2. The trained shapes model (``--shapes-weights``, e.g. /tmp/iounet/model_final.pth) on shapes_val images;
   its baseline is the same model with every IoU-Net stage off (detectron2's inference; PrRoIPool box head).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/iounet_latency.py [--shapes-weights PATH] [--device cuda]

Prints a device/torch header, then ``case | base ms | ours ms | ratio`` rows (ours / base): wall-clock medians of
torch.utils.benchmark.Timer, which synchronises the device around each timed block, the baseline and the variants
in one process on the same inputs. ``--profile`` adds one profiled call (torch.profiler) of the full IoU-Net variant
and of its baseline: the ops with the most self time (device time on CUDA, CPU time on the CPU), the kernel time
(each kernel once), and the host synchronisations per image (the profiler's cudaStreamSynchronize & co. on CUDA; the
ops that would wait for a device, counted on any device), written into the JSON, so that a ratio can be explained
where it was measured.
"""
import argparse
import copy
import json
import os
import platform
import sys

import torch
from torch.utils import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CONFIG = "configs/IoUNet/iounet_R_18_FPN_shapes.yaml"  # the --shapes-config default


def _cfg(config, opts):
    from d2_refine.engine import setup_cfg

    return setup_cfg(os.path.join(ROOT, config), opts, freeze=False)


def _set_stages(model, iou_nms, refine, score_times_iou, force_steps=False):
    m = copy.deepcopy(model)
    h = m.roi_heads
    h.nms, h.refine, h.score_times_iou = "iou_guided" if iou_nms else "plain", refine, score_times_iou
    if force_steps:  # no early stop: every refined box takes all T steps (worst case)
        h.refine_kwargs = dict(h.refine_kwargs, early_stop=-1.0, degrade_tol=-float("inf"))
    return m.eval()


def _time(fn, min_run_time):
    fn()  # warm-up
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _base_time(first, last):
    """The baseline is timed before and after the variants and the faster of the two is kept: on a GPU the first
    model timed in a process can run slow (clocks, allocator, library autotuning), which would flatter every ratio
    (on an H200 a first-timed Faster R-CNN measured 24.5 ms, and 16.6 ms the same detector with IoU-Net's
    PrRoIPool box head and its stages off, timed after it)."""
    print(f"# baseline ms: {first:.2f} first, {last:.2f} last; the faster one is the base")
    return min(first, last)


def _run(model, inputs):
    with torch.no_grad():
        return [model([x]) for x in inputs]


#: host-side CUDA runtime calls that wait for the device (not cudaDeviceSynchronize: the model never calls it, and the
#: profiled block has two of its own, torch.cuda.synchronize below and the profiler's on exit)
_SYNC_KEYS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
#: copies (cudaMemcpyAsync: a copy to the host is followed by a cudaStreamSynchronize; so is one to the device from
#: pageable memory, e.g. torch.tensor(..., device="cuda"): both are counted under cudaStreamSynchronize above)
_COPY_KEYS = ("cudaMemcpyAsync",)


def profile_call(fn, device: str, top: int = 25, warmup: bool = True, images: int = 1) -> dict:
    """One profiled call of ``fn`` (after a warm-up call unless ``warmup=False``) on ``images`` images: the ``top``
    ops by self time on the device (on CUDA: the device time of the kernels each op launched) or on the CPU, the
    totals, and the host synchronisations, counted twice: by their CUDA runtime calls in the profile (CUDA only)
    and by the ops that would wait for a device as dispatched from Python (:class:`HostSyncCounter`, any device).

    The device total sums the kernel rows only: key_averages() also has a row per launching op that holds the same
    kernel time, and summing both rows counts every kernel twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from d2_refine.utils.host_sync import HostSyncCounter

    cuda = device.startswith("cuda")
    if warmup:
        fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    with HostSyncCounter() as counter:
        fn()
    events = prof.key_averages()
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted((e for e in ops if getattr(e, key) > 0), key=lambda e: -getattr(e, key))[:top]
    syncs = {e.key: e.count for e in ops if e.key in _SYNC_KEYS}
    return dict(
        sort_by=key,
        images=images,
        total_self_cpu_ms=sum(e.self_cpu_time_total for e in ops) / 1e3,
        total_self_device_ms=sum(e.self_device_time_total for e in kernels) / 1e3 if cuda else None,
        host_syncs=syncs,
        host_syncs_per_image=sum(syncs.values()) / images if cuda else None,
        copies={e.key: e.count for e in ops if e.key in _COPY_KEYS},
        dispatch_syncs_per_image=counter.total / images,
        dispatch_syncs=counter.counts,
        ops=[dict(name=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                  self_device_ms=(e.self_device_time_total / 1e3) if cuda else None) for e in rows],
    )


def profile_pair(profiles: dict, case: str, base_name: str, base, full, inputs, device: str) -> None:
    """Profile one call of the baseline and of the full IoU-Net on ``inputs`` into ``profiles`` (keys
    ``"<case>: <base_name>"`` and ``"<case>: full IoU-Net"``); both models were just timed, so no warm-up call."""
    n = len(inputs)
    profiles[f"{case}: {base_name}"] = profile_call(lambda: _run(base, inputs), device, warmup=False, images=n)
    profiles[f"{case}: full IoU-Net"] = profile_call(lambda: _run(full, inputs), device, warmup=False, images=n)


def print_profile(title: str, prof: dict, top: int = 12) -> None:
    print(f"# profile: {title} (sorted by {prof['sort_by']}; self CPU {prof['total_self_cpu_ms']:.1f} ms"
          + (f", self device {prof['total_self_device_ms']:.1f} ms (kernels)" if prof["total_self_device_ms"]
             is not None else "")
          + (f"; host syncs per image {prof['host_syncs_per_image']:.1f} (profiler: {prof['host_syncs']})"
             if prof["host_syncs_per_image"] is not None else "")
          + f"; ops waiting for a device per image {prof['dispatch_syncs_per_image']:.1f})")
    print("op | calls | self CPU ms | self device ms")
    for o in prof["ops"][:top]:
        dev = "-" if o["self_device_ms"] is None else f"{o['self_device_ms']:.2f}"
        print(f"{o['name'][:70]} | {o['calls']} | {o['self_cpu_ms']:.2f} | {dev}")


class _PinnedProposals(torch.nn.Module):
    """Runs the RPN (its cost counts) and then replaces its proposals by fixed random boxes, so that the box
    counts downstream do not depend on the untrained weights."""

    def __init__(self, rpn, num=1000, seed=0):
        super().__init__()
        self.rpn, self.num, self.seed = rpn, num, seed

    def forward(self, images, features, gt_instances=None):
        from detectron2.structures import Boxes, Instances

        proposals, losses = self.rpn(images, features, gt_instances)
        g = torch.Generator().manual_seed(self.seed)
        pinned = []
        for p, (h, w) in zip(proposals, images.image_sizes):
            size = 24 + torch.rand(self.num, 2, generator=g) * 300
            xy = torch.rand(self.num, 2, generator=g) * torch.tensor([w, h]) - size / 2
            b = torch.cat([xy, xy + size], 1)
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            q = Instances((h, w))
            q.proposal_boxes = Boxes(b.to(p.proposal_boxes.device))
            q.objectness_logits = torch.zeros(self.num, device=p.proposal_boxes.device)
            pinned.append(q)
        proposals = pinned
        return proposals, losses


def r50_case(device, min_run_time, cands_per_box, profiles=None):
    from detectron2.modeling import build_model

    opts = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.RPN.POST_NMS_TOPK_TEST", 1000,
            "MODEL.RPN.PRE_NMS_TOPK_TEST", 1000, "MODEL.ROI_HEADS.NUM_CLASSES", 80]
    torch.manual_seed(0)
    ours = build_model(_cfg("configs/IoUNet/iounet_R_50_FPN_1x_coco.yaml", opts)).eval()
    base_cfg = _cfg("configs/IoUNet/iounet_R_50_FPN_1x_coco.yaml",
                    opts + ["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
                            "ROIAlignV2"])
    base = build_model(base_cfg).eval()
    base.load_state_dict(ours.state_dict(), strict=False)
    for m in (ours, base):
        m.proposal_generator = _PinnedProposals(m.proposal_generator)
    # pinned scores: zero weights, a bias giving cands_per_box classes p >= 0.05 for every proposal
    for m in (ours, base):
        cls = m.roi_heads.box_predictor.cls_score
        with torch.no_grad():
            cls.weight.zero_()
            cls.bias.fill_(-4.0)
            cls.bias[:cands_per_box] = 0.0
            cls.bias[-1] = 0.5  # background
            reg = m.roi_heads.box_predictor.bbox_pred  # zero deltas: boxes = the pinned proposals
            reg.weight.zero_()
            reg.bias.zero_()
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 800, 1333, generator=g) * 255).to(device)
    inputs = [{"image": img, "height": 800, "width": 1333}]
    p = torch.softmax(ours.roi_heads.box_predictor.cls_score.bias, 0)
    print(f"# R-50-FPN 800x1333: 1000 proposals, class scores {p[0].item():.3f} x {cands_per_box} classes"
          f" (background {p[-1].item():.3f}) -> {1000 * cands_per_box} candidates before NMS")
    variants = {
        "+ IoU-NMS": _set_stages(ours, True, False, False),
        "+ IoU-NMS + refine (full IoU-Net)": _set_stages(ours, True, True, True),
        "+ IoU-NMS + refine, all 5 steps": _set_stages(ours, True, True, True, force_steps=True),
        "IoU-Net stages off (PrRoIPool box head)": _set_stages(ours, False, False, False),
    }
    t_first = _time(lambda: _run(base, inputs), min_run_time)
    timed = []
    for name, m in variants.items():
        m.roi_heads.reset_refine_stats()
        out = _run(m, inputs)[0][0]["instances"]
        st = m.roi_heads.refine_stats()
        t = _time(lambda: _run(m, inputs), min_run_time)
        timed.append((f"R50-FPN 800x1333 {name} [{len(out)} dets, {st['boxes']} refined, "
                      f"{st['mean_steps']:.1f} steps]", t))
    t_base = _base_time(t_first, _time(lambda: _run(base, inputs), min_run_time))
    rows = [(name, t_base, t) for name, t in timed]
    if profiles is not None:
        profile_pair(profiles, "R50-FPN 800x1333", "Faster R-CNN", base,
                     variants["+ IoU-NMS + refine (full IoU-Net)"], inputs, device)
    return rows


def shapes_case(device, min_run_time, weights, num_images, opts=(), profiles=None, config=SHAPES_CONFIG):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model

    from d2_refine.data import prepare_datasets

    cfg = _cfg(config, ["MODEL.DEVICE", device] + list(opts))
    prepare_datasets(cfg)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num_images]
    inputs = []
    for d in dicts:
        im = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        inputs.append({"image": torch.as_tensor(im.transpose(2, 0, 1).copy()).float().to(device),
                       "height": d["height"], "width": d["width"]})
    base = _set_stages(model, False, False, False)
    t_first = _time(lambda: _run(base, inputs), min_run_time) / len(inputs)
    timed = []
    variants = {"+ IoU-NMS": _set_stages(model, True, False, False),
                "+ IoU-NMS + refine (full IoU-Net)": _set_stages(model, True, True, True)}
    for name, m in variants.items():
        m.roi_heads.reset_refine_stats()
        _run(m, inputs)
        st = m.roi_heads.refine_stats()
        t = _time(lambda: _run(m, inputs), min_run_time) / len(inputs)
        timed.append((f"shapes trained, {len(inputs)} imgs {name} [{st['boxes'] / len(inputs):.0f} refined/img, "
                      f"{st['mean_steps']:.1f} steps]", t))
    t_base = _base_time(t_first, _time(lambda: _run(base, inputs), min_run_time) / len(inputs))
    rows = [(name, t_base, t) for name, t in timed]
    if profiles is not None:  # one image: the profiler's own cost is high on the CPU
        profile_pair(profiles, "shapes trained, 1 img", "stages off", base,
                     variants["+ IoU-NMS + refine (full IoU-Net)"], inputs[:1], device)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--min-run-time", type=float, default=5.0, help="seconds of timing per variant")
    ap.add_argument("--cands-per-box", type=int, default=2)
    ap.add_argument("--shapes-weights", default="/tmp/iounet/model_final.pth")
    ap.add_argument("--shapes-images", type=int, default=20)
    ap.add_argument("--shapes-config", default=SHAPES_CONFIG,
                    help="the config the shapes weights were trained with (*_pretrained.yaml: from the trunk)")
    ap.add_argument("--skip-r50", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call of the full IoU-Net and of its baseline (top ops, host syncs)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                    help="KEY VALUE config overrides of the shapes model (e.g. DATASETS.SHAPES.ROOT DIR); last")
    args = ap.parse_args()

    import d2_refine  # noqa: F401  (registers IoUNetROIHeads, shapes)
    from d2_refine.ops import has_ops

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# device: {args.device} ({dev}), threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"compiled d2_refine ops: {has_ops()}, python {sys.version.split()[0]}")
    profiles = {} if args.profile else None
    rows = [] if args.skip_r50 else r50_case(args.device, args.min_run_time, args.cands_per_box, profiles)
    if args.shapes_weights and os.path.exists(args.shapes_weights):
        rows += shapes_case(args.device, args.min_run_time, args.shapes_weights, args.shapes_images, args.opts,
                            profiles, config=args.shapes_config)
    else:
        print(f"# no trained shapes weights at {args.shapes_weights!r}: shapes case skipped")
    if not rows:
        ap.error("nothing to time: --skip-r50 drops the R-50 case and there are no --shapes-weights")
    print("case | base ms | ours ms | ratio")
    for name, b, o in rows:
        print(f"{name} | {b:.1f} | {o:.1f} | {o / b:.2f}x")
    for title, prof in (profiles or {}).items():
        print_profile(title, prof)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=f"{args.device} ({dev})", torch=torch.__version__, compiled_ops=has_ops(),
                           min_run_time=args.min_run_time,
                           rows=[dict(case=n, base_ms=b, ours_ms=o, ratio=o / b) for n, b, o in rows],
                           profiles=profiles), f, indent=1)


if __name__ == "__main__":
    main()
