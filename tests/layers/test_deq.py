"""DEQFixedPoint: solvers reach the fixed point, implicit gradient = unrolled autograd, no NaN, 0 rows."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2_refine.layers.deq import DEQFixedPoint, solve_fixed_point
from helpers import cpu_and_cuda


class ConvMap(nn.Module):
    """f(z, x) = tanh(conv(z) + x): contractive when the conv's operator norm is < 1."""

    def __init__(self, channels=8, scale=0.3, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(channels, channels, 3, 3, generator=g, dtype=dtype)
        # ||conv||_2 <= 9 * max_tap ||w_tap||_2 <= 3 * max_row ||w_row||_2: this makes it <= scale
        self.weight = nn.Parameter(w * scale / (3.0 * w.flatten(1).norm(dim=1).max()))
        self.bias = nn.Parameter(0.1 * torch.randn(channels, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(F.conv2d(z, self.weight, self.bias, padding=1) + x)


def _residual(f, z):
    return ((f(z) - z).flatten(1).norm(dim=1) / f(z).flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_solver_finds_fixed_point_of_contractive_map(solver, device):
    torch.manual_seed(0)
    m = ConvMap().to(device)
    x = torch.randn(5, 8, 6, 6, device=device)
    f = lambda z: m(z, x)  # noqa: E731
    z, info = solve_fixed_point(f, torch.zeros_like(x), solver, max_iter=60, tol=1e-6)
    assert _residual(f, z) < 1e-5
    assert info["nfe"] <= 60
    # all solvers agree with a long plain iteration
    ref = torch.zeros_like(x)
    for _ in range(300):
        ref = f(ref)
    torch.testing.assert_close(z, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
@pytest.mark.parametrize("backward", ["implicit", "neumann"])
def test_implicit_gradient_matches_unrolled_autograd(solver, backward):
    torch.manual_seed(1)
    dt = torch.float64
    m = ConvMap(dtype=dt, seed=1)
    x = torch.randn(3, 8, 6, 6, dtype=dt, requires_grad=True)
    r = torch.randn(3, 8, 6, 6, dtype=dt)
    deq = DEQFixedPoint(f_solver=solver, b_solver="broyden", f_max_iter=100, b_max_iter=100, f_tol=1e-13,
                        b_tol=1e-13, backward=backward).train()
    out = deq(lambda z: m(z, x), torch.zeros_like(x))
    (out * r).sum().backward()
    got = [m.weight.grad.clone(), m.bias.grad.clone(), x.grad.clone()]
    for t in (m.weight, m.bias, x):
        t.grad = None

    # reference: autograd through 200 unrolled steps started at the (detached) fixed point
    with torch.no_grad():
        z = torch.zeros_like(x)
        for _ in range(400):
            z = m(z, x)
    for _ in range(200):
        z = m(z, x)
    (z * r).sum().backward()
    ref = [m.weight.grad, m.bias.grad, x.grad]
    for a, b in zip(got, ref):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-5, rel


def test_jfb_gradient_is_one_step():
    m = ConvMap(dtype=torch.float64)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    deq = DEQFixedPoint(f_solver="anderson", f_max_iter=80, f_tol=1e-12, backward="jfb").train()
    out = deq(lambda z: m(z, x), torch.zeros_like(x))
    out.sum().backward()
    g_jfb = x.grad.clone()
    x.grad = None
    z = out.detach()
    m(z, x).sum().backward()
    torch.testing.assert_close(g_jfb, x.grad)


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_non_contractive_map_stops_cleanly_with_fallback(solver):
    # g(z) = exp(z) - z has no root: no solver can converge; iterates blow up
    x = torch.zeros(4, 3, 2, 2)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        return torch.exp(z) + x

    deq = DEQFixedPoint(f_solver=solver, f_max_iter=15).eval()
    stats = {}
    out = deq(f, torch.zeros_like(x), fallback_fn=lambda: torch.full_like(x, 7.0),
              writer=lambda kind, s: stats.setdefault(kind, s))
    assert torch.isfinite(out).all()
    assert calls["n"] <= 16
    assert stats["forward"].fallbacks == 4
    assert deq.total_fallbacks == 4
    assert (out == 7.0).all()


def test_diverging_rows_are_aborted():
    # f(z) = 10 z + 1: plain iteration multiplies the residual by 10 per step -> aborted after ~7 steps
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        return 10 * z + 1

    z, info = solve_fixed_point(f, torch.zeros(2, 5), "fixed_point", max_iter=50, tol=1e-8)
    assert calls["n"] < 12
    assert info["diverged"].all()
    deq = DEQFixedPoint(f_solver="fixed_point", f_max_iter=50, fallback="none").eval()
    out = deq(f, torch.zeros(2, 5))
    assert torch.isfinite(out).all()


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_non_finite_backward_falls_back_to_jfb():
    w = torch.tensor(2.0, requires_grad=True)
    deq = DEQFixedPoint(f_solver="fixed_point", f_max_iter=40, f_tol=1e-9).train()
    out = deq(lambda z: 0.5 * _NaNGrad.apply(z) + w, torch.zeros(2, 4))
    out.sum().backward()
    assert deq.total_backward_fallbacks == 2
    assert w.grad.item() == pytest.approx(8.0)  # JFB: d(sum(0.5 z* + w))/dw with z* held fixed


def test_empty_rows():
    m = ConvMap()
    x = torch.randn(0, 8, 6, 6, requires_grad=True)
    deq = DEQFixedPoint().train()
    out = deq(lambda z: m(z, x), torch.zeros_like(x))
    assert out.shape == (0, 8, 6, 6)
    out.sum().backward()
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
    assert deq.eval()(lambda z: m(z, x), torch.zeros_like(x)).shape == (0, 8, 6, 6)


def test_writer_reports_forward_and_backward_stats():
    m = ConvMap()
    x = torch.randn(2, 8, 6, 6)
    seen = {}
    deq = DEQFixedPoint(f_max_iter=15, b_max_iter=15).train()
    out = deq(lambda z: m(z, x), torch.zeros_like(x), writer=lambda k, s: seen.__setitem__(k, s))
    assert "forward" in seen and "backward" not in seen
    out.sum().backward()
    assert seen["forward"].nstep <= 15 and seen["backward"].nstep <= 15
    assert 0 <= seen["forward"].rel_residual < 1e-3
    assert seen["backward"].abs_residual < 1e-3


def test_autograd_memory_does_not_grow_with_solver_depth():
    """Bytes saved by autograd for backward are the same at 5 and 30 solver iterations."""
    m = ConvMap()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)

    def saved_bytes(thres):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        deq = DEQFixedPoint(f_solver="anderson", f_max_iter=thres, f_tol=0.0).train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            deq(lambda z: m(z, x), torch.zeros_like(x))
        return total[0]

    assert saved_bytes(5) == saved_bytes(30) > 0


def test_jacobian_loss_is_differentiable():
    m = ConvMap()
    x = torch.randn(2, 8, 6, 6)
    deq = DEQFixedPoint().train()
    out, jac = deq(lambda z: m(z, x), torch.zeros_like(x), return_jac_loss=True)
    assert jac.item() > 0
    (out.sum() + jac).backward()
    assert torch.isfinite(m.weight.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="f_solver"):
        DEQFixedPoint(f_solver="newton")
    with pytest.raises(ValueError, match="backward"):
        DEQFixedPoint(backward="exact")
    with pytest.raises(ValueError, match="f_solver_test"):
        DEQFixedPoint(f_solver_test="newton")


def test_test_time_solver_is_used_in_eval_only(monkeypatch):
    import d2_refine.layers.deq as deq_module

    used = []
    real = deq_module.solve_fixed_point

    def spy(func, z0, solver, *args, **kwargs):
        used.append(solver)
        return real(func, z0, solver, *args, **kwargs)

    monkeypatch.setattr(deq_module, "solve_fixed_point", spy)
    m = ConvMap()
    x = torch.randn(2, 8, 5, 5)
    deq = DEQFixedPoint(f_solver="broyden", f_solver_test="anderson", f_max_iter=30, f_max_iter_test=30,
                        f_tol=1e-8, backward="jfb")
    deq.train()(lambda z: m(z, x), torch.zeros_like(x)).sum().backward()
    with torch.no_grad():
        z_test = deq.eval()(lambda z: m(z, x), torch.zeros_like(x))
    assert used == ["broyden", "anderson"]
    assert _residual(lambda z: m(z, x), z_test) < 1e-5
    assert DEQFixedPoint(f_solver="anderson").f_solver_test == "anderson"  # None: the training solver


class _Record:
    """Records every evaluated iterate and stops the solver after ``n`` evaluations."""

    def __init__(self, f, n):
        self.f, self.n, self.seen = f, n, []

    def __call__(self, z):
        if len(self.seen) == self.n:
            raise StopIteration
        self.seen.append(z.detach().clone())
        return self.f(z)


def _tanh_map(rows, dim, scale, seed, dtype=torch.float64):
    """f(z) = tanh(A z + b) per row, z flattened to ``dim`` (A: ``scale`` x a standard normal matrix per row)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, dim, generator=g, dtype=dtype) * scale
    b = torch.randn(rows, dim, generator=g, dtype=dtype)
    return lambda z: torch.tanh((a @ z.reshape(rows, dim, 1))[..., 0] + b).reshape(z.shape)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_anderson_iterations_match_torchdeq(tau):
    """The incremental Anderson (one residual row and Gram row per step) evaluates the iterates torchdeq's
    anderson_solver evaluates, past the window (m = 3, 12 evaluations), up to float64 rounding."""
    torchdeq = pytest.importorskip("torchdeq")
    from d2_refine.layers.deq import anderson_iterations

    f = _tanh_map(5, 20, 0.25, seed=0)
    z0 = torch.zeros(5, 4, 5, dtype=torch.float64)
    ours, theirs = _Record(f, 12), _Record(f, 12)
    with pytest.raises(StopIteration):
        anderson_iterations(ours, z0, max_iter=20, m=3, lam=1e-4, tau=tau)
    with pytest.raises(StopIteration):
        torchdeq.solver.anderson_solver(theirs, z0, max_iter=20, tol=-1.0, m=3, lam=1e-4, tau=tau,
                                        return_final=True)
    assert len(ours.seen) == len(theirs.seen) == 12
    for i, (x, y) in enumerate(zip(ours.seen, theirs.seen)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=lambda m: f"evaluation {i}: {m}")


def test_anderson_observe_gets_each_evaluation_and_its_residual():
    """``observe`` sees every evaluated pair with its residual ||f(x) - x|| (from the Gram diagonal), and the
    iterates are those of the solve without it, although they are written into one buffer."""
    from d2_refine.layers.deq import anderson_iterations

    f = _tanh_map(4, 12, 0.3, seed=1)
    z0 = torch.zeros(4, 3, 4, dtype=torch.float64)
    plain, observed = _Record(f, 9), _Record(f, 9)
    seen = []

    def observe(x, fx, res):
        seen.append((x.clone(), fx.clone(), res.clone()))

    for rec, obs in ((plain, None), (observed, observe)):
        with pytest.raises(StopIteration):
            anderson_iterations(rec, z0, max_iter=20, m=3, observe=obs)
    assert len(seen) == len(plain.seen) == len(observed.seen) == 9  # the tenth call raised
    for i, (x, fx, res) in enumerate(seen):
        torch.testing.assert_close(x, plain.seen[i], rtol=0, atol=0)
        torch.testing.assert_close(x, observed.seen[i], rtol=0, atol=0)
        torch.testing.assert_close(fx, f(x), rtol=0, atol=0)
        torch.testing.assert_close(res, (fx - x).flatten(1).norm(dim=1), rtol=1e-12, atol=1e-14)


def test_anderson_solve_tracks_the_residuals_of_its_best_iterates():
    """solve_fixed_point's Anderson reads the residuals from Anderson's Gram matrix: the returned residuals are
    those of the returned iterates, computed afresh."""
    from d2_refine.layers.deq import solve_fixed_point

    f = _tanh_map(6, 10, 0.2, seed=2, dtype=torch.float32)
    z, info = solve_fixed_point(f, torch.zeros(6, 2, 5), "anderson", max_iter=7, tol=0.0)
    torch.testing.assert_close(info["abs"], (f(z) - z).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    assert info["nfe"] == 7


def _mixed_rows_problem():
    """Rows that converge at different speeds, one that diverges, one that turns NaN: f(z) = a * z + b per row."""
    a = torch.tensor([0.1, 0.5, 0.8, 3.0, 0.3]).view(5, 1)
    b = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))

    def f(z):
        out = a * z + b
        return torch.cat([out[:4], out[4:] + (z[4:].abs().sum() > 0).float() * float("nan")])
    return f


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
@pytest.mark.parametrize("tol", [1e-2, 1e-5])
def test_device_side_stop_rule_gives_the_early_stopping_result(solver, tol):
    # the device-side stop test freezes the rows once the rule holds and runs the whole budget: the iterate, its
    # residuals, the aborted rows and the count of evaluations until the stop equal those of the early stop
    f = _mixed_rows_problem()
    calls = {"n": 0}

    def counted(z):
        calls["n"] += 1
        return f(z)

    kw = dict(max_iter=80, tol=tol, stop_mode="rel", divergence_factor=100.0)
    z_early, early = solve_fixed_point(counted, torch.zeros(5, 6), solver, **kw)
    early_calls, calls["n"] = calls["n"], 0
    z_dev, dev = solve_fixed_point(counted, torch.zeros(5, 6), solver, device_stop=True, **kw)
    assert calls["n"] == 80 > early_calls  # the whole budget, where the early stop ended before it
    assert int(dev["nfe"]) == early["nfe"] == early_calls
    torch.testing.assert_close(z_dev, z_early, rtol=0, atol=0, equal_nan=True)
    for key in ("abs", "rel", "init_abs", "diverged"):
        torch.testing.assert_close(dev[key], early[key], rtol=0, atol=0, equal_nan=True)
    # the problem has aborted rows: the NaN one always, the expanding one under plain iteration
    assert early["diverged"][4] and (solver != "fixed_point" or early["diverged"][3])


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])  # torchdeq's Broyden: host-made scalars
def test_sync_free_test_time_solve_synchronises_once(solver):
    from d2_refine.utils.host_sync import HostSyncCounter

    m = ConvMap()
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    runs = {}
    for sync_free in (False, True):
        deq = DEQFixedPoint(f_solver=solver, f_max_iter_test=12, f_tol=1e-3, stop_mode="rel",
                            sync_free=sync_free).eval()
        stats = []
        with torch.no_grad(), HostSyncCounter() as counter:
            out = deq(lambda z: m(z, x), torch.zeros_like(x), writer=lambda kind, s: stats.append(s))
        runs[sync_free] = out, stats[0], counter.total
    (out0, stats0, syncs0), (out1, stats1, syncs1) = runs[False], runs[True]
    assert 1 < stats0.nstep < 12  # the stop rule ended the solve early
    assert syncs1 == 1 and syncs0 >= stats0.nstep  # one read of the statistics, against one test per evaluation
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert stats1 == stats0
    # None (the default) chooses by device: per evaluation on the CPU
    assert not DEQFixedPoint()._sync_free(x) and DEQFixedPoint()._sync_free(x.to("meta"))


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_sync_free_training_step_gives_the_same_output_and_gradients(solver):
    """In training the forward and the adjoint solve test their stop rule on the device too (the default on a GPU):
    the same output, parameter and input gradients and statistics bit for bit, and (Anderson) fewer host
    synchronisations (the early-stopping solves read one value per evaluation)."""
    from d2_refine.utils.host_sync import HostSyncCounter

    m = ConvMap(seed=3)
    x0 = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(4))
    r = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    runs = {}
    for sync_free in (False, True):
        x = x0.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        deq = DEQFixedPoint(f_solver=solver, b_solver=solver, f_max_iter=30, b_max_iter=30, f_tol=1e-4,
                            b_tol=1e-6, stop_mode="rel", sync_free=sync_free).train()
        stats = []
        with HostSyncCounter() as counter:
            out = deq(lambda z: m(z, x), torch.zeros_like(x), writer=lambda kind, s: stats.append((kind, s)))
            (out * r).sum().backward()
        runs[sync_free] = out.detach(), [m.weight.grad, m.bias.grad, x.grad], stats, counter.total
    (out0, grads0, stats0, syncs0), (out1, grads1, stats1, syncs1) = runs[False], runs[True]
    assert [k for k, _ in stats0] == ["forward", "backward"] and 1 < stats0[0][1].nstep < 30
    assert 1 < stats0[1][1].nstep < 30  # both solves stopped early: the device-side rule had rows to freeze
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stats1 == stats0
    # torchdeq's Broyden assigns a scalar through boolean masks at every step: the counter counts those (over the
    # whole budget with the device-side rule), though such a fill need not wait for the device
    if solver == "anderson":
        assert syncs1 < syncs0, (syncs1, syncs0)
