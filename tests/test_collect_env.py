"""python -m d2_refine.collect_env: runs as a subprocess, reports torch, the op library's kernels per dispatch key
and the libraries' versions, and a broken install's real import error."""
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from d2_refine.collect_env import _version
from d2_refine.ops import has_ops

ROOT = Path(__file__).resolve().parents[1]


def _run(env=None):
    proc = subprocess.run([sys.executable, "-m", "d2_refine.collect_env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name.strip(): value.strip()
            for name, _, value in (line.partition(" : ") for line in proc.stdout.splitlines())}


def test_reports_torch_ops_and_libraries():
    info = _run()
    assert info["torch"].startswith(torch.__version__)
    assert info["torch built with CUDA"] == str(torch.version.cuda or "no")
    assert info["CUDA available"] == str(torch.cuda.is_available())
    assert info["torchvision"].startswith(torchvision.__version__)
    for name in ("detectron2", "torchdeq", "POT", "Python", "d2_refine"):
        assert info[name], name
    if has_ops():
        assert info["d2_refine._C"].startswith("loaded @ ")
        for op in ("prroi_pool", "iou_guided_nms"):
            keys = info[f"{op} kernels"].split(", ")
            assert {"CPU", "AutocastCPU", "AutocastCUDA"} <= set(keys), keys
            assert ("CUDA" in keys) == torch._C._dispatch_has_kernel_for_dispatch_key(f"d2_refine::{op}", "CUDA")
        assert info["_prroi_pool_backward kernels"].split(", ")[0] == "CPU"
    else:
        assert info["d2_refine._C"].startswith("not loaded: ")


def test_broken_detectron2_shows_its_import_error(tmp_path):
    # a detectron2 that is installed but does not import (e.g. built against another torch) shadows the real one
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (test)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    info = _run(env)
    assert info["detectron2"] == "installed, but import fails: ImportError: undefined symbol: _ZN3c10 (test)"


def test_missing_library_is_not_installed():
    assert _version("d2_refine_no_such_module") == "not installed"
    assert _version("torchvision").startswith(torchvision.__version__)
