"""Loading of the compiled op library ``d2_refine._C`` (built from ``csrc/`` by setup.py).

Importing ``d2_refine._C`` runs the library's static initialisers, which register the schemas and kernels of
``torch.ops.d2_refine.*`` with the dispatcher. When the library is absent (no compiler at install time) or was built
without the kernels for a device, the Python fronts fall back to their pure-PyTorch references.
"""
import importlib.util
import os
import struct
import sys
import warnings
from typing import List, Optional

import torch

_OPS = ("prroi_pool", "_prroi_pool_backward", "iou_guided_nms", "iou_guided_nms_padded", "multilevel_prroi_pool",
        "_multilevel_prroi_pool_backward")
_LOAD_ERROR = None


def needed_libraries(path: str) -> Optional[List[str]]:
    """The shared libraries an ELF file names (its DT_NEEDED entries), read from the file's section headers, or
    None where the file is not a 64- or 32-bit ELF or cannot be read (a library for another platform)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(16)
            if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
                return None
            is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
            f.seek(0x28 if is64 else 0x20)
            (shoff,) = struct.unpack(end + ("Q" if is64 else "I"), f.read(8 if is64 else 4))
            f.seek(0x3A if is64 else 0x2E)
            shentsize, shnum = struct.unpack(end + "HH", f.read(4))
            shdr = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")

            def section(i):  # (type, offset, size, link, entry size)
                f.seek(shoff + i * shentsize)
                h = struct.unpack(shdr, f.read(struct.calcsize(shdr)))
                return h[1], h[4], h[5], h[6], h[9]

            for i in range(shnum):
                kind, offset, size, link, entsize = section(i)
                if kind != 6:  # SHT_DYNAMIC
                    continue
                f.seek(offset)
                dyn = f.read(size)
                _, str_offset, str_size, _, _ = section(link)
                f.seek(str_offset)
                strings = f.read(str_size)
                entry = end + ("qQ" if is64 else "iI")
                tags = [struct.unpack_from(entry, dyn, j) for j in range(0, len(dyn) - entsize + 1, entsize)]
                return [strings[v:strings.index(b"\0", v)].decode() for t, v in tags if t == 1]  # DT_NEEDED
            return []
    except (OSError, struct.error, ValueError, IndexError):
        return None


def static_cxx_runtime_error(path: str) -> Optional[str]:
    """Why the library at ``path`` must not be loaded, or None. torch raises its errors (TORCH_CHECK) as C++
    exceptions that cross from the op library into libtorch; a library whose compiler linked the C++ runtime
    statically carries a second copy of that runtime, and an error raised by an op (a bad batch index, a wrong
    shape) then kills Python (SIGSEGV) instead of raising RuntimeError. setup.py refuses such builds; this catches
    one built elsewhere. None also where the file cannot be read as ELF (not Linux)."""
    needed = needed_libraries(path)
    if not sys.platform.startswith("linux") or needed is None:
        return None
    if any(lib.startswith(("libstdc++", "libc++")) for lib in needed):
        return None
    if os.environ.get("D2_REFINE_ALLOW_STATIC_CXX_RUNTIME") == "1":
        return None
    return (f"{path} links the C++ runtime statically (it needs only {needed}): an error raised by one of its ops "
            "would crash Python instead of raising, so it is not loaded. Rebuild it with the system compiler torch "
            "is built against: `CC=gcc CXX=g++ pip install --no-build-isolation -e .` "
            "(D2_REFINE_ALLOW_STATIC_CXX_RUNTIME=1 loads it anyway)")


def _library_path() -> Optional[str]:
    spec = importlib.util.find_spec("d2_refine._C")
    return None if spec is None else spec.origin


def _load() -> bool:
    global _LOAD_ERROR
    path = _library_path()
    refused = static_cxx_runtime_error(path) if path else None
    if refused:
        _LOAD_ERROR = ImportError(refused)
        return False
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
