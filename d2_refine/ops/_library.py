"""Loading of the compiled op library ``d2_refine._C`` (built from ``csrc/`` by setup.py).

Importing ``d2_refine._C`` runs the library's static initialisers, which register the schemas and kernels of
``torch.ops.d2_refine.*`` with the dispatcher. When the library is absent (no compiler at install time) or was built
without the kernels for a device, the Python fronts fall back to their pure-PyTorch references.
"""
import warnings

import torch

_OPS = ("prroi_pool", "_prroi_pool_backward", "iou_guided_nms")
_LOAD_ERROR = None


def _load() -> bool:
    global _LOAD_ERROR
    try:
        from d2_refine import _C  # noqa: F401  (registers torch.ops.d2_refine.*)
    except ImportError as e:
        _LOAD_ERROR = e
        return False
    missing = [op for op in _OPS if not hasattr(torch.ops.d2_refine, op)]
    if missing:
        _LOAD_ERROR = ImportError(f"d2_refine._C lacks the ops {missing}: rebuild it (python setup.py build_ext)")
        return False
    return True


_HAS_OPS = _load()
# {device type: {op name: has a kernel}} for the backends the compiled library may carry
_KERNELS = {
    dev: {op: _HAS_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(f"d2_refine::{op}", key) for op in _OPS}
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}
_WARNED = set()


def has_ops() -> bool:
    """Whether the compiled op library ``d2_refine._C`` loaded (with all its ops)."""
    return _HAS_OPS


def load_error():
    """Why ``d2_refine._C`` did not load (an ImportError), or None when it loaded."""
    return _LOAD_ERROR


def compute_dtype(*tensors: torch.Tensor, native_half: bool = False) -> torch.dtype:
    """The dtype an op runs in for floating-point arguments of mixed dtypes: the widest of them (float64 if one is
    float64), and float32 instead of float16 / bfloat16 unless ``native_half`` (a kernel that computes in half,
    outside autocast)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16) and not native_half:
        return torch.float32
    return dtype


def autocast_enabled(device: torch.device) -> bool:
    """Whether torch.autocast is enabled for ``device``'s type (False for device types autocast does not know)."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether the compiled library has a kernel of ``op`` for ``device`` (False for devices it was not built for)."""
    return _KERNELS.get(device.type, {}).get(op, False)


def require_kernels(ops, device, user: str, why: str) -> None:
    """Raise one RuntimeError line when the compiled library has no kernel for ``device`` of one of ``ops``: for
    ``user``s (e.g. a model built for CUDA) for which the pure-PyTorch fallback is no option (``why``)."""
    device = torch.device(device)
    missing = [op for op in ops if not has_kernel(op, device)]
    if missing:
        reason = f"it failed to load ({_LOAD_ERROR})" if not _HAS_OPS else f"it was built without {device.type} kernels"
        raise RuntimeError(
            f"{user} needs the {device.type} kernels of d2_refine._C ({', '.join(missing)}) but {reason}; {why}. "
            f"Rebuild it with FORCE_CUDA=1 (and nvcc) as in the README's install: FORCE_CUDA=1 pip install "
            f"--no-build-isolation -e .")


def warn_fallback(op: str, device: torch.device) -> None:
    """Warn once per (op, device type) that the slow pure-PyTorch reference is used instead of the kernel."""
    if (op, device.type) in _WARNED:
        return
    _WARNED.add((op, device.type))
    reason = f"it failed to load ({_LOAD_ERROR})" if not _HAS_OPS else f"it has no {device.type} kernel"
    warnings.warn(
        f"d2_refine.ops.{op}: using the pure-PyTorch reference (slow) because the compiled op library "
        f"d2_refine._C cannot serve it: {reason}. Build it with `pip install -e .` (needs a C++ compiler; "
        f"FORCE_CUDA=1 and nvcc for the CUDA kernels).",
        stacklevel=3,
    )
