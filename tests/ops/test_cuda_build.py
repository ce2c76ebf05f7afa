"""The CUDA kernels compile: a FORCE_CUDA=1 build of d2_refine._C (one architecture) into a folder outside the
source tree, wherever nvcc is present, even without a GPU. A .cu file that does not compile fails this test.

The build folder persists in the temporary directory, so ninja recompiles only the sources (and headers) that
changed since the last run; the first run takes minutes (marked slow).
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import ROOT as _ROOT

ROOT = Path(_ROOT)
CU_SOURCES = sorted(ROOT.glob("csrc/**/*.cu"))


def _nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


_CHECK_REGISTERED = """
import sys, torch
torch.ops.load_library(sys.argv[1])
missing = [op for op in ("prroi_pool", "_prroi_pool_backward", "iou_guided_nms")
           if not torch._C._dispatch_has_kernel_for_dispatch_key("d2_refine::" + op, "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc (CUDA toolkit) not found: the CUDA build check needs it")
@pytest.mark.skipif(not CU_SOURCES, reason="no CUDA sources in csrc/")
def test_force_cuda_build_compiles_and_registers_cuda_kernels():
    build = Path(tempfile.gettempdir()) / "d2_refine-cuda-build-check"
    assert ROOT not in build.parents
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    env.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    cmd = [sys.executable, "setup.py", "build_ext", "--force", "-b", str(build / "lib"), "-t", str(build / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    log = proc.stdout[-8000:] + proc.stderr[-8000:]
    assert proc.returncode == 0, f"FORCE_CUDA=1 build failed:\n{log}"
    built = sorted((build / "lib" / "d2_refine").glob("_C*.so"))
    assert built, f"no d2_refine/_C*.so in {build / 'lib'}:\n{log}"
    for cu in CU_SOURCES:  # every .cu went through nvcc
        obj = build / "tmp" / cu.relative_to(ROOT).with_suffix(".o")
        assert obj.exists(), f"{cu.relative_to(ROOT)} was not compiled ({obj} missing)"
    # the CUDA kernels are registered with the dispatcher (loads without a GPU; a fresh process, since this one
    # may already hold the CPU build of the same ops)
    check = subprocess.run([sys.executable, "-c", _CHECK_REGISTERED, str(built[0])], capture_output=True, text=True,
                           timeout=600)
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout[-4000:] + check.stderr[-4000:]
