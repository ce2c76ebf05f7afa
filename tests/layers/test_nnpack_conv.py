"""d2_refine.layers.nnpack_conv: NNPACK for a large batch at inference on the CPU, oneDNN everywhere else, equal
results within float rounding."""
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from d2_refine.layers.nnpack_conv import MIN_BATCH, conv2d_inference, nnpack_usable
from helpers import dispatched_ops

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(),
                                  reason="this PyTorch build or CPU has no NNPACK")


def _ran_nnpack(fn) -> bool:
    return "aten::_nnpack_spatial_convolution" in dispatched_ops(fn)


def _conv(channels=32, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, 3, padding=1, bias=False, **kw)


@needs_nnpack
@pytest.mark.parametrize("bias", [False, True])
def test_large_batch_without_grad_runs_on_nnpack_and_equals_the_default(bias, threads):
    threads(1)
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1, bias=bias)
    x = torch.randn(MIN_BATCH + 11, 32, 14, 14)
    with torch.no_grad():
        assert nnpack_usable(conv, x)
        assert _ran_nnpack(lambda: conv2d_inference(conv, x))
        out = conv2d_inference(conv, x)
        ref = conv(x)
    assert out.shape == ref.shape == (27, 48, 14, 14)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs_nnpack
def test_weight_normed_conv_and_inference_mode(threads):
    threads(1)
    conv = _conv()
    weight_norm(conv, dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(0.5)  # g != ||v||: the parametrized weight must be used
    x = torch.randn(20, 32, 9, 11)
    with torch.inference_mode():
        assert _ran_nnpack(lambda: conv2d_inference(conv, x))
        out = conv2d_inference(conv, x)
    with torch.no_grad():
        ref = conv(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


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
