"""3x3 convolutions of a batch of RoIs at inference on one CPU thread through NNPACK's Winograd kernels (torch only).

oneDNN, PyTorch's default CPU backend, convolves directly; NNPACK (built into PyTorch's x86 and ARM wheels) uses
Winograd transforms for 3x3 kernels, fewer multiplications per output, and is faster once the batch is large, as
in a mask head run on every detection (one thread, 27 RoIs of 128 channels, 14x14: 9.7 ms against oneDNN's 18.0;
slower below 8 RoIs; benchmarks/ifr_test_cost.py measures it in a whole model). Results equal oneDNN's
within float rounding (about 2e-6 absolute at unit scale). PyTorch's own dispatcher picks NNPACK only when oneDNN
is switched off; ``conv2d_inference`` picks it for one layer, under the rule ATen applies (batch of at least 16,
no stride or dilation), only where no gradient is wanted, and only when torch runs one thread: NNPACK has its own
thread pool, which competes for the cores with the OpenMP threads of the ops around it (two threads, a conv
followed by GroupNorm: 12.6 ms on NNPACK against 8.7 on oneDNN, where the conv alone is 6.3 against 9.8).
``torch.backends.nnpack.flags(enabled=False)`` turns it off.
"""
import functools

import torch
from torch import nn

from d2_refine.utils.tracing import is_tracing_or_exporting

__all__ = ["conv2d_inference", "nnpack_usable"]

MIN_BATCH = 16  # ATen's ConvParams::use_nnpack rule, and below it NNPACK is no faster here (measured above)


@functools.lru_cache(maxsize=None)
def _nnpack_initialised() -> bool:
    # is_available() initialises NNPACK: without that first call the convolution op fails
    # ("NNPACK SpatialConvolution_updateOutput failed")
    return hasattr(torch, "_nnpack_spatial_convolution") and bool(torch.backends.nnpack.is_available())


def _nnpack_enabled() -> bool:  # the switch of torch.backends.nnpack.flags / set_flags
    return bool(getattr(torch._C, "_get_nnpack_enabled", lambda: True)())


def nnpack_usable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv2d_inference(conv, x)`` runs on NNPACK."""
    # graph captures first: they keep the module's call, and a test of the batch size would guard the shape
    if is_tracing_or_exporting() or torch.compiler.is_compiling():
        return False
    # the parameters, not ``conv.weight``: a parametrized weight (weight norm) would be computed for the test
    params = list(conv.parameters())
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[0] >= MIN_BATCH
            and all(p.dtype == torch.float32 for p in params)
            and conv.groups == 1 and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)))
            and torch.get_num_threads() == 1 and _nnpack_enabled() and _nnpack_initialised())


def conv2d_inference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, on NNPACK where ``nnpack_usable`` says so (else the module's own call)."""
    if not nnpack_usable(conv, x):
        return conv(x)
    return torch._nnpack_spatial_convolution(x.contiguous(), conv.weight.contiguous(), conv.bias, list(conv.padding))
