"""IFR block (torch only): parameter count, explicit unroll, fixed point and implicit gradient of the block."""
import pytest
import torch

from d2_refine.layers.deq import DEQFixedPoint, cached_parametrizations
from d2_refine.projects.ifr import IFRBlock, explicit_unroll
from helpers import cpu_and_cuda, dispatched_ops


def _contractive_block(dtype=torch.float64, channels=8, seed=0):
    torch.manual_seed(seed)
    b = IFRBlock(channels, num_groups=4, weight_norm=True).to(dtype)
    with torch.no_grad():  # halve the weight-norm gains: W = 0.5 W_init
        b.conv1.parametrizations.weight.original0.mul_(0.5)
        b.conv2.parametrizations.weight.original0.mul_(0.5)
    return b


def test_parameter_count():
    b = IFRBlock(256, 4, weight_norm=True)
    n = sum(p.numel() for p in b.parameters())
    print(f"IFR block parameters: {n} (with weight norm)")
    assert n == 2 * 589_824 + 2 * 256 + 3 * 512
    assert sum(p.numel() for p in IFRBlock(256, 4, weight_norm=False).parameters()) == 2 * 589_824 + 3 * 512
    # no duplicated (frozen copy) tensors in the state dict
    assert len(b.state_dict()) == len(list(b.parameters()))


def test_weight_norm_starts_at_plain_init():
    torch.manual_seed(0)
    plain = IFRBlock(16, 4, weight_norm=False)
    torch.manual_seed(0)
    wn = IFRBlock(16, 4, weight_norm=True)
    torch.testing.assert_close(wn.conv1.weight, plain.conv1.weight)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(wn(torch.zeros_like(x), x), plain(torch.zeros_like(x), x))


def test_block_without_autograd_gives_the_values_of_the_block_with_it():
    """Without a graph to keep (no_grad, inference_mode: the solver's evaluations) the block computes in place;
    the values are the same to the bit and its inputs are left as they were."""
    torch.manual_seed(0)
    b = IFRBlock(16, 4).eval()
    z, x = torch.randn(3, 16, 6, 6), torch.randn(3, 16, 6, 6)
    z0, x0 = z.clone(), x.clone()
    with torch.enable_grad():
        ref = b(z, x)
    assert ref.requires_grad
    with torch.no_grad():
        out = b(z, x)
    with torch.inference_mode():
        out_inf = b(z, x)
    assert torch.equal(out, ref.detach()) and torch.equal(out_inf, ref.detach())
    assert torch.equal(z, z0) and torch.equal(x, x0)


def test_explicit_unroll_is_k_calls():
    b = IFRBlock(8, 4)
    x = torch.randn(3, 8, 6, 6)
    z = torch.zeros_like(x)
    for _ in range(4):
        z = b(z, x)
    torch.testing.assert_close(explicit_unroll(b, x, 4), z)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_solvers_agree_on_fixed_point(device):
    b = _contractive_block(torch.float64).to(device)
    # the same input on every device (a device's own generator would draw another one): torchdeq's limited-memory
    # Broyden stalls between 1e-4 and 1e-9 of relative residual on some inputs of this block (5 of 12 seeds tried
    # on the CPU), where Anderson and fixed-point iteration reach 1e-11; this input is one it solves
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for solver in ("broyden", "anderson", "fixed_point"):
        deq = DEQFixedPoint(f_solver=solver, f_max_iter_test=300, f_tol=1e-12, anderson_lam=1e-12).eval()
        with torch.no_grad():
            z = deq(lambda z: b(z, x), torch.zeros_like(x))
        # Broyden's stall level moves with the summation order (cuBLAS, another seed: up to 1.5e-7 on the CPU)
        assert ((b(z, x) - z).norm() / z.norm()).item() < (1e-6 if solver == "broyden" else 1e-7)
        outs.append(z)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-4)


def test_implicit_gradient_of_block_matches_200_step_unroll():
    """Implicit gradient check: float64, C = 8, 6x6, contractive weights, relative error < 1e-5."""
    b = _contractive_block()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn_like(x)
    deq = DEQFixedPoint(f_solver="broyden", b_solver="broyden", f_max_iter=60, b_max_iter=60, f_tol=1e-14,
                        b_tol=1e-14).train()
    with cached_parametrizations(b):
        out = deq(lambda z: b(z, x), torch.zeros_like(x))
    (out * r).sum().backward()
    params = list(b.parameters()) + [x]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.no_grad():
        z = out.detach()
    for _ in range(200):
        z = b(z, x)
    (z * r).sum().backward()
    for a, p in zip(got, params):
        rel = ((a - p.grad).norm() / p.grad.norm()).item()
        assert rel < 1e-5, rel


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="this PyTorch build or CPU has no NNPACK")
@pytest.mark.parametrize("channels, path, atol", [(16, "batch", 1e-5), (128, "tiled", 1e-3)])
def test_test_time_block_on_nnpack_equals_training_block(channels, path, atol, threads):
    from d2_refine.layers.nnpack_conv import nnpack_path

    b = _contractive_block(torch.float32, channels=channels)
    x = torch.randn(27, channels, 14, 14)  # a mask head's RoIs at test time
    z = torch.randn_like(x)
    threads(1)  # NNPACK is picked on one thread only
    with torch.no_grad(), cached_parametrizations(b):
        ref = b.train()(z, x)
        b.eval()
        assert nnpack_path(b.conv1, x) == path  # 128 channels: tiled, Winograd (1e-4 per conv at unit scale)
        assert "aten::_nnpack_spatial_convolution" in dispatched_ops(lambda: b(z, x))
        out = b(z, x)
        b.train()  # training keeps the default backend
        assert "aten::_nnpack_spatial_convolution" not in dispatched_ops(lambda: b(z, x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=atol)
