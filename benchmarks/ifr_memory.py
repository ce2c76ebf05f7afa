"""IFR mask head: training peak memory and time per iteration vs solver depth, implicit vs explicit.

    python benchmarks/ifr_memory.py                     # CPU: N = 8 RoIs; CUDA: N = 256 (256 RoIs of 256 x 14 x 14)
    python benchmarks/ifr_memory.py --num-rois 64 --device cpu
    python benchmarks/ifr_memory.py --json output/benchmarks/ifr_memory.json   # + the rows as JSON (tools/plots.py)

One training iteration = refinement (explicit K-unroll with autograd, or the implicit solve + one f call with
the adjoint hook) -> ConvTranspose 2x2 -> ReLU -> 1x1 predictor -> loss -> backward, on synthetic RoI features
x (N, 256, 14, 14) and IFR's refinement block (weight norm for the implicit model, none for the explicit one).
The implicit solvers run all T iterations (eps = 0) in both directions, the adjoint with the forward's
method, so that depth is what varies.

Memory, measured on the same inputs for every case:
* CUDA: ``torch.cuda.max_memory_allocated`` during the iteration minus the memory allocated before it.
* CPU: there is no allocator peak counter on CPU, so the iteration runs under
  ``torch.profiler.profile(profile_memory=True)``; every CPU allocation and free of torch's allocator is an
  event with a signed size; their running sum in time order is the bytes allocated by torch at each moment and
  its maximum is the peak (inputs and parameters allocated before the iteration are excluded).
* "saved" = bytes of the tensors autograd keeps for backward (``saved_tensors_hooks``), exact on any device.
Time: ``torch.utils.benchmark.Timer`` (median of a few runs), without the profiler. Baseline for the time
ratio: the explicit (weight-sharing) head at the paper's K = 4. Timings are never asserted anywhere.
"""
import argparse
import json
import os
import platform

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from d2_refine.layers.deq import DEQFixedPoint, cached_parametrizations
from d2_refine.projects.ifr.block import IFRBlock, explicit_unroll

MiB = 2.0 ** 20


class Head(nn.Module):
    def __init__(self, channels, mode, depth, solver):
        super().__init__()
        self.mode, self.depth = mode, depth
        self.block = IFRBlock(channels, 4, weight_norm=(mode == "implicit"))
        # the adjoint is solved by the same method as the forward pass (Broyden's workspace grows with T)
        self.deq = DEQFixedPoint(f_solver=solver or "broyden", b_solver=solver or "broyden", f_max_iter=depth,
                                 b_max_iter=depth, f_tol=0.0, b_tol=0.0)
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.predictor = nn.Conv2d(channels, 80, 1)

    def forward(self, x):
        with cached_parametrizations(self.block):
            if self.mode == "explicit":
                z = explicit_unroll(self.block, x, self.depth)
            else:
                z = self.deq(lambda z: self.block(z, x), torch.zeros_like(x))
        return self.predictor(torch.relu(self.deconv(z)))


def train_step(head, x, target):
    head.zero_grad(set_to_none=True)
    logits = head(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss.backward()


def peak_memory(head, x, target, device):
    if device.type == "cuda":
        train_step(head, x, target)  # warm-up: gradients allocated, lazy inits done
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(head, x, target)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MiB
    head.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(head, x, target)
    # raw allocator records (one per allocation / free, signed bytes), not the per-op aggregates
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in records:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / MiB


def saved_memory(head, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head(x)
    return total[0] / MiB


def time_ms(head, x, target, repeats):
    t = benchmark.Timer(stmt="train_step(head, x, target)", globals=dict(train_step=train_step, head=head, x=x,
                                                                          target=target))
    return t.timeit(repeats).median * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-rois", type=int, default=None, help="N (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--explicit-depths", default="1,2,4,8,16")
    p.add_argument("--implicit-depths", default="5,10,15,30")
    p.add_argument("--solvers", default="fixed_point,anderson,broyden")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations per case (default 3 CUDA, 1 CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the settings and rows to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    n = args.num_rois or (256 if device.type == "cuda" else 8)
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    x = torch.randn(n, args.channels, 14, 14, device=device)
    target = (torch.rand(n, 80, 28, 28, device=device) > 0.5).float()
    d = args.channels * 14 * 14
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__} | device {device} ({device_name}) | "
          f"threads {torch.get_num_threads()} | N {n} RoIs x D {d} | one N x D fp32 tensor = {n * d * 4 / MiB:.1f} MiB")
    print("# memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                          "peak of torch CPU allocations (profiler memory events)") + ", minus before the step")
    cases = [("explicit", None, k) for k in map(int, args.explicit_depths.split(","))]
    for s in args.solvers.split(","):
        cases += [("implicit", s, t) for t in map(int, args.implicit_depths.split(","))]
    torch.manual_seed(0)
    base_head = Head(args.channels, "explicit", 4, None).to(device)
    base_ms = time_ms(base_head, x, target, repeats)
    print("case | base ms | ours ms | ratio | peak MiB | saved MiB | peak / peak at smallest depth")
    first_peak, rows = {}, []
    for mode, solver, depth in cases:
        torch.manual_seed(0)
        head = Head(args.channels, mode, depth, solver).to(device)
        peak = peak_memory(head, x, target, device)
        saved = saved_memory(head, x)
        ms = time_ms(head, x, target, repeats)
        key = (mode, solver)
        first_peak.setdefault(key, peak)
        name = f"explicit K={depth}" if mode == "explicit" else f"implicit {solver} T={depth}"
        print(f"{name} | {base_ms:.0f} | {ms:.0f} | {ms / base_ms:.2f}x | {peak:.1f} | {saved:.1f} | "
              f"{peak / first_peak[key]:.2f}", flush=True)
        rows.append(dict(case=name, mode=mode, solver=solver, depth=depth, base_ms=base_ms, ms=ms,
                         ratio=ms / base_ms, peak_mib=peak, saved_mib=saved, peak_rel=peak / first_peak[key]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=f"{device} ({device_name})",
                           threads=torch.get_num_threads(), num_rois=n, channels=args.channels, d=d,
                           memory="cuda max_memory_allocated" if device.type == "cuda" else "cpu profiler",
                           rows=rows), f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
