"""FPT attention kernels: every memory-efficient path equals the naive full-matrix one."""
import math

import pytest
import torch

from d2_refine.projects.fpt.attention import (
    euclidean_mixture_attention,
    euclidean_qk,
    flatten_hw,
    linear_mixture_attention,
    mixture_attention,
    split_mixtures,
)
from helpers import cpu_and_cuda


def _inputs(n=2, m=2, length=37, s=11, d=8, cv=16, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, m, length, d, generator=g, dtype=dtype).to(device)
    k = torch.randn(n, m, s, d, generator=g, dtype=dtype).to(device)
    v = torch.randn(n, s, cv, generator=g, dtype=dtype).to(device)
    pi = torch.softmax(torch.randn(n, m, generator=g, dtype=dtype), -1).to(device)
    return q, k, v, pi


def _reference(q, k, v, pi, scale):
    """Straight from the definition, loop over mixtures."""
    out = 0
    for m in range(q.shape[1]):
        a = torch.softmax(q[:, m] @ k[:, m].transpose(1, 2) * scale, dim=-1)
        out = out + pi[:, m, None, None] * (a @ v)
    return out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("impl", ["naive", "chunked", "sdpa", "auto"])
@pytest.mark.parametrize("m,d,cv", [(1, 8, 8), (2, 8, 16), (2, 5, 13), (4, 16, 64)])
def test_mixture_attention_matches_reference(device, impl, m, d, cv):
    q, k, v, pi = _inputs(m=m, d=d, cv=cv, device=device)
    out = mixture_attention(q, k, v, pi if m > 1 else None, scale=1 / math.sqrt(d * m), impl=impl, query_chunk=8)
    expected = _reference(q, k, v, pi if m > 1 else torch.ones_like(pi[:, :1]), 1 / math.sqrt(d * m))
    assert out.shape == (2, 37, cv)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
def test_mixture_attention_float32_close_to_naive(impl):
    q, k, v, pi = _inputs(length=300, s=75, d=32, cv=64, dtype=torch.float32)
    out = mixture_attention(q, k, v, pi, scale=0.125, impl=impl, query_chunk=64)
    torch.testing.assert_close(out, mixture_attention(q, k, v, pi, scale=0.125, impl="naive"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "sdpa", "auto"])
def test_mixture_attention_gradients_match_naive(impl):
    q, k, v, pi = _inputs(length=19, s=7)
    for t in (q, k, v, pi):
        t.requires_grad_(True)
    grads = []
    for i in ("naive", impl):
        out = mixture_attention(q, k, v, pi, scale=0.3, impl=i, query_chunk=5)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v, pi)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dropout_paths_keep_expectation_and_drop():
    """With dropout the chunked path (CPU 'auto') draws one mask per A_m like naive: same mean, not the same."""
    q, k, v, pi = _inputs(n=1, length=4, s=6, cv=4)
    clean = mixture_attention(q, k, v, pi, scale=0.5, impl="naive")
    torch.manual_seed(0)
    runs = torch.stack([mixture_attention(q, k, v, pi, scale=0.5, dropout_p=0.3, impl="auto", query_chunk=3)
                        for _ in range(3000)])
    assert not torch.allclose(runs[0], clean)
    torch.testing.assert_close(runs.mean(0), clean, rtol=0, atol=0.08)


def test_euclidean_qk_reproduces_negative_squared_distance_up_to_row_constant():
    q, k, _, _ = _inputs(m=1, length=9, s=6)
    q_hat, k_hat = euclidean_qk(q, k)
    logits = q_hat @ k_hat.transpose(-1, -2)
    neg_dist = -torch.cdist(q, k).pow(2)
    diff = logits - neg_dist  # equals |q_i|^2, constant along keys
    torch.testing.assert_close(diff, q.pow(2).sum(-1, keepdim=True).expand_as(diff))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("impl", ["chunked", "sdpa", "auto"])
@pytest.mark.parametrize("m", [1, 2])
def test_euclidean_attention_matches_naive(device, impl, m):
    q, k, v, pi = _inputs(m=m, d=7, cv=14, device=device)
    pi = pi if m > 1 else None
    expected = euclidean_mixture_attention(q, k, v, pi, temperature=0.4, impl="naive")
    out = euclidean_mixture_attention(q, k, v, pi, temperature=0.4, impl=impl, query_chunk=10)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # and the naive path is the definition
    w = torch.softmax(-0.4 * torch.cdist(q[:, 0], k[:, 0]).pow(2), -1)
    if m == 1:
        torch.testing.assert_close(expected, w @ v)


@pytest.mark.parametrize("m", [1, 2])
def test_linear_attention_matches_naive(m):
    q, k, v, pi = _inputs(m=m)
    pi = pi if m > 1 else None
    expected = linear_mixture_attention(q, k, v, pi, impl="naive")
    torch.testing.assert_close(linear_mixture_attention(q, k, v, pi), expected)
    if m == 1:
        torch.testing.assert_close(expected, (q[:, 0] @ k[:, 0].transpose(1, 2) / k.shape[2]) @ v)


def test_empty_queries_give_empty_output():
    q, k, v, pi = _inputs(length=0)
    for impl in ("naive", "chunked", "sdpa"):
        assert mixture_attention(q, k, v, pi, scale=1.0, impl=impl).shape == (2, 0, 16)


def test_bad_arguments_raise_clear_errors():
    q, k, v, pi = _inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        mixture_attention(q, k, v, pi, scale=1.0, impl="flash")
    with pytest.raises(ValueError, match="pi"):
        mixture_attention(q, k, v, None, scale=1.0)
    with pytest.raises(ValueError, match="do not match"):
        mixture_attention(q, k[:, :, :, :3], v, pi, scale=1.0)


def _peak_bytes(fn):
    """Peak of the bytes held by torch's CPU allocator during fn() (running sum of the raw allocation records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    running = peak = 0
    for e in records:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("kind", ["softmax", "euclidean"])
def test_sdpa_never_materialises_the_attention_matrix(kind):
    """Eval-mode ST-sized attention: the allocator peak stays far below one L x S fp32 matrix; naive exceeds it."""
    q, k, v, pi = _inputs(n=1, length=4096, s=2048, d=32, cv=64, dtype=torch.float32)
    if kind == "softmax":
        def run(impl):
            return lambda: mixture_attention(q, k, v, pi, scale=0.1, impl=impl)
    else:
        def run(impl):
            return lambda: euclidean_mixture_attention(q[:, :1], k[:, :1], v, None, temperature=0.1, impl=impl)
    matrix = 4096 * 2048 * 4
    with torch.no_grad():
        assert _peak_bytes(run("naive")) >= matrix  # the measurement sees a materialised matrix
        peak = _peak_bytes(run("sdpa"))
    assert peak < matrix / 2, f"peak {peak} bytes (one attention matrix: {matrix})"


def test_full_value_width_heads_match_reference(monkeypatch):
    """The CUDA layout of the "sdpa" path (M heads with the full value width, q k^T once per mixture; q and k
    zero-padded to a multiple of 8), forced on CPU."""
    from d2_refine.projects.fpt import attention

    monkeypatch.setitem(attention.SPLIT_VALUES, "cpu", False)
    for m, d, cv in [(1, 8, 8), (2, 5, 13), (4, 16, 64)]:
        q, k, v, pi = _inputs(m=m, d=d, cv=cv)
        out = mixture_attention(q, k, v, pi if m > 1 else None, scale=0.3, impl="sdpa")
        expected = _reference(q, k, v, pi if m > 1 else torch.ones_like(pi[:, :1]), 0.3)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def _far_from_origin(dtype, seed=0):
    """Queries and keys centred away from the origin (as after a conv with a bias): |k|^2 >> the logit spread."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 300, 64, generator=g, dtype=torch.float64) + 4
    k = torch.randn(1, 1, 80, 64, generator=g, dtype=torch.float64) + 4
    v = torch.randn(1, 80, 32, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_euclidean_attention_half_precision_close_to_float64(device, dtype):
    """In half precision q and k are centred before the dot-product form: the error is that of the half
    arithmetic, not of rounding the large -|k|^2 term (~20 % of the output's scale without the centring)."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 SDPA is a CUDA path")
    q, k, v = _far_from_origin(dtype)
    tau = 1 / math.sqrt(64)
    expected = euclidean_mixture_attention(q.double(), k.double(), v.double(), temperature=tau, impl="naive")
    out = euclidean_mixture_attention(q.to(device), k.to(device), v.to(device), temperature=tau, impl="sdpa")
    assert out.dtype == dtype
    err = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert err < 0.03, f"max error {err:.3f} of the output's scale"


def test_euclidean_qk_float32_unchanged():
    """float32 / float64 inputs are not centred (the model's float32 math is left as it was)."""
    q, k, _ = _far_from_origin(torch.float32)
    q_hat, k_hat = euclidean_qk(q, k)
    torch.testing.assert_close(q_hat[..., :-1], q, rtol=0, atol=0)
    torch.testing.assert_close(k_hat[..., :-1], 2 * k, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("impl", ["sdpa", "naive"])
def test_mixing_keeps_half_precision_with_a_float32_pi(device, impl):
    """Under autocast pi comes from a float32 softmax: the mixture of half-precision attention outputs stays in
    their dtype (a float32 copy of (N, M, L, Cv) at P2 otherwise), close to the float64 result."""
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    q, k, v, pi = _inputs(m=2, d=8, cv=16)
    out = mixture_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                            pi.to(device, torch.float32), scale=0.3, impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), _reference(q, k, v, pi, 0.3), atol=3e-2, rtol=3e-2)


def _model_views(n=1, m=2, h=12, w=10, c=32, cv=48, s_hw=(6, 5), seed=0):
    """q, k, v as FPT's transformers make them: views of (N, C, H, W) maps (flatten_hw, split_mixtures), whose
    last dimension does not have stride 1."""
    g = torch.Generator().manual_seed(seed)
    q = split_mixtures(flatten_hw(torch.randn(n, c, h, w, generator=g)), m)
    k = split_mixtures(flatten_hw(torch.randn(n, c, *s_hw, generator=g)), m)
    v = flatten_hw(torch.randn(n, cv, *s_hw, generator=g))
    pi = torch.softmax(torch.randn(n, m, generator=g), -1)
    return q, k, v, pi


@pytest.mark.parametrize("split_values", [False, True], ids=["cuda_layout", "cpu_layout"])
@pytest.mark.parametrize("kind", ["softmax", "euclidean"])
def test_sdpa_gets_inputs_its_fused_kernels_take(monkeypatch, split_values, kind):
    """Every fused SDPA kernel (flash, memory-efficient, cuDNN; CPU flash) needs a last dimension of stride 1;
    otherwise SDPA silently runs its math kernel, the full (N, M, L, S) matrix. Both layouts of the "sdpa" path,
    on the views the model passes. With the CPU layout (equal widths) PyTorch's own choice is checked too."""
    from d2_refine.projects.fpt import attention

    monkeypatch.setitem(attention.SPLIT_VALUES, "cpu", split_values)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q, k, v, int(torch._fused_sdp_choice(q, k, v, *args, **kwargs))))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v, pi = _model_views()
    with torch.no_grad():
        if kind == "softmax":
            out = mixture_attention(q, k, v, pi, scale=0.2, impl="sdpa")
            expected = mixture_attention(q, k, v, pi, scale=0.2, impl="naive")
        else:
            out = euclidean_mixture_attention(q, k, v, pi, temperature=0.05, impl="sdpa")
            expected = euclidean_mixture_attention(q, k, v, pi, temperature=0.05, impl="naive")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert calls
    for cq, ck, cv_, choice in calls:
        assert (cq.stride(-1), ck.stride(-1), cv_.stride(-1)) == (1, 1, 1)
        if split_values:
            assert choice != 0, "PyTorch chose its math kernel"  # torch.nn.attention.SDPBackend.MATH


def _half_or_skip(fn):
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as e:  # float16 kernels on the CPU of an older torch
        if "Half" in str(e):
            pytest.skip(f"this torch has no such float16 kernel on the CPU: {e}")
        raise


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("autocast", [False, True], ids=["float16_inputs", "autocast"])
def test_linear_attention_float16_sum_does_not_overflow(device, autocast):
    """k^T v sums S products before the division by S: 16800 products of mean 4 exceed float16's 65504 (inf
    without the scaling). The result is a mean and fits; under autocast float32 inputs meet the same matmul."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 50, 8, generator=g, dtype=torch.float64) + 2
    k = torch.randn(1, 2, 16800, 8, generator=g, dtype=torch.float64) + 2
    v = torch.randn(1, 16800, 8, generator=g, dtype=torch.float64) + 2
    pi = torch.softmax(torch.randn(1, 2, generator=g, dtype=torch.float64), -1)
    expected = linear_mixture_attention(q, k, v, pi)
    if autocast:
        def run():
            with torch.autocast(device, dtype=torch.float16):
                return linear_mixture_attention(*(t.to(device, torch.float32) for t in (q, k, v, pi)))
    else:
        def run():
            return linear_mixture_attention(*(t.to(device, torch.float16) for t in (q, k, v, pi)))
    out = _half_or_skip(run)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert err < 5e-3, f"max error {err:.4f} of the output's scale"


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_euclidean_attention_float16_keys_beyond_its_range(device):
    """Keys spread so far (RMS 40 per channel, 64 channels) that |k - mu|^2 ~ 1e5 exceeds float16's 65504 even
    after the centring: the -|k|^2 column is scaled by a power of two instead of overflowing (it was -inf, the
    keys dropped, the output wrong by more than its own scale)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 300, 64, generator=g, dtype=torch.float64) * 40 + 3
    k = torch.randn(1, 2, 80, 64, generator=g, dtype=torch.float64) * 40 + 3
    v = torch.randn(1, 80, 32, generator=g, dtype=torch.float64)
    pi = torch.softmax(torch.randn(1, 2, generator=g, dtype=torch.float64), -1)
    tau = 1 / (64 * 40)
    expected = euclidean_mixture_attention(q, k, v, pi, temperature=tau, impl="naive")
    _, k_hat = euclidean_qk(q.to(torch.float16), k.to(torch.float16))
    assert torch.isfinite(k_hat).all()
    out = _half_or_skip(lambda: euclidean_mixture_attention(*(t.to(device, torch.float16) for t in (q, k, v, pi)),
                                                            temperature=tau, impl="sdpa"))
    err = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert err < 0.03, f"max error {err:.3f} of the output's scale"
