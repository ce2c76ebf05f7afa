"""Counting the ops that make the host wait for a GPU, on any device (the CPU included): ops whose output size
depends on the data (nonzero, boolean-mask indexing, unique, ...) and reads of a device value (``.item()``,
``bool(t)``, ``.tolist()``). Seen as dispatched from Python: what a compiled kernel does inside is not; the compiled
ops known to synchronise inside on CUDA are counted once per call."""
from typing import Dict

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter"]

#: aten ops that wait for the device: data-dependent output sizes, and reads of a value
SYNC_OPS = frozenset({"nonzero", "_local_scalar_dense", "is_nonzero", "equal", "masked_select", "unique", "_unique",
                      "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount",
                      "allclose", "_linalg_check_errors"})
#: compiled ops that synchronise inside on CUDA: torchvision's NMS (its result is reduced on the host), PrRoIPool
#: (its batch-index check), IoU-guided NMS (its class count and output size)
SYNCING_CUSTOM_OPS = frozenset({("torchvision", "nms"), ("d2_refine", "prroi_pool"),
                                ("d2_refine", "_prroi_pool_backward"), ("d2_refine", "iou_guided_nms")})
_BOOL_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _is_sync(func, args, kwargs) -> bool:
    ns, name = func.namespace, func._opname
    if ns != "aten":
        return (ns, name) in SYNCING_CUSTOM_OPS
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # tensor repeats without output_size: the size is read from the device
        return func._overloadname != "self_int" and kwargs.get("output_size") is None
    if name in _BOOL_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


class _TolistCounter(TorchFunctionMode):
    """``Tensor.tolist`` reads every value on the host without dispatching an aten op: counted at the Python call."""

    def __init__(self, counts: Dict[str, int]):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counts["Tensor.tolist"] = self.counts.get("Tensor.tolist", 0) + 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...`` then ``c.total`` and ``c.counts`` ({op name: calls})."""

    def __init__(self):
        super().__init__()
        self.counts: Dict[str, int] = {}
        self._tolist = _TolistCounter(self.counts)

    def __enter__(self):
        self._tolist.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._tolist.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            name = f"{func.namespace}::{func._opname}"
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
