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
    proc = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "--dry-run", "--deps", str(tmp_path / "none"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
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
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and "Result: every step run passed" in summary
    if steps["train"]["status"] == "pass":
        for run in steps["train"]["runs"].values():
            assert run["losses_finite"] and run["bbox"] is not None
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
    shutil.copy(ROOT / "tools" / "device_check.py", repo / "tools")
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

    prof = iounet_latency.profile_call(fn, "cpu", top=5)
    names = [o["name"] for o in prof["ops"]]
    assert names[0] in ("aten::mm", "aten::matmul"), names
    mm = next(o for o in prof["ops"] if o["name"] == "aten::mm")
    assert mm["calls"] == 3 and mm["self_device_ms"] is None
    times = [o["self_cpu_ms"] for o in prof["ops"]]
    assert times == sorted(times, reverse=True) and prof["total_self_device_ms"] is None
