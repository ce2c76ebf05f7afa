"""The measuring steps of tools/device_check.py (tests, train, iounet, ops, fpt, ifr) and its Markdown summary,
as a mixin of its ``Check`` (which holds the plumbing: ``sh``, ``record``, ``say`` and the build step)."""
import json
import math
import os
import re
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "build", "tests", "train", "iounet", "ops", "fpt", "ifr")
OPS = ("prroi_pool", "_prroi_pool_backward", "iou_guided_nms")
#: the tests run on the GPU: every test whose id names CUDA (device parameters, CUDA-only tests and modules)
TEST_SELECTION = "cuda or CUDA"
#: setup.py's message when it refuses a library linked with a static C++ runtime
STATIC_RUNTIME_MARK = "does not link the C++ runtime as a shared library"
TARGETS = dict(fpt_paper_peak_gib=4.0, iounet_r50_ratio=1.3, ifr_flat=1.10)
#: the speed targets the summary reports against (reported, not checked: a slow kernel does not fail the check):
#: (what, where the rows are in the results: (step, key), how its row is found, the limit)
SPEED_TARGETS = (
    ("IoU-Net (full) vs Faster R-CNN, R-50-FPN 800x1333", ("iounet", "data"),
     lambda r: r["case"].startswith("R50") and "full" in r["case"], TARGETS["iounet_r50_ratio"]),
    ("PrRoIPool fwd+bwd vs roi_align (sampling ratio 2)", ("ops", "data"),
     lambda r: r["case"].startswith("prroi_pool fwd+bwd vs roi_align(sampling_ratio=2)"), 1.5),
    ("fpt_paper vs FPN, 800x1333, AMP", ("fpt", "data"),
     lambda r: r.get("preset") == "fpt_paper" and r.get("size") == "coco" and r.get("precision") == "amp", 6.0),
    ("fpt_lite vs FPN, 800x1333, AMP", ("fpt", "data"),
     lambda r: r.get("preset") == "fpt_lite" and r.get("size") == "coco" and r.get("precision") == "amp", 1.3),
    ("IFR vs Mask R-CNN at test time (shapes, batch 1)", ("ifr", "test_cost"), lambda r: True, 1.5),
)
TRAIN_CONFIGS = {
    "mask_rcnn": "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml",
    "iounet": "configs/IoUNet/iounet_R_18_FPN_shapes.yaml",
}



def _f(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def speed_target_rows(steps):
    """(what, measured ratio or None, limit, met or None) for each of ``SPEED_TARGETS``, from the steps' rows."""
    out = []
    for what, (step, key), match, limit in SPEED_TARGETS:
        rows = ((steps.get(step) or {}).get(key) or {}).get("rows", [])
        ratio = next((r["ratio"] for r in rows if match(r)), None)
        out.append((what, ratio, limit, None if ratio is None else ratio <= limit))
    return out


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


def _count_by(items):
    out = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _gpu_shapes_opts(work):
    """The shapes dataset of the train and iounet steps: 600 training images (300 iterations of 4 see each twice;
    generating the default 2,000 takes ~50 s of the check's budget), one set for both steps (another NUM_TRAIN is
    another dataset, generated again)."""
    return ["DATASETS.SHAPES.ROOT", os.path.join(work, "shapes"), "DATASETS.SHAPES.NUM_TRAIN", "600"]


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



class Steps:
    """The steps after the build, and the summary; mixed into device_check.Check."""

    def step_tests(self):
        """pytest -k cuda in a fresh process; a test that kills the process (a crash in a kernel) is recorded as
        crashed and the tests not yet run are run again in a new process, up to 5 times."""
        t0 = time.time()
        if not self._require_ops("tests", t0):
            return False
        base = [self.python, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider",
                "-o", "console_output_style=classic"]
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
                opts += ["SOLVER.AMP.ENABLED", "True"] + _gpu_shapes_opts(self.work)
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
                step["fpt_paper_peak_gib"] = max(round(gib, 2), step.get("fpt_paper_peak_gib", 0))  # of every row
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
            cmd += ["--min-run-time", "3", "--shapes-images", "50", "--opts"] + _gpu_shapes_opts(self.work)
        return self._bench("iounet", cmd, path, t0)  # its target is among the summary's speed targets

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
            if name == "tests":  # no counts when the step did not run its tests (build failed, budget spent)
                note = (f"{s.get('counts', '')} " + note).strip()
            lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {str(note)[:300]} |")
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
                             f"{_f(r.get('final_total_loss'), 3)} | {r.get('losses_finite')} | "
                             f"{_f(b.get('AP'))} | {_f(b.get('AP50'))} | "
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
                lines += ["| case | FPN ms | FPT ms | ratio | FPN peak MiB | FPT peak MiB | FPT's SDPA kernels |",
                          "|---|---|---|---|---|---|---|"]
                lines += [f"| {r['case']} | {r['base_ms']:.1f} | {r['ours_ms']:.1f} | {r['ratio']:.2f}x | "
                          f"{_f(r['base_peak_mib'], 0)} | {_f(r['ours_peak_mib'], 0)} | "
                          f"{', '.join(f'{k} {n}' for k, n in (r.get('sdpa_kernels') or {}).items()) or '-'} |"
                          for r in rows]
            elif name == "ifr":
                lines += ["| case | ms | vs explicit K=4 | peak MiB | peak / smallest depth |", "|---|---|---|---|---|"]
                lines += [f"| {r['case']} | {r['ms']:.1f} | {r['ratio']:.2f}x | {r['peak_mib']:.1f} | "
                          f"{r['peak_rel']:.2f} |" for r in rows]
            else:
                lines += ["| case | base ms | ours ms | ratio |", "|---|---|---|---|"]
                lines += [f"| {r['case']} | {r['base_ms']:.3g} | {r['ours_ms']:.3g} | {r['ratio']:.2f}x |"
                          for r in rows]
            for title, prof in (data.get("profiles") or {}).items():
                lines += ["", f"Profile, one call: {title} (sorted by {prof['sort_by']}; host syncs: "
                          f"{prof['host_syncs'] or 'none counted'}; per image {prof.get('host_syncs_per_image')} "
                          f"by the profiler, {prof.get('dispatch_syncs_per_image')} by the ops)", "",
                          "| op | calls | self CPU ms | self device ms |", "|---|---|---|---|"]
                lines += [f"| `{o['name'][:60]}` | {o['calls']} | {o['self_cpu_ms']:.2f} | "
                          f"{_f(o['self_device_ms'], 2)} |"
                          for o in prof["ops"][:12]]
        if not self.dry:
            targets = speed_target_rows(steps)
            self.results["speed_targets"] = [dict(what=w, ratio=r, limit=lim, met=m) for w, r, lim, m in targets]
            lines += ["", "## Speed targets (reported, not checked)", "", "| ratio | measured | target | met |",
                      "|---|---|---|---|"]
            lines += [f"| {what} | {'-' if ratio is None else f'{ratio:.2f}x'} | <= {limit}x | "
                      f"{'not measured' if met is None else ('yes' if met else 'no')} |"
                      for what, ratio, limit, met in targets]
        failed = [n for n, s in steps.items() if s["status"] == "fail"]
        not_run = [n for n, s in steps.items() if s["status"] == "not run"]
        verdict = "FAIL: " + ", ".join(failed) if failed else "every step run passed or was skipped"
        lines += ["", f"Result: {verdict}" + (f"; not run (out of time): {', '.join(not_run)}" if not_run else "")]
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return not failed
