"""d2_refine.layers.nnpack_conv: NNPACK at inference on one CPU thread, the RoIs tiled into one image (Winograd,
within 1e-4 of float64 at unit scale) or batched (within float rounding), oneDNN everywhere else."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from d2_refine.layers.nnpack_conv import (
    MIN_BATCH,
    MIN_TILED_BATCH,
    MIN_TILED_CHANNELS,
    conv2d_inference,
    nnpack_path,
    nnpack_usable,
    tiled_conv2d,
)
from helpers import dispatched_ops

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(),
                                  reason="this PyTorch build or CPU has no NNPACK")


def _ran_nnpack(fn) -> bool:
    return "aten::_nnpack_spatial_convolution" in dispatched_ops(fn)


def _conv(channels=32, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, 3, padding=1, bias=False, **kw)


def _float64_conv(x, weight, bias, pad):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=pad)


# Winograd F(6x6, 3x3) in float32: about 1e-4 from float64 at unit scale (27 RoIs, 128 channels: 5e-5 to 9e-5); a
# RoI that read its neighbour through the gap would be off by the neighbour's scale, ~1
WINOGRAD_ATOL = 5e-4


@needs_nnpack
@pytest.mark.parametrize("n, channels, size, kernel, cols", [
    (27, 128, (14, 14), 3, None),  # a mask head's RoIs, the default layout
    (5, 64, (9, 11), 3, 2),  # non-square maps, the last row of tiles half empty
    (7, 64, (6, 6), 5, 3),  # a 5x5 kernel: gaps of 2
    (2, 96, (14, 14), 3, 4),  # more columns than maps
    (30, 64, (3, 3), 3, 5),
])
def test_tiled_convolution_equals_float64_within_winograd_error(n, channels, size, kernel, cols):
    torch.backends.nnpack.is_available()  # initialises NNPACK
    torch.manual_seed(0)
    x = torch.randn(n, channels, *size)
    weight = torch.randn(80, channels, kernel, kernel) / (kernel * channels ** 0.5)  # unit-scale outputs
    bias = torch.randn(80)
    out = tiled_conv2d(x, weight, bias, kernel // 2, cols)
    ref = _float64_conv(x, weight, bias, kernel // 2)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=WINOGRAD_ATOL)


@needs_nnpack
def test_roi_batch_runs_tiled_on_one_thread(threads):
    threads(1)
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False)
    x = torch.randn(27, 128, 14, 14)
    with torch.no_grad():
        assert nnpack_path(conv, x) == "tiled"
        assert _ran_nnpack(lambda: conv2d_inference(conv, x))
        out = conv2d_inference(conv, x)
        assert nnpack_path(conv, x[:MIN_TILED_BATCH - 1]) is None  # a few RoIs: oneDNN is as fast
        assert nnpack_path(conv, x[:MIN_TILED_BATCH]) == "tiled"
        assert nnpack_path(_conv(MIN_TILED_CHANNELS // 2), x[:, :MIN_TILED_CHANNELS // 2]) == "batch"
    torch.testing.assert_close(out.double(), _float64_conv(x, conv.weight, None, 1), rtol=0, atol=WINOGRAD_ATOL)


@needs_nnpack
@pytest.mark.parametrize("where", ["edge", "inf", "interior"])
def test_tiled_convolution_keeps_a_non_finite_roi_to_itself(where, threads):
    """Winograd's transforms read each tile's neighbours across the gap, so a NaN or inf at a RoI's edge would reach
    the RoI beside it: the batched call takes over, and exactly the rows of the module's call are non-finite."""
    threads(1)
    conv = nn.Conv2d(MIN_TILED_CHANNELS, MIN_TILED_CHANNELS, 3, padding=1)
    x = torch.randn(6, MIN_TILED_CHANNELS, 14, 14)
    pixel = {"edge": (2, 5, 7, 13, float("nan")), "inf": (2, 5, 13, 0, float("inf")),
             "interior": (2, 5, 7, 7, float("nan"))}[where]
    x[pixel[:4]] = pixel[4]
    with torch.no_grad():
        assert nnpack_path(conv, x) == "tiled"
        out, ref = conv2d_inference(conv, x), conv(x)
    bad = ~torch.isfinite(out).flatten(1).all(1)
    assert bad.tolist() == (~torch.isfinite(ref).flatten(1).all(1)).tolist() == [False, False, True, False, False,
                                                                                   False]
    torch.testing.assert_close(out[~bad], ref[~bad], rtol=1e-4, atol=WINOGRAD_ATOL)


@needs_nnpack
@pytest.mark.parametrize("bias", [False, True])
def test_large_batch_without_grad_runs_on_nnpack_and_equals_the_default(bias, threads):
    threads(1)
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1, bias=bias)  # too few channels to tile: NNPACK on the batch
    x = torch.randn(MIN_BATCH + 11, 32, 14, 14)
    with torch.no_grad():
        assert nnpack_path(conv, x) == "batch"
        assert _ran_nnpack(lambda: conv2d_inference(conv, x))
        out = conv2d_inference(conv, x)
        ref = conv(x)
    assert out.shape == ref.shape == (27, 48, 14, 14)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs_nnpack
@pytest.mark.parametrize("channels, path", [(32, "batch"), (MIN_TILED_CHANNELS, "tiled")])
def test_weight_normed_conv_and_inference_mode(channels, path, threads):
    threads(1)
    conv = _conv(channels)
    weight_norm(conv, dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(0.5)  # g != ||v||: the parametrized weight must be used
    x = torch.randn(20, channels, 9, 11)
    with torch.inference_mode():
        assert nnpack_path(conv, x) == path
        assert _ran_nnpack(lambda: conv2d_inference(conv, x))
        out = conv2d_inference(conv, x)
    with torch.no_grad():
        ref = conv(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 if path == "batch" else WINOGRAD_ATOL)


def test_everything_else_keeps_the_module_call(threads):
    threads(1)
    conv = _conv()
    x = torch.randn(MIN_BATCH, 32, 8, 8)
    # a gradient wanted (the weight requires it under grad mode), or the bias's alone
    assert not nnpack_usable(conv, x)
    biased = nn.Conv2d(32, 32, 3, padding=1)
    biased.weight.requires_grad_(False)
    assert not nnpack_usable(biased, x)
    with torch.no_grad():
        assert not nnpack_usable(conv, x[:MIN_BATCH - 1])  # small batch: oneDNN is faster
        assert not nnpack_usable(conv, x.double())
        assert not nnpack_usable(_conv().double(), x)  # the module's call says what a dtype mismatch means
        assert not nnpack_usable(_conv(stride=2), x)
        assert not nnpack_usable(_conv(dilation=2), x)
        assert not nnpack_usable(_conv(padding_mode="reflect"), x)
        threads(2)  # NNPACK's pool would compete with torch's OpenMP threads
        assert not nnpack_usable(conv, x)
        threads(1)
        with torch.backends.nnpack.flags(enabled=False):  # the user's switch
            assert not nnpack_usable(conv, x)
            assert not _ran_nnpack(lambda: conv2d_inference(conv, x))
        for small in (x[:3], x[:0]):  # an empty batch too
            out = conv2d_inference(conv, small)
            torch.testing.assert_close(out, conv(small))
    out = conv2d_inference(conv, x)
    assert out.requires_grad  # the module's call, differentiable
    out.sum().backward()
    assert conv.weight.grad is not None
