"""Environment report for bug reports and install checks: ``python -m d2_refine.collect_env``.

Prints torch and CUDA (version, availability, devices), whether the op library ``d2_refine._C`` loaded and which
dispatch keys have a kernel of each op (CPU, CUDA, and the Autocast kernels that run the ops in float32 under
mixed precision), and the versions of the libraries d2_refine works with. A library that is installed but fails
to import is reported with its import error (a detectron2 built against another torch shows up here).
"""
import contextlib
import importlib
import importlib.util
import os
import platform
import sys
from typing import List, Optional, Tuple

__all__ = ["collect_env_info", "machine_info"]

#: dispatch keys listed for each op of d2_refine._C
DISPATCH_KEYS = ("CPU", "CUDA", "AutocastCPU", "AutocastCUDA")
#: (shown name, module) of the libraries reported
LIBRARIES = (("torchvision", "torchvision"), ("detectron2", "detectron2"), ("torchdeq", "torchdeq"),
             ("POT", "ot"))


def _version(module: str) -> str:
    """The version of ``module``, "not installed", or the error that importing it raises."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # installed but broken: the real error is what a bug report needs
        return f"installed, but import fails: {type(e).__name__}: {e}"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module)
        except Exception:
            version = "unknown version"
    return f"{version} @ {getattr(mod, '__file__', '?')}"


def _torch_rows() -> List[Tuple[str, str]]:
    import torch

    rows = [("torch", f"{torch.__version__} @ {torch.__file__}"),
            ("torch built with CUDA", str(torch.version.cuda or "no"))]
    available = torch.cuda.is_available()
    rows.append(("CUDA available", str(available)))
    if available:
        for i in range(torch.cuda.device_count()):
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)} (compute capability {cap})"))
    return rows


def _ops_rows() -> List[Tuple[str, str]]:
    import torch

    from d2_refine.ops import _library

    if not _library.has_ops():
        return [("d2_refine._C", f"not loaded: {_library.load_error()}")]
    from d2_refine import _C

    rows = [("d2_refine._C", f"loaded @ {_C.__file__}")]
    for op in _library._OPS:
        keys = [k for k in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"d2_refine::{op}", k)]
        rows.append((f"  {op} kernels", ", ".join(keys) or "none"))
    if torch.cuda.is_available() and not _library.has_kernel("prroi_pool", torch.device("cuda")):
        rows.append(("  note", "CUDA is available but d2_refine._C has no CUDA kernels: the ops fall back to their "
                     "slow references on GPU; rebuild with FORCE_CUDA=1 pip install -e ."))
    return rows


def machine_info(num_threads: Optional[int] = None) -> dict:
    """The machine a run or a timing pass used, as the benchmark records keep it: host, CPU model, cores,
    OMP_NUM_THREADS (``num_threads`` where given), Python, torch and the GPU (None without CUDA)."""
    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    info = dict(host=platform.node(), cpu=cpu, cpu_count=os.cpu_count(),
                omp_num_threads=num_threads or (int(omp) if omp.isdigit() else None),
                python=platform.python_version())
    with contextlib.suppress(ImportError):
        import torch

        info.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def collect_env_info() -> str:
    """The report, one "name: value" line per entry."""
    import d2_refine

    rows = [("sys.platform", f"{sys.platform} ({platform.machine()})"), ("Python", sys.version.replace("\n", " ")),
            ("d2_refine", f"{d2_refine.__version__} @ {d2_refine.__file__}")]
    rows += _torch_rows()
    rows += _ops_rows()
    rows += [(name, _version(module)) for name, module in LIBRARIES]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}} : {value}" for name, value in rows)


def main() -> None:
    print(collect_env_info())


if __name__ == "__main__":
    main()
