"""Batched Sinkhorn divergence (d2_refine/layers/sinkhorn.py) against POT's pair-by-pair ``ot.sinkhorn``."""
import sys

import numpy as np
import pytest
import torch

from d2_refine.layers import sinkhorn as sk
from helpers import cpu_and_cuda

ot = pytest.importorskip("ot")

# ot.sinkhorn warns that 5 iterations did not converge: that is the point (exactly L iterations)
pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")


def _pot_plan(C: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """One problem with POT's classic solver. ot.sinkhorn updates v first; on C^T (then transposed) it updates
    our u first, which is the order of the batched solver."""
    n, m = C.shape
    Pt = ot.sinkhorn(np.full(m, 1.0 / m), np.full(n, 1.0 / n), C.T.copy(), eps, numItermax=iters, stopThr=0.0)
    return Pt.T


def _pot_divergence(x, y, eps, iters, cost):
    """Divergence and the per-pair plans, built problem by problem with ot.sinkhorn (float64, numpy)."""
    out, plans = [], []
    for b in range(x.shape[0]):
        ws, ps = [], []
        for p, q in ((x[b], y[b]), (x[b], x[b]), (y[b], y[b])):
            C = sk.pairwise_cost(p[None], q[None], cost)[0].detach().cpu().numpy()
            P = _pot_plan(C, eps, iters)
            ws.append(float((P * C).sum()))
            ps.append(P)
        out.append(2 * ws[0] - ws[1] - ws[2])
        plans.append(ps)
    return np.array(out), plans


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("shape", [(4, 256, 256, 1), (3, 7, 7, 5), (2, 6, 9, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_divergence_matches_pairwise_pot(device, cost, shape, seed):
    B, N, M, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64).relu().to(device)
    y = (torch.randn(B, M, D, generator=g, dtype=torch.float64) * 2 + 0.3).to(device)
    for eps, iters in ((1.0, 5), (0.5, 20)):
        ours = sk.sinkhorn_divergence(x, y, eps, iters, cost).cpu().numpy()
        ref, _ = _pot_divergence(x.cpu(), y.cpu(), eps, iters, cost)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_plan_matches_pot_and_marginals(seed):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(5, 8, 6, generator=g, dtype=torch.float64) * 3
    P = sk.sinkhorn_plan(C, 0.7, 50)
    for b in range(5):
        np.testing.assert_allclose(P[b].numpy(), _pot_plan(C[b].numpy(), 0.7, 50), rtol=1e-7, atol=1e-12)
    # converged (50 iterations): both marginals uniform
    torch.testing.assert_close(P.sum(2), torch.full((5, 8), 1 / 8, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(P.sum(1), torch.full((5, 6), 1 / 6, dtype=torch.float64), atol=1e-8, rtol=0)
    # exactly `iters` iterations: a 1-iteration plan differs from a 5-iteration one, but only ever the
    # column marginal is exact after an iteration (v is updated last)
    P1 = sk.sinkhorn_plan(C, 0.7, 1)
    torch.testing.assert_close(P1.sum(1), torch.full((5, 6), 1 / 6, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.allclose(P1, sk.sinkhorn_plan(C, 0.7, 5))


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_gradient_equals_detached_plan_gradient(cost):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 16, 2, generator=g, dtype=torch.float64)
    y0 = torch.randn(3, 16, 2, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(3, generator=g, dtype=torch.float64)

    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    (sk.sinkhorn_divergence(x, y, 1.0, 5, cost) * w).sum().backward()

    # reference: POT plans (numpy, constants) times costs rebuilt with autograd
    _, plans = _pot_divergence(x0, y0, 1.0, 5, cost)
    xr, yr = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    total = 0
    for b in range(3):
        pxy, pxx, pyy = (torch.from_numpy(p) for p in plans[b])
        cxy = sk.pairwise_cost(xr[b:b + 1], yr[b:b + 1], cost)[0]
        cxx = sk.pairwise_cost(xr[b:b + 1], xr[b:b + 1], cost)[0]
        cyy = sk.pairwise_cost(yr[b:b + 1], yr[b:b + 1], cost)[0]
        total = total + w[b] * (2 * (pxy * cxy).sum() - (pxx * cxx).sum() - (pyy * cyy).sum())
    total.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(y.grad, yr.grad, rtol=1e-6, atol=1e-9)
    assert x.grad.abs().sum() > 0


def test_divergence_is_zero_for_the_same_cloud_in_another_order_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, 2, generator=g, dtype=torch.float64)
    shuffled = x[:, torch.randperm(10, generator=g)]  # the same points (uniform weights): W(x, y) = W(x, x)
    torch.testing.assert_close(sk.sinkhorn_divergence(x, shuffled, iters=50), torch.zeros(2, dtype=torch.float64))
    shifts = [sk.sinkhorn_divergence(x, x + t, iters=50) for t in (0.1, 0.5, 1.0)]
    assert all(bool((a > 0).all()) and bool((a < b).all()) for a, b in zip(shifts, shifts[1:]))


def test_empty_batch():
    x = torch.zeros(0, 256, 1, requires_grad=True)
    out = sk.sinkhorn_divergence(x, torch.zeros(0, 256, 1))
    assert out.shape == (0,)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() == 0


def test_float32_finite():
    x = torch.rand(4, 256, 1) * 10
    y = torch.rand(4, 256, 1)
    out = sk.sinkhorn_divergence(x, y, 1.0, 5)
    assert torch.isfinite(out).all() and (out > 0).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="cost must be one of"):
        sk.pairwise_cost(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), "l1")
    with pytest.raises(ValueError, match=r"Tensor\[B, N, D\]"):
        sk.sinkhorn_divergence(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sk.sinkhorn_plan(torch.zeros(1, 2, 2), epsilon=0.0)


def test_missing_pot_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)
    monkeypatch.setitem(sys.modules, "ot.batch", None)
    with pytest.raises(ImportError, match="needs the POT library"):
        sk.sinkhorn_divergence(torch.rand(1, 4, 1), torch.rand(1, 4, 1))
