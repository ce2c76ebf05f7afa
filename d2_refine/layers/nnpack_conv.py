"""3x3 convolutions of a batch of RoIs at inference on one CPU thread through NNPACK (torch only).

oneDNN, PyTorch's default CPU backend, convolves directly. NNPACK (built into PyTorch's x86 and ARM wheels) uses
fast transforms, fewer multiplications per output: for a 3x3 kernel it picks by tile count between Winograd
F(6x6, 3x3) on 8x8 tiles and an FFT on 16x16 tiles. On a batch of 14x14 RoI features it picks the FFT, whose one
tile per map wastes most of its work. ``conv2d_inference`` therefore lays the RoIs out as tiles of one image,
two per row, each followed by a zero gap as wide as the padding, so that no output sees a neighbouring RoI. It
convolves that image once, where NNPACK picks Winograd, and cuts the RoIs out again. One thread, 27 RoIs of 128
channels: 6.9 ms tiled, including the copies, against 9.2 on the batch (FFT) and 13.5 on oneDNN; 23 against 32 and
57 at 256 channels (benchmarks/ifr_test_cost.py measures it in a whole model).

Precision: oneDNN and NNPACK's FFT agree with a float64 convolution to about 2e-6 at unit scale, Winograd
F(6x6, 3x3) to about 1e-4 (27 RoIs, 128 channels: 5e-5 to 9e-5). For comparison, PyTorch runs float32 convolutions
on NVIDIA GPUs in TF32 by default (``torch.backends.cudnn.conv.fp32_precision``), rounding every input to 10
mantissa bits (2^-11, about 5e-4). Winograd's transforms mix each 8x8 input tile, so a RoI's error scales with the
largest values in the tiles it shares with its neighbours (one RoI at 1000x the scale of the others: 1e-2 in the
RoIs beside it). A NaN or inf would cross the gap in the same way, so a tiled result that is not finite is computed
again on the batch, where every RoI keeps its own. ``torch.backends.nnpack.flags(enabled=False)`` switches NNPACK
off, and the module's own call (oneDNN) runs.

The rule: only where no gradient is wanted, and only when torch runs one thread. NNPACK has its own thread pool,
which competes for the cores with the OpenMP threads of the ops around it (two threads, a conv followed by
GroupNorm: 12.6 ms on NNPACK against 8.7 on oneDNN, where the conv alone is 6.3 against 9.8). Tiled: an odd square
kernel padded by half its size, at least 128 channels in and out, 4 RoIs or more. Timed interleaved, one thread,
14x14 maps: at 128 channels the tiles beat the batch from 4 to 27 RoIs and are level with it at 64 and 100, at 256
they beat it at every count; at 96 channels the batch catches up from 64 RoIs, and at 64 channels the tiles are the
slowest of the three from 4 to 27 RoIs. On 2 RoIs oneDNN is as fast or faster. Any other batch of 16 or more (ATen's own
rule): NNPACK on the batch, as PyTorch's dispatcher would run it with oneDNN switched off.
"""
import functools
import math
from typing import Optional

import torch
from torch import nn

from d2_refine.utils.tracing import is_tracing_or_exporting

__all__ = ["conv2d_inference", "nnpack_path", "nnpack_usable", "tiled_conv2d"]

MIN_BATCH = 16  # ATen's ConvParams::use_nnpack rule, and below it NNPACK on a batch is no faster here
MIN_TILED_BATCH = 4  # 128 channels, 4 RoIs: 1.9 ms tiled, 2.6 oneDNN; 2 RoIs: oneDNN as fast or faster
MIN_TILED_CHANNELS = 128  # 64 channels, 27 RoIs: 5.3 ms tiled, 4.4 on the batch, 4.9 on oneDNN
TILE_COLUMNS = 2  # RoIs per row of the tiled image: 1, 2 or 4 are within 10 % of each other, 2 most often fastest


@functools.lru_cache(maxsize=None)
def _nnpack_initialised() -> bool:
    # is_available() initialises NNPACK: without that first call the convolution op fails
    # ("NNPACK SpatialConvolution_updateOutput failed")
    return hasattr(torch, "_nnpack_spatial_convolution") and bool(torch.backends.nnpack.is_available())


def _nnpack_enabled() -> bool:  # the switch of torch.backends.nnpack.flags / set_flags
    return bool(getattr(torch._C, "_get_nnpack_enabled", lambda: True)())


def _tileable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    kh, kw = conv.kernel_size
    return (kh == kw and kh % 2 == 1 and tuple(conv.padding) == (kh // 2, kw // 2)
            and min(conv.in_channels, conv.out_channels) >= MIN_TILED_CHANNELS and x.shape[0] >= MIN_TILED_BATCH)


def nnpack_path(conv: nn.Conv2d, x: torch.Tensor) -> Optional[str]:
    """How ``conv2d_inference(conv, x)`` convolves: "tiled" (NNPACK on the RoIs tiled into one image), "batch"
    (NNPACK on the batch) or None (the module's own call)."""
    # graph captures first: they keep the module's call, and a test of the batch size would guard the shape
    if is_tracing_or_exporting() or torch.compiler.is_compiling():
        return None
    # the parameters, not ``conv.weight``: a parametrized weight (weight norm) would be computed for the test
    params = list(conv.parameters())
    usable = (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
              and all(p.dtype == torch.float32 for p in params)
              and conv.groups == 1 and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
              and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
              and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)))
              and torch.get_num_threads() == 1 and _nnpack_enabled() and _nnpack_initialised())
    if not usable:
        return None
    if _tileable(conv, x):
        return "tiled"
    return "batch" if x.shape[0] >= MIN_BATCH else None


def nnpack_usable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv2d_inference(conv, x)`` runs on NNPACK."""
    return nnpack_path(conv, x) is not None


def _grid(t: torch.Tensor, rows: int, cols: int, h: int, w: int, pad: int) -> torch.Tensor:
    """The (rows, cols, channels, h + pad, w + pad) view of the tiles of the one-image tensor ``t`` (each tile with
    its gap below and to its right)."""
    channels = t.shape[1]
    return t.view(channels, rows, h + pad, cols, w + pad).permute(1, 3, 0, 2, 4)


def _tile_pairs(batch: torch.Tensor, tiles: torch.Tensor, cols: int):
    """The parts of ``batch`` (Tensor[N, C, h, w]) and of ``tiles`` (its (rows, cols, C, h, w) view) that hold the
    same maps: the complete rows of tiles, then the last row's first maps if N is not a multiple of ``cols``."""
    n = batch.shape[0]
    full = n // cols
    yield batch[:full * cols].view(full, cols, *batch.shape[1:]), tiles[:full]
    if full * cols < n:
        yield batch[full * cols:], tiles[full, :n - full * cols]


def tiled_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pad: int,
                 cols: Optional[int] = None) -> torch.Tensor:
    """The stride-1 convolution of ``x`` (Tensor[N, C, H, W]) by ``weight`` (Tensor[C', C, k, k], k = 2 pad + 1),
    zero padding ``pad``, as NNPACK's one-image convolution of the N maps tiled ``cols`` per row, each followed by
    ``pad`` zero rows and columns (``cols``: ``TILE_COLUMNS`` by default). Returns Tensor[N, C', H, W]."""
    n, c, h, w = x.shape
    cols = max(1, min(TILE_COLUMNS if cols is None else cols, n))
    rows = math.ceil(n / cols)
    image = x.new_empty(1, c, rows * (h + pad), cols * (w + pad))
    grid = _grid(image, rows, cols, h, w, pad)
    grid[:, :, :, h:].zero_()  # the gaps: zeros, so that no output reads a neighbour
    grid[:, :, :, :h, w:].zero_()
    tiles = grid[..., :h, :w]
    tiles[rows - 1, n - (rows - 1) * cols:].zero_()  # the last row's tiles after the remaining maps
    for part, tile_part in _tile_pairs(x, tiles, cols):
        tile_part.copy_(part)
    y = torch._nnpack_spatial_convolution(image, weight, bias, [pad, pad])
    out = x.new_empty(n, y.shape[1], h, w)
    for part, tile_part in _tile_pairs(out, _grid(y, rows, cols, h, w, pad)[..., :h, :w], cols):
        part.copy_(tile_part)
    return out


def conv2d_inference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, on NNPACK where ``nnpack_path`` says so (else the module's own call)."""
    path = nnpack_path(conv, x)
    if path is None:
        return conv(x)
    weight = conv.weight.contiguous()
    x = x.contiguous()
    if path == "tiled":
        out = tiled_conv2d(x, weight, conv.bias, conv.padding[0])
        # Winograd's transforms mix each 8x8 input tile, neighbours' pixels included: a NaN or inf in one RoI would
        # spread to the RoIs beside it. One sum tells (NaN and inf carry through it; an overflow of the sum only
        # costs the batched call); the batched call keeps every RoI to itself.
        if bool(torch.isfinite(out.sum())):
            return out
    return torch._nnpack_spatial_convolution(x, weight, conv.bias, list(conv.padding))
