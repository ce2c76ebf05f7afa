#!/usr/bin/env python
"""The GPU check of d2_refine: build the op library with its CUDA kernels, run the CUDA tests and the benchmarks
on the GPU, train two shapes configs with mixed precision, and write every result as JSON plus one Markdown
summary. Run it through ``tools/device_check.sh`` (which also installs the carried wheels); see docs/GPU.md.

    tools/device_check.sh [--out DIR] [--only STEP ...] [--skip STEP ...]   # on a machine with a CUDA GPU
    tools/device_check.sh --dry-run --out DIR                                # anywhere: CPU, tiny sizes

Steps, in order (each one a subprocess with its own time limit; a failed step does not stop the others):

  env          GPU, driver, torch / CUDA / nvcc versions, which optional libraries import
  build        ``FORCE_CUDA=1 python setup.py build_ext --inplace`` for this card's architecture only, all cores;
               then a fresh process must find the CUDA kernels of every op registered (fails loudly if not) in a
               library linking the C++ runtime as a shared library (a $CXX that links it statically, found by a
               probe or by setup.py refusing the library, is replaced by the system's gcc/g++)
  (tests, train, iounet and ops first check that the CUDA kernels are registered: a machine holds no build from
   an earlier call, and the ops would otherwise fall back to their pure-PyTorch references unnoticed)
  tests        every test whose id names CUDA (``pytest -k cuda``): CUDA vs CPU for the ops, opcheck and
               torch.compile on CUDA, FPT attention paths, the DEQ solve, Sinkhorn, MBRM, ...; on a GPU a test
               skipped for want of CUDA counts as a failure
  train        (where detectron2 imports) Mask R-CNN and IoU-Net on shapes, 300 iterations with
               SOLVER.AMP.ENABLED, then COCO evaluation: finite losses, AP
  iounet       benchmarks/iounet_latency.py: R-50-FPN 800x1333 vs Faster R-CNN (target 1.3x), and the
               shapes model trained by the train step
  ops          benchmarks/ops.py: PrRoIPool vs roi_align (sampling ratio 0 and 2), IoU-guided NMS vs batched_nms
  fpt          benchmarks/fpt.py at 800x1333, batch 1: latency and peak memory (fpt_paper must stay < 4 GiB)
  ifr          benchmarks/ifr_memory.py with N = 256 RoIs: training memory vs solver depth; what autograd keeps
               (every solver) and the peak (fixed-point, Anderson) must stay flat within 10 %; Broyden's peak,
               which adds its workspace of 2 vectors per step, is reported; then benchmarks/ifr_test_cost.py:
               IFR's test-time cost against Mask R-CNN (batch 1, shapes configs), reported

The summary ends with the speed targets (IoU-Net, PrRoIPool vs roi_align at sampling ratio 2, FPT under AMP, IFR
at test time), each ratio against its limit: reported, not checked.

``--dry-run`` runs the same steps on the CPU with tiny sizes (no compilation: the op library as installed), so
that the script is exercised by the test suite on machines without a GPU; its numbers mean nothing.
Outputs (``--out``, default ``$OUT`` or output/device_check): ``results.json`` (every step: status, seconds,
command, parsed results), ``summary.md`` and ``log.txt`` (every command's output).
"""
import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

from device_check_steps import OPS, REPO, STATIC_RUNTIME_MARK, STEPS, Steps, _json_line, _last_error


class Check(Steps):
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out)
        self.work = os.path.join(self.out, "work") if args.work is None else os.path.abspath(args.work)
        os.makedirs(self.work, exist_ok=True)
        self.log = open(os.path.join(self.out, "log.txt"), "a")
        self.results = dict(dry_run=self.dry, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), steps={})
        self.python = sys.executable
        self.device = "cpu" if self.dry else "cuda"
        self.deadline = None if args.budget is None else time.time() + args.budget
        self.ops_error = ...  # not yet known: see _require_ops

    # -- plumbing -----------------------------------------------------------------------------------------------
    def say(self, msg):
        print(msg, flush=True)
        self.log.write(msg + "\n")
        self.log.flush()

    def sh(self, cmd, timeout, env=None):
        """Run ``cmd`` (a list) from the repository root; its output goes to log.txt (and the tail to stdout)."""
        self.say(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if self.deadline is not None:  # leave 15 s to write the results
            timeout = max(1, min(timeout, int(self.deadline - time.time() - 15)))
        t0 = time.time()
        try:
            p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=timeout)
            rc, text = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            text += f"\n[device_check] timed out after {timeout} s"
        self.log.write(text + "\n")
        self.log.flush()
        tail = "\n".join(text.rstrip().splitlines()[-15:])
        print(tail, flush=True)
        return rc, text, time.time() - t0

    def record(self, step, status, seconds=0.0, **info):
        self.results["steps"][step] = dict(status=status, seconds=round(seconds, 1), **info)
        self.say(f"[device_check] {step}: {status} ({seconds:.0f} s)")
        self.save()

    def save(self):
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    def py(self, code, timeout=120):
        rc, text, _ = self.sh([self.python, "-c", code], timeout)
        return rc, text

    # -- steps --------------------------------------------------------------------------------------------------
    def step_env(self):
        code = r"""
import importlib, json, os, platform, sys, torch, torchvision
def version(name):
    try:
        m = importlib.import_module(name)
        return getattr(m, "__version__", "installed")
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
info = dict(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
            torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            torchvision=torchvision.__version__,
            cpu_count=os.cpu_count(), detectron2=version("detectron2"), torchdeq=version("torchdeq"),
            pot=version("ot"), pycocotools=version("pycocotools"), fvcore=version("fvcore"),
            hypothesis=version("hypothesis"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
print("DEVICE_CHECK_JSON " + json.dumps(info))
"""
        t0 = time.time()
        rc, text = self.py(code)
        info = _json_line(text)
        nvcc = subprocess.run("nvcc --version | tail -n 2 | head -n 1", shell=True, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.strip()
        smi = subprocess.run("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader",
                             shell=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.strip()
        info = dict(info or {}, nvcc=nvcc or "not found", nvidia_smi=smi or "not found")
        self.results["env"] = info
        ok = rc == 0 and (self.dry or info.get("cuda_available"))
        self.record("env", "pass" if ok else "fail", time.time() - t0,
                    error=None if ok else "torch does not see a CUDA device (use --dry-run on a CPU machine)")
        return ok

    def step_build(self):
        t0 = time.time()
        info = {}
        if self.dry:
            info["note"] = "dry run: not compiled, the op library as installed is checked for its CPU kernels"
        else:
            cap = self.results.get("env", {}).get("capability", "")
            env = dict(FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 1), TORCH_CUDA_ARCH_LIST=cap)
            system = dict(CC=shutil.which("gcc") or "gcc", CXX=shutil.which("g++") or "g++")
            cxx = os.environ.get("CXX")
            if cxx and cxx != system["CXX"] and _links_static_cxx_runtime(cxx, self.work):
                # a one-second probe instead of a refused build (setup.py would refuse the library): use the
                # system's compilers from the start
                info["compiler_probe"] = f"{cxx} links the C++ runtime statically: built with {system['CXX']}"
                env.update(system)
            cmd = [self.python, "setup.py", "build_ext", "--inplace"]
            rc, text, seconds = self.sh(cmd, self.args.build_timeout, env=env)
            compiler = env.get("CXX") or cxx or "c++"
            if rc != 0 and STATIC_RUNTIME_MARK in text and compiler != system["CXX"]:
                # setup.py refused a library linked with a static C++ runtime (an op's error would crash the
                # process): the compiler named by $CXX does that; build again with the system's
                info["first_attempt"] = dict(compiler=compiler, error=_last_error(text))
                env.update(system)
                compiler, cmd = system["CXX"], cmd + ["--force"]
                rc, text, secs = self.sh(cmd, self.args.build_timeout, env=env)
                seconds += secs
            info.update(command=" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd),
                        compiler=compiler, compile_seconds=round(seconds, 1), rc=rc)
            if rc != 0:
                self.record("build", "fail", time.time() - t0, error=_last_error(text), **info)
                return False
        found, error = self._kernels()
        info.update(found)
        self.record("build", "fail" if error else "pass", time.time() - t0, error=error, **info)
        return error is None

    def _kernels(self):
        """Which kernels of the op library a fresh process finds registered (and the C++ runtime the library
        links): (found, None) when every op has its CPU (and on a GPU, CUDA) kernel, else (found, error)."""
        keys = ("CPU",) if self.dry else ("CPU", "CUDA")
        code = ("import json, torch, d2_refine.ops as o\n"
                f"ops, keys = {OPS!r}, {keys!r}\n"
                "found = {op: {k: bool(o.has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key("
                "f'd2_refine::{op}', k)) for k in keys} for op in ops}\n"
                "lib = None\n"
                "if o.has_ops():\n"
                "    import d2_refine._C as c; lib = c.__file__\n"
                "print('DEVICE_CHECK_JSON ' + json.dumps(dict(has_ops=o.has_ops(), kernels=found, library=lib)))\n")
        rc, text = self.py(code)
        found = _json_line(text) or {}
        if found.get("library"):
            found["needed"] = _needed_libraries(found["library"])
        missing = [f"{op}/{k}" for op, ks in found.get("kernels", {}).items() for k, v in ks.items() if not v]
        if rc != 0 or not found.get("has_ops") or missing:
            return found, f"kernels not registered: {missing or 'd2_refine._C did not load'}"
        needed = found.get("needed")
        if needed is not None and not _names_shared_cxx_runtime(needed):
            return found, (f"d2_refine._C links no shared C++ runtime ({needed}): an error raised by an op would "
                           "crash the process; rebuild with the system compiler (CC=gcc CXX=g++)")
        return found, None

    def _require_ops(self, step, t0):
        """Steps that run the op library on the GPU need its CUDA kernels: without them the ops would silently
        fall back to their pure-PyTorch references and the figures would describe those. Checked once per run
        (the build step checks it itself)."""
        if self.dry:
            return True
        if self.ops_error is ...:
            built = self.results["steps"].get("build")
            self.ops_error = built.get("error") if built else self._kernels()[1]
        if self.ops_error:
            self.record(step, "fail", time.time() - t0,
                        error=f"the op library is not usable here ({self.ops_error}); run the build step")
            return False
        return True

def _needed_libraries(path):
    """The shared libraries an ELF file names (readelf -d), or None where that cannot be read."""
    readelf = shutil.which("readelf")
    if readelf is None or not path or not os.path.exists(path):
        return None
    out = subprocess.run([readelf, "-d", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _links_static_cxx_runtime(cxx, work):
    """Whether the compiler ``cxx`` leaves libstdc++ (libc++) out of a shared library's dependencies, i.e. links
    the C++ runtime statically; False where that cannot be told (no readelf, the probe does not compile)."""
    src, lib = os.path.join(work, "cxx_probe.cpp"), os.path.join(work, "cxx_probe.so")
    with open(src, "w") as f:
        f.write("#include <stdexcept>\n#include <string>\n"
                "void probe(const std::string& s) { throw std::runtime_error(s); }\n")
    try:
        p = subprocess.run(shlex.split(cxx) + ["-shared", "-fPIC", src, "-o", lib], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    needed = _needed_libraries(lib) if p.returncode == 0 else None
    return needed is not None and not _names_shared_cxx_runtime(needed)


def _names_shared_cxx_runtime(needed):
    """Whether a list of ELF dependencies holds a shared C++ runtime (libstdc++ or libc++)."""
    return any(lib.startswith(("libstdc++", "libc++")) for lib in needed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no compilation")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "output", "device_check"))
    p.add_argument("--work", default=None, help="scratch folder (checkpoints, datasets; default <out>/work)")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run these steps only (env always runs)")
    p.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="skip these steps")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--build-timeout", type=int, default=300)
    p.add_argument("--tests-timeout", type=int, default=300)
    p.add_argument("--train-timeout", type=int, default=240)
    p.add_argument("--bench-timeout", type=int, default=180)
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for the whole check: every command's limit is cut to what is left, and the steps "
                        "left when it is spent are recorded as not run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    check = Check(args)
    check.say(f"[device_check] {'dry run' if args.dry_run else 'GPU run'} -> {check.out} ({platform.node()})")
    wanted = [s for s in STEPS if (args.only is None or s in args.only or s == "env") and s not in args.skip]
    for step in wanted:
        if check.deadline is not None and check.deadline - time.time() < 30:
            check.record(step, "not run", 0.0, reason=f"--budget {args.budget} s spent")
            continue
        try:
            ok = getattr(check, f"step_{step}")()
        except Exception as e:  # a bug of this script: recorded, the other steps still run
            check.record(step, "fail", 0.0, error=f"{type(e).__name__}: {e}")
            ok = False
        if step == "env" and not ok:
            break
    passed = check.summary()
    check.save()
    check.say(open(os.path.join(check.out, "summary.md")).read())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
