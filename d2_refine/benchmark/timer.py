"""The one timer of the timing loops (the benchmark's inference pass, the IFR test-budget sweep, IoU-Net's
ablation): ``time.perf_counter`` that first waits for queued CUDA work on a GPU."""
import time
from typing import Callable, Tuple


def clock(device) -> Callable[[], float]:
    """A ``time.perf_counter`` that first waits for the queued CUDA work where ``device`` is a GPU: kernels run
    asynchronously, so without it a timer reads when they were launched, not when they finished."""
    import torch

    cuda = str(device).startswith("cuda") and torch.cuda.is_available()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def time_call(fn: Callable, *args, device="cpu") -> Tuple[object, float]:
    """``fn(*args)`` and the seconds it took, its CUDA work included."""
    now = clock(device)
    t0 = now()
    out = fn(*args)
    return out, now() - t0
