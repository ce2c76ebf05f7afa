"""FPT vs FPN backbone: inference latency, peak memory and parameters, on the same inputs in one run.

    python benchmarks/fpt.py                               # shapes size (192 px, R-18, C = 128) and 800x1333 (R-50)
    python benchmarks/fpt.py --sizes shapes --repeats 10
    python benchmarks/fpt.py --sizes coco --presets fpt_paper --device cuda --precision fp32 amp

Cases: for each size, the wrapped FPN backbone (baseline) and FPT around it (one per preset), batch 1, eval mode,
``torch.no_grad()``, the same random image (padded to a multiple of 32 like detectron2's ImageList: 800x1333 ->
800x1344). "shapes" builds the backbone of configs/FPT/mask_rcnn_fpt_*_R_18_shapes.yaml (R-18, FPN.OUT_CHANNELS
128); "coco" the one of configs/FPT/mask_rcnn_fpt_R_50_FPN_1x_coco.yaml (R-50, C = 256). Random weights (timing
does not depend on them).

Precision: ``fp32``, or ``amp`` (``torch.autocast``: float16 on CUDA, bfloat16 on CPU) for both FPN and FPT;
default both on CUDA, fp32 on CPU.
Time: ``torch.utils.benchmark.Timer`` (median over ``--repeats`` runs after one warm-up run; FPN and FPT runs
interleaved so that a change of machine load hits both).
Peak memory, the backbone forward only (parameters and the input excluded):
* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the forward.
* CPU: the forward runs once under ``torch.profiler.profile(profile_memory=True)``; every allocation/free of
  torch's CPU allocator is an event with a signed size, and the maximum of their running sum (time order) is the
  peak of the bytes torch held at once.
SDPA kernels: the attention kernels FPT's forward dispatched, counted by the profiler in one more forward
(``attention_math`` is SDPA's full-matrix fallback; ``flash_attention``, ``efficient_attention`` and
``cudnn_attention`` the fused ones).
Timings are never asserted anywhere.
"""
import argparse
import contextlib
import json
import os
import platform
import sys

import torch
import torch.utils.benchmark as benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "shapes": ("configs/FPT/mask_rcnn_fpt_lite_R_18_shapes.yaml", (192, 192)),
    "coco": ("configs/FPT/mask_rcnn_fpt_R_50_FPN_1x_coco.yaml", (800, 1333)),
}
MiB = 2.0 ** 20


def build_pair(config, preset, device):
    """(FPN backbone, FPT backbone) from ``config`` with configs/FPT/Base-FPT-<lite|paper|release>.yaml merged on top
    (``preset`` "fpt_lite" / "fpt_paper" / "fpt_release"); FPT's FPN = the baseline's."""
    from detectron2.modeling import build_backbone

    from d2_refine.engine import setup_cfg

    cfg = setup_cfg(os.path.join(ROOT, config), ["MODEL.DEVICE", device], freeze=False)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "FPT", f"Base-FPT-{preset.replace('fpt_', '')}.yaml"))
    torch.manual_seed(0)
    fpt = build_backbone(cfg).to(device).eval()
    return fpt.fpn, fpt


def padded_input(size, divisibility, device):
    h, w = (-(-s // divisibility) * divisibility for s in size)
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)


def precision_context(precision, device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def time_ms(models, x, repeats, precision="fp32"):
    """Median ms of each model; runs interleaved (base, ours, base, ...) so that load changes hit both alike."""
    timers = [benchmark.Timer(stmt="model(x)", globals={"model": m, "x": x}, num_threads=torch.get_num_threads())
              for m in models]
    runs = [[] for _ in models]
    with torch.no_grad(), precision_context(precision, x.device):
        for m in models:
            m(x)  # warm-up
        for _ in range(max(repeats, 1)):
            for t, r in zip(timers, runs):
                r.append(t.timeit(1).mean)
    return [sorted(r)[len(r) // 2] * 1e3 for r in runs]


def peak_mib(model, x, precision="fp32"):
    with torch.no_grad(), precision_context(precision, x.device):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model(x)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / MiB
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
        # raw allocator records (one per allocation / free, signed bytes), not the per-op aggregates
        records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
        running = peak = 0
        for e in records:
            running += e.nbytes()
            peak = max(peak, running)
        return peak / MiB


def sdpa_kernels(model, x, precision="fp32"):
    """{SDPA kernel op: calls} in one forward (the profiler's op names: ``_scaled_dot_product_attention_math`` is
    the full-matrix fallback; ``..._flash_attention[_for_cpu]``, ``..._efficient_attention`` and
    ``..._cudnn_attention`` the fused kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), precision_context(precision, x.device), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    counts = {}
    for e in prof.events():
        if e.name.startswith("aten::_scaled_dot_product_"):
            name = e.name[len("aten::_scaled_dot_product_"):]
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def format_kernels(kernels):
    return ", ".join(f"{k} {n}" for k, n in kernels.items()) or "none"


def nparams(module):
    return sum(p.numel() for p in module.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["shapes", "coco"], choices=sorted(SIZES))
    parser.add_argument("--presets", nargs="+", default=["fpt_lite", "fpt_paper"],
                        choices=["fpt_lite", "fpt_paper", "fpt_release"], help="configs/FPT/Base-FPT-*.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "amp"],
                        help="fp32 and/or amp (autocast: float16 on CUDA, bfloat16 on CPU); default: both on CUDA, "
                             "fp32 on CPU")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = parser.parse_args()
    precisions = args.precision or (["fp32", "amp"] if args.device.startswith("cuda") else ["fp32"])

    dev = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"# device: {args.device} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {sys.version.split()[0]}, batch 1, eval, no_grad")
    print("case | base ms | ours ms | ratio | base peak MiB | ours peak MiB | base params M | ours params M | "
          "FPT's SDPA kernels (calls)")
    rows = []
    for size in args.sizes:
        config, hw = SIZES[size]
        for precision in precisions:
            base_mem = None
            for preset in args.presets:
                fpn, fpt = build_pair(config, preset, args.device)
                x = padded_input(hw, fpn.size_divisibility, args.device)
                base_ms, ours_ms = time_ms([fpn, fpt], x, args.repeats, precision)
                if base_mem is None:
                    base_mem = float("nan") if args.no_memory else peak_mib(fpn, x, precision)
                ours_mem = float("nan") if args.no_memory else peak_mib(fpt, x, precision)
                kernels = sdpa_kernels(fpt, x, precision)
                case = f"{size} {tuple(x.shape[-2:])} {preset}" + ("" if precision == "fp32" else f" {precision}")
                print(f"{case} | {base_ms:.1f} | {ours_ms:.1f} | {ours_ms / base_ms:.2f}x | {base_mem:.0f} | "
                      f"{ours_mem:.0f} | {nparams(fpn) / 1e6:.2f} | {nparams(fpt) / 1e6:.2f} | "
                      f"{format_kernels(kernels)}", flush=True)
                rows.append(dict(case=case, size=size, input_hw=list(x.shape[-2:]), preset=preset,
                                 precision=precision, base_ms=base_ms, ours_ms=ours_ms, ratio=ours_ms / base_ms,
                                 base_peak_mib=base_mem, ours_peak_mib=ours_mem, base_params_m=nparams(fpn) / 1e6,
                                 ours_params_m=nparams(fpt) / 1e6, sdpa_kernels=kernels))
                del fpn, fpt
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=f"{args.device} ({dev})", torch=torch.__version__, repeats=args.repeats,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
