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
  iounet       benchmarks/iounet_latency.py: R-50-FPN 800x1333 vs Faster R-CNN (threshold 1.15x), and the
               shapes model trained by the train step
  ops          benchmarks/ops.py: PrRoIPool vs roi_align (sampling ratio 0 and 2), IoU-guided NMS vs batched_nms
  fpt          benchmarks/fpt.py at 800x1333, batch 1: latency and peak memory (fpt_paper must stay < 4 GiB)
  ifr          benchmarks/ifr_memory.py with N = 256 RoIs: training memory vs solver depth; what autograd keeps
               (every solver) and the peak (fixed-point, Anderson) must stay flat within 10 %; Broyden's peak,
               which adds its workspace of 2 vectors per step, is reported; then benchmarks/ifr_test_cost.py:
               IFR's test-time cost against Mask R-CNN (batch 1, shapes configs), reported

``--dry-run`` runs the same steps on the CPU with tiny sizes (no compilation: the op library as installed), so
that the script is exercised by the test suite on machines without a GPU; its numbers mean nothing.
Outputs (``--out``, default ``$OUT`` or output/device_check): ``results.json`` (every step: status, seconds,
command, parsed results), ``summary.md`` and ``log.txt`` (every command's output).
"""
import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "build", "tests", "train", "iounet", "ops", "fpt", "ifr")
OPS = ("prroi_pool", "_prroi_pool_backward", "iou_guided_nms")
#: the tests run on the GPU: every test whose id names CUDA (device parameters, CUDA-only tests and modules)
TEST_SELECTION = "cuda or CUDA"
#: setup.py's message when it refuses a library linked with a static C++ runtime
STATIC_RUNTIME_MARK = "does not link the C++ runtime as a shared library"
TARGETS = dict(fpt_paper_peak_gib=4.0, iounet_r50_ratio=1.15, ifr_flat=1.10)
TRAIN_CONFIGS = {
    "mask_rcnn": "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml",
    "iounet": "configs/IoUNet/iounet_R_18_FPN_shapes.yaml",
}


class Check:
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
            torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), torchvision=torchvision.__version__,
            cpu_count=os.cpu_count(), detectron2=version("detectron2"), torchdeq=version("torchdeq"),
            pot=version("ot"), pycocotools=version("pycocotools"), fvcore=version("fvcore"))
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

    def step_tests(self):
        """pytest -k cuda in a fresh process; a test that kills the process (a crash in a kernel) is recorded as
        crashed and the tests not yet run are run again in a new process, up to 5 times."""
        t0 = time.time()
        if not self._require_ops("tests", t0):
            return False
        base = [self.python, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
        select = ["-k", TEST_SELECTION, "tests", "--deselect", "tests/ops/test_cuda_build.py"]
        rc, text, _ = self.sh(base[:3] + ["--collect-only", "-q"] + select, self.args.tests_timeout)
        collected = [ln.strip() for ln in text.splitlines() if ln.startswith("tests/") and "::" in ln]
        outcomes, failures, skips, crashed, todo = {}, [], [], [], None
        for _ in range(6):
            args = select if todo is None else todo
            rc, text, _ = self.sh(base + args, self.args.tests_timeout)
            started = None
            for ln in text.splitlines():
                m = re.match(r"^(tests/\S+::\S+)(.*)$", ln)
                if m:  # "nodeid OUTCOME" when it ended; "nodeid" (and whatever a crash printed) when it did not
                    outcome = re.match(r"\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", m.group(2))
                    if outcome:
                        outcomes[m.group(1)], started = outcome.group(1), None
                    else:
                        started = m.group(1)
                    continue
                m = re.match(r"^(FAILED|ERROR) (tests/\S+::\S+)(?: - (.*))?", ln)
                if m:
                    failures.append(dict(test=m.group(2), message=(m.group(3) or "")[:500]))
                m = re.match(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)", ln)
                if m:
                    skips += [m.group(2)] * int(m.group(1))
            if rc >= 0 or rc == 124:
                break
            if started is None:  # died between tests: nothing to blame, nothing to resume
                failures.append(dict(test="(pytest)", message=f"pytest died with signal {-rc}: {_last_error(text)}"))
                break
            crashed.append(started)
            outcomes[started] = f"CRASHED (signal {-rc})"
            failures.append(dict(test=started, message=f"the test process died with signal {-rc}"))
            todo = [t for t in collected if t not in outcomes]
            if not todo:
                break
        # a run that crashed printed no failure report: run its failed tests again, alone, for their messages
        explained = {f["test"] for f in failures}
        unexplained = [t for t, o in outcomes.items() if o in ("FAILED", "ERROR") and t not in explained]
        failures += [dict(test=t, message="") for t in unexplained]
        if unexplained:
            _, text, _ = self.sh(base[:3] + ["-q", "-rfE", "--tb=short", "-p", "no:cacheprovider"] + unexplained,
                                 self.args.tests_timeout)
            reasons = {m.group(2): (m.group(3) or "") for m in re.finditer(
                r"^(FAILED|ERROR) (tests/\S+::\S+)(?: - (.*))?$", text, flags=re.M)}
            for f in failures:
                if f["test"] in reasons and not f["message"]:
                    f["message"] = "(run again alone) " + reasons[f["test"]][:480]
        counts = dict(collected=len(collected))
        for o in outcomes.values():
            key = "crashed" if o.startswith("CRASHED") else o.lower()
            counts[key] = counts.get(key, 0) + 1
        counts["not_run"] = len([t for t in collected if t not in outcomes])
        info = dict(command=" ".join(base[1:] + select), counts=counts, failures=failures[:40], crashed=crashed,
                    skip_reasons=_count_by(skips))
        # on a GPU nothing may be skipped for want of CUDA; in a dry run everything is
        no_cuda = sum(n for reason, n in info["skip_reasons"].items() if "CUDA is not available" in reason)
        bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("crashed", 0) + counts["not_run"]
        if self.dry:
            ok = rc == 0 and len(collected) > 0 and bad == 0
        else:
            ok = bad == 0 and no_cuda == 0 and counts.get("passed", 0) > 0
            if no_cuda:
                info["error"] = f"{no_cuda} CUDA tests skipped on a machine with CUDA"
        if rc not in (0, 1) and not crashed and "error" not in info:
            info["error"] = f"pytest exited {rc}: {_last_error(text)}"
        self.record("tests", "pass" if ok else "fail", time.time() - t0, **info)
        return ok

    def step_train(self):
        t0 = time.time()
        if self._skipped_without_detectron2("train"):
            return True
        if not self._require_ops("train", t0):
            return False
        runs, ok = {}, True
        iters = 2 if self.dry else self.args.train_iters
        for name, config in TRAIN_CONFIGS.items():
            out_dir = os.path.join(self.work, "train", name)
            opts = ["OUTPUT_DIR", out_dir, "SEED", "1", "MODEL.DEVICE", self.device, "SOLVER.MAX_ITER", str(iters),
                    "DATALOADER.NUM_WORKERS", "0" if self.dry else "4"]
            if self.dry:  # AMP needs CUDA (detectron2's AMPTrainer): the dry run trains in float32
                opts += _tiny_shapes_opts(self.work)
            else:
                # 600 training images (300 iterations of 4 see each twice): generating the default 2,000 takes
                # ~50 s of the check's budget
                opts += ["SOLVER.AMP.ENABLED", "True", "DATASETS.SHAPES.ROOT", os.path.join(self.work, "shapes"),
                         "DATASETS.SHAPES.NUM_TRAIN", "600"]
            cmd = [self.python, "train_net.py", "--config-file", config] + opts
            rc, text, secs = self.sh(cmd, self.args.train_timeout, env=dict(OMP_NUM_THREADS="1" if self.dry else "4"))
            run = dict(command=" ".join(cmd[1:]), seconds=round(secs, 1), rc=rc, amp=not self.dry, max_iter=iters)
            run.update(_train_metrics(out_dir))
            run_ok = rc == 0 and run.get("losses_finite") and run.get("bbox") is not None and run["iters"] == iters
            if not run_ok:
                run["error"] = _last_error(text)
            runs[name] = run
            ok = ok and run_ok
        self.record("train", "pass" if ok else "fail", time.time() - t0, runs=runs)
        return ok

    def step_ops(self):
        t0 = time.time()
        if not self._require_ops("ops", t0):
            return False
        path = os.path.join(self.work, "ops.json")
        cmd = [self.python, "benchmarks/ops.py", "--device", self.device, "--json", path]
        cmd += ["--tiny", "--min-run-time", "0.01", "--rounds", "1"] if self.dry else ["--min-run-time", "0.3"]
        return self._bench("ops", cmd, path, t0)

    def step_fpt(self):
        t0 = time.time()
        if self._skipped_without_detectron2("fpt"):
            return True
        path = os.path.join(self.work, "fpt.json")
        cmd = [self.python, "benchmarks/fpt.py", "--device", self.device, "--json", path]
        cmd += ["--sizes", "shapes", "--repeats", "1"] if self.dry else ["--sizes", "coco", "--repeats", "10"]
        ok = self._bench("fpt", cmd, path, t0)
        step = self.results["steps"]["fpt"]
        for row in (step.get("data") or {}).get("rows", []):
            if row["preset"] == "fpt_paper" and row["size"] == "coco" and not self.dry:
                gib = row["ours_peak_mib"] / 1024
                step["fpt_paper_peak_gib"] = round(gib, 2)
                if not gib < TARGETS["fpt_paper_peak_gib"]:
                    step.update(status="fail", error=f"fpt_paper peak {gib:.2f} GiB >= 4 GiB")
                    ok = False
        self.save()
        return ok

    def step_iounet(self):
        t0 = time.time()
        if self._skipped_without_detectron2("iounet"):
            return True
        if not self._require_ops("iounet", t0):
            return False
        path = os.path.join(self.work, "iounet.json")
        weights = os.path.join(self.work, "train", "iounet", "model_final.pth")
        cmd = [self.python, "benchmarks/iounet_latency.py", "--device", self.device, "--json", path,
               "--shapes-weights", weights, "--profile"]
        if self.dry:
            cmd += ["--skip-r50", "--min-run-time", "0.01", "--shapes-images", "2"] + ["--opts"] + \
                _tiny_shapes_opts(self.work)
        else:
            cmd += ["--min-run-time", "3", "--shapes-images", "50", "--opts", "DATASETS.SHAPES.ROOT",
                    os.path.join(self.work, "shapes")]
        ok = self._bench("iounet", cmd, path, t0)
        step = self.results["steps"]["iounet"]
        full = [r for r in (step.get("data") or {}).get("rows", []) if r["case"].startswith("R50") and "full" in r["case"]]
        if full and not self.dry:
            step["r50_full_ratio"] = round(full[0]["ratio"], 3)
            step["r50_target_met"] = full[0]["ratio"] <= TARGETS["iounet_r50_ratio"]
        self.save()
        return ok

    def step_ifr(self):
        t0 = time.time()
        path = os.path.join(self.work, "ifr.json")
        cmd = [self.python, "benchmarks/ifr_memory.py", "--device", self.device, "--json", path]
        if self.dry:
            cmd += ["--num-rois", "2", "--channels", "16", "--explicit-depths", "1,2", "--implicit-depths", "2,3",
                    "--solvers", "anderson"]
        else:
            cmd += ["--num-rois", "256"]
        ok = self._bench("ifr", cmd, path, t0)
        step = self.results["steps"]["ifr"]
        rows = (step.get("data") or {}).get("rows", [])
        # the implicit model's claim (IFR paper): what autograd keeps does not grow with the solver depth.
        # The peak adds the solver's own workspace: constant for fixed-point and Anderson (a fixed window),
        # linear in T for Broyden (two low-rank update vectors per step), so its peak is reported, not checked.
        saved, peak = {}, {}
        for row in rows:
            if row["mode"] == "implicit":
                first = min((r for r in rows if r["solver"] == row["solver"]), key=lambda r: r["depth"])
                saved[row["solver"]] = max(saved.get(row["solver"], 0.0), row["saved_mib"] / first["saved_mib"])
                peak[row["solver"]] = max(peak.get(row["solver"], 0.0), row["peak_rel"])
        step.update(implicit_saved_max_rel=saved, implicit_peak_max_rel=peak)
        grown = {k: v for k, v in saved.items() if v > TARGETS["ifr_flat"]}
        grown.update({k: v for k, v in peak.items() if k != "broyden" and v > TARGETS["ifr_flat"]})
        if grown and not self.dry:
            step.update(status="fail", error=f"implicit memory grows with depth: {grown}")
            ok = False
        # IFR's test-time cost against Mask R-CNN (benchmarks/ifr_test_cost.py), reported, not checked
        cost = os.path.join(self.work, "ifr_test_cost.json")
        if not str(self.results.get("env", {}).get("detectron2", "unavailable")).startswith("unavailable"):
            self.sh([self.python, "benchmarks/ifr_test_cost.py", "--device", self.device, "--json", cost,
                     "--repeats", "2" if self.dry else "30"], self.args.bench_timeout)
            if os.path.exists(cost):
                with open(cost) as f:
                    step["test_cost"] = json.load(f)
        self.save()
        return ok

    def _bench(self, step, cmd, path, t0):
        if os.path.exists(path):
            os.remove(path)
        rc, text, _ = self.sh(cmd, self.args.bench_timeout)
        data = None
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        ok = rc == 0 and data is not None and len(data.get("rows", [])) > 0
        self.record(step, "pass" if ok else "fail", time.time() - t0, command=" ".join(cmd[1:]), data=data,
                    error=None if ok else _last_error(text))
        return ok

    def _skipped_without_detectron2(self, step):
        """Record ``step`` as skipped (and return True) where detectron2 does not import."""
        if str(self.results.get("env", {}).get("detectron2", "unavailable")).startswith("unavailable"):
            self.record(step, "skipped", 0.0, reason="detectron2 does not import here")
            return True
        return False

    # -- summary ------------------------------------------------------------------------------------------------
    def summary(self):
        env = self.results.get("env", {})
        lines = [f"# d2_refine device check{' (dry run: CPU, tiny sizes, numbers mean nothing)' if self.dry else ''}",
                 "", f"{self.results['started']} | GPU: {env.get('gpu', 'none')} (sm {env.get('capability', '-')}, "
                 f"{env.get('gpu_memory_gib', '-')} GiB) | driver/nvidia-smi: {env.get('nvidia_smi')} | "
                 f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) | torchvision {env.get('torchvision')} | "
                 f"nvcc: {env.get('nvcc')} | Python {env.get('python')} | {env.get('cpu_count')} CPUs | "
                 f"detectron2: {env.get('detectron2')} | torchdeq: {env.get('torchdeq')} | POT: {env.get('pot')}",
                 "", "| step | status | seconds | note |", "|---|---|---|---|"]
        for name, s in self.results["steps"].items():
            note = s.get("error") or s.get("reason") or s.get("note") or ""
            if name == "tests":
                note = (f"{s['counts']} " + note).strip()
            lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {str(note)[:300]} |")
        steps = self.results["steps"]
        if steps.get("tests", {}).get("failures"):
            lines += ["", "## Failed tests", ""] + [f"- `{f['test']}`: {f['message'][:300]}"
                                                     for f in steps["tests"]["failures"]]
        if steps.get("train", {}).get("runs"):
            amp = "AMP" if any(r.get("amp") for r in steps["train"]["runs"].values()) else "float32"
            lines += ["", f"## Training (shapes, {amp})", "", "| config | iterations | s | final total_loss | "
                      "losses finite | box AP | AP50 | AP75 | mask AP |", "|---|---|---|---|---|---|---|---|---|"]
            for name, r in steps["train"]["runs"].items():
                b, m = r.get("bbox") or {}, r.get("segm") or {}
                lines.append(f"| {name} | {r.get('iters')}/{r.get('max_iter', r.get('iters'))} | {r['seconds']:.0f} | "
                             f"{_f(r.get('final_total_loss'), 3)} | {r.get('losses_finite')} | {_f(b.get('AP'))} | {_f(b.get('AP50'))} | "
                             f"{_f(b.get('AP75'))} | {_f(m.get('AP'))} |")
        for name, title in (("ops", "Op benchmark (benchmarks/ops.py)"), ("fpt", "FPT (benchmarks/fpt.py)"),
                            ("iounet", "IoU-Net latency (benchmarks/iounet_latency.py)"),
                            ("ifr", "IFR training memory vs depth (benchmarks/ifr_memory.py)")):
            data = steps.get(name, {}).get("data")
            if not data:
                continue
            lines += ["", f"## {title}", "", f"`python {steps[name]['command']}`", ""]
            rows = data["rows"]
            if name == "fpt":
                lines += ["| case | FPN ms | FPT ms | ratio | FPN peak MiB | FPT peak MiB |", "|---|---|---|---|---|---|"]
                lines += [f"| {r['case']} | {r['base_ms']:.1f} | {r['ours_ms']:.1f} | {r['ratio']:.2f}x | "
                          f"{_f(r['base_peak_mib'], 0)} | {_f(r['ours_peak_mib'], 0)} |" for r in rows]
            elif name == "ifr":
                lines += ["| case | ms | vs explicit K=4 | peak MiB | peak / smallest depth |", "|---|---|---|---|---|"]
                lines += [f"| {r['case']} | {r['ms']:.1f} | {r['ratio']:.2f}x | {r['peak_mib']:.1f} | "
                          f"{r['peak_rel']:.2f} |" for r in rows]
            else:
                lines += ["| case | base ms | ours ms | ratio |", "|---|---|---|---|"]
                lines += [f"| {r['case']} | {r['base_ms']:.3g} | {r['ours_ms']:.3g} | {r['ratio']:.2f}x |" for r in rows]
            for title, prof in (data.get("profiles") or {}).items():
                lines += ["", f"Profile, one call: {title} (sorted by {prof['sort_by']}; host syncs: "
                          f"{prof['host_syncs'] or 'none counted'})", "",
                          "| op | calls | self CPU ms | self device ms |", "|---|---|---|---|"]
                lines += [f"| `{o['name'][:60]}` | {o['calls']} | {o['self_cpu_ms']:.2f} | {_f(o['self_device_ms'], 2)} |"
                          for o in prof["ops"][:12]]
        failed = [n for n, s in steps.items() if s["status"] == "fail"]
        not_run = [n for n, s in steps.items() if s["status"] == "not run"]
        verdict = "FAIL: " + ", ".join(failed) if failed else "every step run passed or was skipped"
        lines += ["", f"Result: {verdict}" + (f"; not run (out of time): {', '.join(not_run)}" if not_run else "")]
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return not failed


def _f(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _json_line(text):
    for line in reversed(text.splitlines()):
        if line.startswith("DEVICE_CHECK_JSON "):
            return json.loads(line[len("DEVICE_CHECK_JSON "):])
    return None


def _last_error(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error|Exception|FAILED|timed out)", ln):
            return ln.strip()[:500]
    return lines[-1][:500] if lines else ""


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


def _count_by(items):
    out = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _tiny_shapes_opts(work):
    size = 96
    return ["DATASETS.SHAPES.ROOT", os.path.join(work, "shapes_tiny"), "DATASETS.SHAPES.NUM_TRAIN", "8",
            "DATASETS.SHAPES.NUM_VAL", "4", "DATASETS.SHAPES.IMAGE_SIZE", str(size), "INPUT.MIN_SIZE_TRAIN",
            f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size), "INPUT.MIN_SIZE_TEST", str(size),
            "INPUT.MAX_SIZE_TEST", str(size), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.BASE_LR", "0.001"]


def _train_metrics(out_dir):
    """Loss finiteness and the final COCO results, from detectron2's metrics.json in ``out_dir``."""
    path = os.path.join(out_dir, "metrics.json")
    info = dict(iters=0, losses_finite=None, final_total_loss=None, bbox=None, segm=None)
    if not os.path.exists(path):
        return info
    finite, last_loss = True, None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k, v in rec.items():
                if k.startswith("loss") or k == "total_loss":
                    finite = finite and isinstance(v, (int, float)) and math.isfinite(v)
            if "total_loss" in rec:
                last_loss = rec["total_loss"]
                info["iters"] = max(info["iters"], int(rec.get("iteration", -1)) + 1)
            for task in ("bbox", "segm"):
                res = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith(task + "/")}
                if res:
                    info[task] = res
    info.update(losses_finite=finite and last_loss is not None, final_total_loss=last_loss)
    return info


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
