"""tools/device_check.sh, the GPU check: its CPU dry run passes end to end (so the script cannot rot where no GPU
is at hand), and its test step survives a test that kills the process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

ROOT = Path(ROOT)


@pytest.mark.slow
def test_dry_run_passes_and_writes_results(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "--dry-run",
                           "--deps", str(tmp_path / "none"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    steps = results["steps"]
    assert list(steps) == ["env", "build", "tests", "train", "iounet", "ops", "fpt", "ifr"]
    for name, step in steps.items():
        assert step["status"] in ("pass", "skipped"), (name, step)
        if step["status"] == "skipped":
            assert "detectron2" in step["reason"]
    assert steps["build"]["kernels"]["prroi_pool"]["CPU"] and steps["build"]["kernels"]["iou_guided_nms"]["CPU"]
    # every CUDA test was collected and, on this CPU machine, skipped for want of CUDA
    counts = steps["tests"]["counts"]
    assert counts["collected"] > 50 and counts.get("failed", 0) == 0 and counts["not_run"] == 0
    for name in ("ops", "ifr"):
        assert steps[name]["data"]["rows"], name
    if steps["fpt"]["status"] == "pass":  # detectron2 imports: IFR's test-time cost against Mask R-CNN ran too
        assert steps["ifr"]["test_cost"]["rows"][0]["ratio"] > 0
        for row in steps["fpt"]["data"]["rows"]:  # the attention kernels FPT ran: fused, not SDPA's math fallback
            assert row["sdpa_kernels"] and "attention_math" not in row["sdpa_kernels"], row
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and "Result: every step run passed" in summary
    if steps["train"]["status"] == "pass":
        for run in steps["train"]["runs"].values():
            assert run["losses_finite"] and run["bbox"] is not None
            assert run["iters"] == run["max_iter"] == 2  # the iterations reached, read from metrics.json
    if steps["iounet"]["status"] == "pass":  # the profile that explains the ratio where it is measured
        profiles = steps["iounet"]["data"]["profiles"]
        assert any("full IoU-Net" in t for t in profiles) and all(p["ops"] for p in profiles.values())
        assert "Profile, one call" in summary


def test_tests_step_records_a_crashing_test_and_runs_the_rest(tmp_path):
    """A test that dies (here: SIGSEGV) is recorded as crashed, the tests after it still run, and a failure before
    the crash (whose report died with the process) is run again alone for its message."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tools").mkdir()
    for script in ("device_check.py", "device_check_steps.py"):
        shutil.copy(ROOT / "tools" / script, repo / "tools")
    (repo / "tests" / "test_kernels_cuda.py").write_text(
        "import os, signal\n"
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_op_cuda(i):\n"
        "    if i == 2:\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    assert i != 0\n"
        "def test_other():\n"
        "    pass\n")
    code = ("import json, sys; sys.path.insert(0, 'tools'); import device_check as d\n"
            "c = d.Check(d.parse_args(['--dry-run', '--out', sys.argv[1], '--only', 'tests']))\n"
            "c.results['env'] = {}\n"
            "print('OK' if c.step_tests() else 'FAILED')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "FAILED"
    step = json.loads((tmp_path / "out" / "results.json").read_text())["steps"]["tests"]
    assert step["crashed"] == ["tests/test_kernels_cuda.py::test_op_cuda[2]"]
    # test_other is selected too: -k matches the module name
    assert step["counts"] == dict(collected=5, passed=3, crashed=1, failed=1, not_run=0)
    (failure,) = [f for f in step["failures"] if f["test"].endswith("test_op_cuda[0]")]
    assert "assert 0 != 0" in failure["message"]


def test_iounet_latency_profile_names_the_costly_ops():
    """benchmarks/iounet_latency.py --profile: one profiled call lists the ops with the most self time, the
    costliest first, with their call counts (on the CPU: CPU time; no device column)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import iounet_latency
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    a = torch.randn(256, 256)

    def fn():
        for _ in range(3):
            a @ a
        a.sum()

    prof = iounet_latency.profile_call(fn, "cpu", top=10)
    calls = {o["name"]: o["calls"] for o in prof["ops"]}
    # which op is costliest is a timing (a preemption on a busy machine can land in aten::sum): only the
    # order of the list is checked below, and that both ops are there with their call counts
    assert calls.get("aten::mm") == 3 and calls.get("aten::sum") == 1, calls
    assert all(o["self_device_ms"] is None for o in prof["ops"])
    times = [o["self_cpu_ms"] for o in prof["ops"]]
    assert times == sorted(times, reverse=True) and prof["total_self_device_ms"] is None


def _check(tmp_path, *argv):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    check = device_check.Check(device_check.parse_args(["--out", str(tmp_path / "out"), *argv]))
    check.results["env"] = dict(detectron2="0.6")
    return device_check, check


@pytest.mark.parametrize("step", ["tests", "train", "iounet", "ops"])
def test_gpu_steps_refuse_to_run_without_the_compiled_kernels(tmp_path, step):
    """Without the build step in the same call, a step that runs the op library on the GPU first checks that its
    CUDA kernels are registered; here (no CUDA build) it fails at once, naming the build step, and runs nothing --
    rather than timing the pure-PyTorch fallback and reporting it as the kernels' figures."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the kernels may well be registered here")
    _, check = _check(tmp_path, "--only", step)
    assert getattr(check, f"step_{step}")() is False
    result = check.results["steps"][step]
    assert result["status"] == "fail" and "run the build step" in result["error"]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "pytest" not in log and "benchmarks/" not in log and "train_net.py" not in log
    # the summary is written all the same, with a step the budget left out (the tests step then has no test counts)
    check.record("fpt", "not run", reason="--budget 540 s spent")
    check.summary()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"| {step} | fail | " in summary and "run the build step" in summary
    assert "| fpt | not run | 0 | --budget 540 s spent |" in summary


def test_a_library_without_a_shared_cxx_runtime_fails_the_kernel_check(tmp_path, monkeypatch):
    """A compiler that links the C++ runtime statically can make every error an op raises crash the process (seen
    on a GPU machine whose $CXX, not the system's GCC, did so); the kernel check reports such a library, from its
    ELF dependencies."""
    from d2_refine.ops import has_ops

    if not has_ops() or shutil.which("readelf") is None:
        pytest.skip("needs the compiled op library and readelf")
    device_check, check = _check(tmp_path, "--dry-run")
    found, error = check._kernels()
    assert error is None and any(lib.startswith("libstdc++") for lib in found["needed"]), found
    monkeypatch.setattr(device_check, "_needed_libraries", lambda path: ["libgcc_s.so.1", "libc.so.6"])
    found, error = check._kernels()
    assert error is not None and "C++ runtime" in error


def test_build_is_done_again_with_the_system_compiler_when_setup_refuses_a_static_runtime(tmp_path, monkeypatch):
    """setup.py refuses a library that links no shared C++ runtime; the build step then builds again, forced, with
    the system's gcc/g++ in place of $CXX, and records both attempts."""
    if shutil.which("g++") is None:
        pytest.skip("no system g++")
    monkeypatch.setenv("CXX", "/opt/elsewhere/bin/g++")
    device_check, check = _check(tmp_path, "--only", "build")
    check.results["env"]["capability"] = "9.0"
    calls = []

    def sh(cmd, timeout, env=None):
        calls.append((list(cmd), dict(env or {})))
        if len(calls) == 1:
            return 1, f"RuntimeError: d2_refine: _C.abi3.so {device_check.STATIC_RUNTIME_MARK} (needs [...])", 3.0
        return 0, "copying build/lib/d2_refine/_C.abi3.so -> d2_refine", 2.0

    monkeypatch.setattr(check, "sh", sh)
    monkeypatch.setattr(check, "_kernels", lambda: (dict(has_ops=True), None))
    assert check.step_build() is True
    assert len(calls) == 2
    (first, first_env), (second, second_env) = calls
    assert "CXX" not in first_env and second_env["CXX"] == shutil.which("g++") and second[-1] == "--force"
    step = check.results["steps"]["build"]
    assert step["compiler"] == shutil.which("g++") and step["first_attempt"]["compiler"] == "/opt/elsewhere/bin/g++"
    assert step["compile_seconds"] == 5.0


def test_a_compiler_that_links_the_cxx_runtime_statically_is_found_by_a_probe(tmp_path, monkeypatch):
    """A one-second probe tells a $CXX that links the C++ runtime statically, and the build step then uses the
    system's compilers from the start (no refused build to wait for)."""
    if shutil.which("g++") is None or shutil.which("readelf") is None:
        pytest.skip("needs g++ and readelf")
    device_check, check = _check(tmp_path, "--only", "build")
    assert device_check._links_static_cxx_runtime("g++ -static-libstdc++", str(tmp_path)) is True
    assert device_check._links_static_cxx_runtime("g++", str(tmp_path)) is False
    assert device_check._links_static_cxx_runtime("/no/such/g++", str(tmp_path)) is False

    monkeypatch.setenv("CXX", "g++ -static-libstdc++")
    calls = []
    monkeypatch.setattr(check, "sh", lambda cmd, timeout, env=None: calls.append(dict(env)) or (0, "", 1.0))
    monkeypatch.setattr(check, "_kernels", lambda: (dict(has_ops=True), None))
    assert check.step_build() is True
    assert len(calls) == 1 and calls[0]["CXX"] == shutil.which("g++")
    assert "links the C++ runtime statically" in check.results["steps"]["build"]["compiler_probe"]


def test_summary_reports_each_speed_target_from_the_rows_of_a_recorded_run(tmp_path):
    # the iounet and ops rows of a real H200 run (docs/results/gpu), the FPT rows in benchmarks/fpt.py's format
    # with its precision key (that run predates it), IFR's test cost as benchmarks/ifr_test_cost.py writes it
    device_check, check = _check(tmp_path)
    steps_module = sys.modules["device_check_steps"]
    gpu = ROOT / "docs" / "results" / "gpu"
    run6 = json.loads((gpu / "h200_2026-11-27_run6.json").read_text())["steps"]
    run1 = json.loads((gpu / "h200_2026-11-27_run1.json").read_text())["steps"]
    fpt_rows = [dict(r, precision=precision, ratio=r["ratio"] / div) for r in run1["fpt"]["data"]["rows"]
                for precision, div in (("fp32", 1.0), ("amp", 4.0))]
    steps = dict(iounet=dict(status="pass", seconds=1.0, command="x", data=run6["iounet"]["data"]),
                 ops=dict(status="pass", seconds=1.0, command="x", data=run1["ops"]["data"]),
                 fpt=dict(status="pass", seconds=1.0, command="x", data=dict(rows=fpt_rows)),
                 ifr=dict(status="pass", seconds=1.0, command="x",
                          test_cost=dict(rows=[dict(case="R-18 192px", ratio=1.42)])))
    rows = {what: (ratio, limit, met) for what, ratio, limit, met in steps_module.speed_target_rows(steps)}
    assert len(rows) == 5
    iounet = rows["IoU-Net (full) vs Faster R-CNN, R-50-FPN 800x1333"]
    assert iounet[0] == pytest.approx(2.4626, abs=1e-3) and iounet[1:] == (1.3, False)
    prroi = rows["PrRoIPool fwd+bwd vs roi_align (sampling ratio 2)"]
    assert prroi[0] == pytest.approx(5.641, abs=1e-3) and prroi[2] is False  # not the box-gradient row (11.48x)
    assert rows["fpt_paper vs FPN, 800x1333, AMP"][0] == pytest.approx(19.214 / 4, abs=1e-3)
    assert rows["fpt_paper vs FPN, 800x1333, AMP"][2] is True
    assert rows["fpt_lite vs FPN, 800x1333, AMP"][0] == pytest.approx(1.703 / 4, abs=1e-3)
    assert rows["IFR vs Mask R-CNN at test time (shapes, batch 1)"][1:] == (1.5, True)

    # a step that did not run leaves its targets "not measured"; the summary writes one line per target
    del steps["ops"]
    check.results["steps"] = steps
    check.summary()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Speed targets (reported, not checked)" in summary
    assert "| PrRoIPool fwd+bwd vs roi_align (sampling ratio 2) | - | <= 1.5x | not measured |" in summary
    assert "| IoU-Net (full) vs Faster R-CNN, R-50-FPN 800x1333 | 2.46x | <= 1.3x | no |" in summary
    assert "| fpt_paper vs FPN, 800x1333, AMP | 4.80x | <= 6.0x | yes |" in summary
    # the same figures go to results.json (main saves after the summary)
    recorded = {t["what"]: t for t in check.results["speed_targets"]}
    assert recorded["IoU-Net (full) vs Faster R-CNN, R-50-FPN 800x1333"]["met"] is False
    assert recorded["PrRoIPool fwd+bwd vs roi_align (sampling ratio 2)"]["ratio"] is None
