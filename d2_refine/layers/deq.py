"""A reusable deep-equilibrium (DEQ) fixed-point layer on top of torchdeq.

``DEQFixedPoint`` solves ``z* = f(z*)`` (``f`` closes over its injected input ``x``) batched over the first
dimension, with torchdeq's Broyden / Anderson / fixed-point solvers (lowest-residual iterate), and
differentiates the result implicitly: the training output is ``f(z*)`` evaluated once with autograd, and a
gradient hook on it replaces the incoming gradient ``v`` by the solution ``g*`` of the adjoint fixed point
``g = g J_f(z*) + v``, solved by a torchdeq solver with vector-Jacobian products w.r.t. ``z`` only. Autograd
therefore keeps one graph of ``f`` whatever the number of solver iterations.

What this module adds around torchdeq (torchdeq 0.1.0 has none of it):

* per-row divergence abort (residual above ``divergence_factor`` x the initial one) and a no-NaN rule: a row
  whose best iterate is non-finite, or whose best residual exceeds its initial residual, is replaced by a
  fallback (e.g. an explicit K-step unroll), counted and warned about (rate limited);
* a non-finite adjoint solution falls back to ``g* = v`` (the Jacobian-free gradient), counted;
* its own gradient hook (torchdeq's ``hook_ift`` has no fallback and no per-call statistics), plus the cheaper
  "jfb" and "neumann" backward modes;
* statistics of the forward and backward solves (steps, absolute and relative residual, fallbacks) handed to
  a ``writer`` callable, so a caller can log them (e.g. to detectron2's EventStorage) without this module
  importing detectron2;
* 0 rows: no solve, an empty result that still takes part in autograd;
* the solve runs in the dtype of its iterate (IFR's mask head calls it in float32 with autocast disabled);
* under ``torch.jit.trace`` or ``torch.export`` the forward solve has no branch on tensor values: it runs all
  its iterations and computes the fallback for every row, selecting it per row (docs/EXPORT.md);
* on a GPU the stop rule is tested on the device (``sync_free``), in training (forward and adjoint solves) and at
  test time: the solve spends its whole budget with the rows frozen once the rule holds (the same result) and reads
  its statistics once, instead of making the host wait for the GPU after every evaluation.

Residuals are per row: ``||f(z_i) - z_i||_2`` ("abs") or that divided by ``||f(z_i)||_2`` ("rel"); a solve
stops when every row is below ``tol * sqrt(D)`` ("abs", D = elements per row) or ``tol`` ("rel").
"""
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..utils.tracing import is_tracing_or_exporting

__all__ = ["DEQFixedPoint", "DEQStats", "solve_fixed_point", "anderson_iterations", "jacobian_loss",
           "cached_parametrizations", "require_torchdeq"]

logger = logging.getLogger(__name__)

TORCHDEQ_INSTALL_HINT = 'pip install "d2_refine[methods]"'


def require_torchdeq(what: str = "the DEQ fixed-point layer"):
    """Return the ``torchdeq`` package (with its ``solver`` and ``loss`` modules loaded), or raise an ImportError
    whose one-line message says how to install it. torchdeq is imported here, on first use, so that this module
    (and every method that does not solve a fixed point) imports without it."""
    try:
        import torchdeq.loss
        import torchdeq.solver
    except ImportError:
        raise ImportError(f"{what} needs torchdeq (>= 0.1.0), which is not installed: "
                          f"{TORCHDEQ_INSTALL_HINT}") from None
    return torchdeq

SOLVERS = ("broyden", "anderson", "fixed_point")
BACKWARDS = ("implicit", "jfb", "neumann")
FALLBACKS = ("explicit", "none")


@dataclass
class DEQStats:
    """Statistics of one solve (forward or backward), all plain Python numbers.

    nstep: function evaluations spent by the solver; abs_residual: ``||g||_2`` over the whole batch at the
    returned iterates; rel_residual: the same divided by ``||f||_2`` over the batch; fallbacks: rows replaced
    by the fallback; diverged: rows aborted for divergence; num_rows: batch size.
    """

    nstep: int = 0
    abs_residual: float = 0.0
    rel_residual: float = 0.0
    fallbacks: int = 0
    diverged: int = 0
    num_rows: int = 0
    extra: Dict[str, float] = field(default_factory=dict)


class _RateLimitedWarning:
    def __init__(self, period_s: float = 60.0):
        self.period_s = period_s
        self._last = -math.inf

    def __call__(self, msg: str):
        now = time.monotonic()
        if now - self._last >= self.period_s:
            self._last = now
            logger.warning(msg)


_warn = _RateLimitedWarning()


class _Stop(Exception):
    """Raised by ``_GuardedFunction`` to end a torchdeq solver loop early."""


class _GuardedFunction:
    """Wraps ``f`` for a torchdeq solver and does the book-keeping torchdeq 0.1.0 gets wrong or lacks.

    For every evaluated pair (z, f(z)) it computes the per-row residual and keeps, per row, the evaluated
    iterate z with the lowest residual (``torch.where``, so a non-finite iterate is never picked: torchdeq's
    own tracking mixes rows by multiplying with a 0/1 mask, and 0 * NaN = NaN). A row is aborted (``dead``)
    when its residual is non-finite or exceeds ``factor`` x its initial residual. It raises ``_Stop`` once
    every row is converged (below ``tol``) or aborted, which also keeps one NaN row from defeating torchdeq's
    batch-max stop test.

    With ``device_stop`` that test never reads a value on the host: the solve runs all ``max_evals`` evaluations,
    and once the stop rule holds (a flag on the device) the kept iterates, residuals and aborts no longer change,
    so the result equals the early-stopping one; ``evals`` (a device tensor) counts the evaluations until then.
    """

    def __init__(self, func: Callable, tol: float, stop_mode: str, divergence_factor: float, max_evals: int,
                 device_stop: bool = False):
        self.func, self.tol, self.stop_mode, self.factor = func, tol, stop_mode, divergence_factor
        self.max_evals, self.device_stop = max_evals, device_stop
        self.nfe = 0
        self.best_z = self.best_abs = self.best_rel = self.init_abs = self.dead = None
        self.stopped = self.evals = None

    def __call__(self, z):
        fz = self.func(z)
        self.observe(z, fz)
        return fz

    def observe(self, z, fz, res=None):
        """Track the evaluated pair (z, fz = f(z)), ``res`` its per-row residual ||fz - z|| when the caller has it;
        raises ``_Stop`` when the solve is over."""
        self.nfe += 1
        if res is None:
            res = (fz - z).flatten(1).norm(dim=1)
        rel = res / (fz.flatten(1).norm(dim=1) + 1e-9)
        finite = torch.isfinite(res) & torch.isfinite(rel)
        inf = torch.full_like(res, math.inf)
        if self.best_z is None:
            self.best_z = z.detach().clone()
            self.best_abs, self.best_rel = torch.where(finite, res, inf), torch.where(finite, rel, inf)
            self.init_abs = self.best_abs.clone()
            self.dead = ~finite
            if self.device_stop:
                self.stopped = torch.zeros((), dtype=torch.bool, device=z.device)
                self.evals = torch.ones((), dtype=torch.int64, device=z.device)
        else:
            crit, best = (res, self.best_abs) if self.stop_mode == "abs" else (rel, self.best_rel)
            better = finite & ~self.dead & (crit < best)
            if self.device_stop:
                better = better & ~self.stopped
            keep = better.view(-1, *([1] * (z.dim() - 1)))
            if is_tracing_or_exporting():
                self.best_z = torch.where(keep, z.detach(), self.best_z)
            else:  # in place: the solve allocates no new iterate per evaluation
                torch.where(keep, z.detach(), self.best_z, out=self.best_z)
            self.best_abs = torch.where(better, res, self.best_abs)
            self.best_rel = torch.where(better, rel, self.best_rel)
            dead = self.dead | ~finite
            if self.factor > 0:
                dead = dead | (res > self.factor * self.init_abs)
            if self.device_stop:
                self.dead = torch.where(self.stopped, self.dead, dead)
                self.evals = self.evals + (~self.stopped).long()
            else:
                self.dead = dead
        best = self.best_abs if self.stop_mode == "abs" else self.best_rel
        if self.nfe >= self.max_evals:
            raise _Stop
        if self.device_stop:
            self.stopped = self.stopped | ((best < self.tol) | self.dead).all()
        # no early stop when traced or exported: the recorded solve runs all max_evals evaluations
        elif not is_tracing_or_exporting() and bool(((best < self.tol) | self.dead).all()):
            raise _Stop


def anderson_iterations(func: Callable, x0: torch.Tensor, max_iter: int, m: int = 6, lam: float = 1e-4,
                        tau: float = 1.0, observe: Optional[Callable] = None):
    """Anderson acceleration with torchdeq's update (``torchdeq.solver.anderson_solver``: the same iterates, up to
    rounding), evaluating ``func`` until it raises (the caller's stop rule; no tracking here).

    torchdeq recomputes the residual history G = F - X and its Gram matrix G G^T over the whole window at every
    step (O(m^2 D) per step); here each step adds one residual row (F - X of the new iterate) and one row and
    column of the Gram matrix (O(m D)), the history buffers are never zero-filled, and the iterates X are not kept:
    the mixing term sum_j alpha_j X_j (tau != 1) is sum_j alpha_j (F_j - G_j). The history is then two buffers of
    m x D per row instead of three (on the CPU the solve's memory traffic competes with f's for the cache).

    ``func`` and ``observe`` must not keep their inputs: the iterates are written into one buffer, each over the
    previous one (on the CPU a new 27 x 128 x 14 x 14 tensor per step is memory the allocator may hand back to the
    OS and fault in again).

    ``observe(x, fx, res)``, if given, is called after every evaluation with its input, its value (both shaped as
    ``x0``) and the per-row residual ||fx - x||_2, the square root of the new Gram diagonal entry: a caller that
    tracks the residuals (``solve_fixed_point``'s stop rule) then needs no pass of its own over fx - x. It may
    raise to end the solve, as ``func`` may.
    """
    bsz = x0.shape[0]
    flat = x0.reshape(bsz, -1)
    dim = flat.shape[1]
    f = lambda x: func(x.view_as(x0)).reshape(bsz, dim)  # noqa: E731
    F = flat.new_empty(bsz, m, dim)
    G = flat.new_empty(bsz, m, dim)
    gram = flat.new_zeros(bsz, m, m)
    H = flat.new_zeros(bsz, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = flat.new_zeros(bsz, m + 1, 1)
    y[:, 0] = 1
    z_next = flat.new_empty(bsz, dim)

    def evaluate(slot, count, x):
        # F[slot] = f(x); G[slot] = F[slot] - x and its Gram row/column against the slots 0 .. count - 1
        F[:, slot] = f(x)
        torch.sub(F[:, slot], x, out=G[:, slot])
        # (1 x D) @ (D x count) per row: a GEMV over the history's rows read in place, ~10x faster on the CPU than
        # (count x D) @ (D x 1), which PyTorch's bmm runs far from memory speed (27 RoIs of 128 x 14 x 14, count 6,
        # one thread: 0.5 ms against 4.8)
        row = torch.bmm(G[:, slot, None, :], G[:, :count].transpose(1, 2))[:, 0]  # (bsz, count)
        gram[:, slot, :count] = row
        gram[:, :count, slot] = row
        if observe is not None:
            observe(x.view_as(x0), F[:, slot].view_as(x0), row[:, slot].sqrt())

    evaluate(0, 1, flat)
    evaluate(1, 2, F[:, 0])
    for k in range(2, max_iter):
        n = min(k, m)
        H[:, 1:n + 1, 1:n + 1] = gram[:, :n, :n] + lam * torch.eye(n, dtype=flat.dtype, device=flat.device)[None]
        # solve_ex: linalg.solve checks its result on the host (a device synchronisation per step on CUDA); a
        # singular system gives a non-finite row here, which the solve's guard marks aborted
        alpha = torch.linalg.solve_ex(H[:, :n + 1, :n + 1], y[:, :n + 1]).result[:, 1:n + 1, 0]
        slot = k % m
        # the next iterate, written over the previous one: f has read it and the tracking has copied what it keeps
        torch.bmm(alpha[:, None], F[:, :n], out=z_next[:, None])
        if tau != 1.0:  # tau * sum alpha F + (1 - tau) * sum alpha X, with X = F - G
            z_next.sub_(torch.bmm(alpha[:, None], G[:, :n])[:, 0], alpha=1 - tau)
        evaluate(slot, min(k + 1, m), z_next)


def solve_fixed_point(func: Callable, z0: torch.Tensor, solver: str = "broyden", max_iter: int = 15,
                      tol: float = 1e-5, stop_mode: str = "abs", broyden_memory: int = 27, anderson_m: int = 6,
                      anderson_lam: float = 1e-4, anderson_tau: float = 1.0, divergence_factor: float = 1e6,
                      device_stop: bool = False):
    """Solve ``z = func(z)`` from ``z0`` with a torchdeq solver (no autograd).

    Args:
        func (callable): maps Tensor[N, ...] to Tensor[N, ...] (rows independent).
        z0 (Tensor[N, ...]): initial iterate.
        solver (str): "broyden", "anderson" or "fixed_point".
        max_iter (int): at most this many evaluations of ``func`` (the first one is at ``z0``).
        tol (float): stop when every row's residual < tol*sqrt(D) ("abs") or < tol ("rel").
        broyden_memory (int): Broyden keeps at most min(max_iter, broyden_memory) low-rank pairs.
        divergence_factor (float): a row whose residual exceeds this times its initial residual is aborted
            (<= 0 disables).
        device_stop (bool): test the stop rule on the device, without a host synchronisation per evaluation:
            all ``max_iter`` evaluations run, and the rows are frozen once the rule holds (the same result).

    Returns:
        (z_best (Tensor[N, ...]), info (dict)): per row the evaluated iterate with the lowest residual, and
        "abs", "rel" (Tensor[N], its residuals; inf if none was finite), "init_abs" (Tensor[N], residual at
        ``z0``), "nfe" (evaluations until the stop rule held: an int, a 0-dim device tensor with
        ``device_stop``), "diverged" (Tensor[N] bool, rows aborted).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    dim = z0[0].numel() if z0.shape[0] > 0 else 1
    bound = tol * math.sqrt(dim) if stop_mode == "abs" else tol
    solvers = require_torchdeq().solver
    guarded = _GuardedFunction(func, bound, stop_mode, divergence_factor, max_iter, device_stop=device_stop)
    with torch.no_grad():
        try:
            if solver == "broyden":
                # the guard stops every solver after ``max_iter`` evaluations (torchdeq's Broyden would spend
                # max_iter + 1, its Anderson at least 3)
                solvers.broyden_solver(guarded, z0, max_iter=max_iter, tol=-1.0, stop_mode=stop_mode,
                               LBFGS_thres=max(1, min(max_iter, broyden_memory)), ls=False, return_final=True)
            elif solver == "anderson":
                # the guard tracks the residuals Anderson's Gram matrix already holds
                anderson_iterations(guarded.func, z0, max_iter=max_iter + 2, m=anderson_m, lam=anderson_lam,
                                    tau=anderson_tau, observe=guarded.observe)
            else:
                solvers.fixed_point_iter(guarded, z0, max_iter=max_iter + 1, tol=-1.0, stop_mode=stop_mode,
                                         return_final=True)
        except _Stop:
            pass
    if guarded.best_z is None:  # max_iter == 0 cannot happen; keep the contract anyway
        raise RuntimeError("the solver did not evaluate f")
    return guarded.best_z, {"abs": guarded.best_abs, "rel": guarded.best_rel, "init_abs": guarded.init_abs,
                            "nfe": guarded.evals if device_stop else guarded.nfe, "diverged": guarded.dead}


def jacobian_loss(f_out: torch.Tensor, z: torch.Tensor, num_probes: int = 1) -> torch.Tensor:
    """Hutchinson estimate of ``||J_f(z)||_F^2 / numel`` (DEQ v2), differentiable (torchdeq's ``jac_reg``)."""
    if z.numel() == 0:
        return f_out.sum() * 0.0
    return require_torchdeq().loss.jac_reg(f_out, z, vecs=num_probes, create_graph=True)


class cached_parametrizations:
    """Context manager: inside it, every parametrized weight of ``module`` (e.g. torch's weight_norm) is
    computed once on entry, under the caller's grad mode (enter it with grad enabled in training so the
    cached weights carry their graph), and reused by all later accesses (``parametrize.cached``), so a
    solver's many no-grad calls of ``f`` neither recompute the normalised weights nor detach them."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._ctx = None

    def __enter__(self):
        if torch.jit.is_tracing():  # parametrize refuses to cache under torch.jit.trace: recompute per access
            self._ctx = contextlib.nullcontext()
        else:
            self._ctx = parametrize.cached()
        self._ctx.__enter__()
        for m in self.module.modules():
            if parametrize.is_parametrized(m):
                for name in m.parametrizations.keys():
                    getattr(m, name)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _solve_stats(info: dict, bad: torch.Tensor) -> DEQStats:
    """The ``DEQStats`` of a solve whose ``bad`` rows were replaced, read from the device at once (one host
    synchronisation): the batch-global ||g||_2 and ||g||_2 / ||f||_2 over the other rows (NaN when none is left)."""
    # counts travel with the sums: at least float32, so that they stay exact (to 2^24 rows) for a half-precision solve
    dtype = torch.promote_types(info["abs"].dtype, torch.float32)
    abs_rows, rel_rows = info["abs"].to(dtype), info["rel"].to(dtype)
    zero = torch.zeros_like(abs_rows)
    finite = torch.isfinite(abs_rows) & torch.isfinite(rel_rows) & (rel_rows > 0) & ~bad
    abs_sq = torch.where(torch.isfinite(abs_rows) & ~bad, abs_rows, zero).pow(2).sum()
    f_sq = torch.where(finite, abs_rows / rel_rows.clamp_min(1e-30), zero).pow(2).sum()
    nfe = info["nfe"]
    nfe = nfe.to(dtype) if isinstance(nfe, torch.Tensor) else abs_sq.new_tensor(float(nfe))
    n_bad, diverged, abs_sq, f_sq, nfe = torch.stack(
        [bad.sum().to(dtype), info["diverged"].sum().to(dtype), abs_sq, f_sq, nfe]).tolist()
    num_rows = bad.shape[0]
    if n_bad >= num_rows:
        abs_b = rel_b = math.nan
    else:
        abs_b, f_b = math.sqrt(abs_sq), math.sqrt(f_sq)
        rel_b = abs_b / f_b if f_b > 0 else 0.0
    return DEQStats(nstep=int(nfe), abs_residual=abs_b, rel_residual=rel_b, fallbacks=int(n_bad),
                    diverged=int(diverged), num_rows=num_rows)


class DEQFixedPoint(nn.Module):
    """Fixed point ``z* = f(z*)`` with implicit differentiation (parameter-free; ``f`` is passed per call).

    Args:
        f_solver (str): forward solver, "broyden" | "anderson" | "fixed_point".
        b_solver (str): solver of the adjoint fixed point (same choices).
        f_max_iter (int): forward solver evaluations in training.
        f_max_iter_test (int): forward solver evaluations at test time.
        f_solver_test (str or None): forward solver at test time (None: ``f_solver``); the solve then needs
            no gradient, so a cheaper solver can serve inference without changing training.
        b_max_iter (int): backward solver evaluations (also the number of Neumann terms).
        f_tol, b_tol (float): stop tolerances (see ``solve_fixed_point``).
        stop_mode (str): "abs" or "rel" (forward and backward).
        broyden_memory (int): maximum number of Broyden pairs kept.
        anderson_m, anderson_lam, anderson_tau: Anderson window, ridge and mixing.
        backward (str): "implicit" (adjoint solve), "jfb" (g* = v) or "neumann" (g* = v sum_{i<b_max_iter} J^i).
        fallback (str): "explicit" (rows that did not converge get ``fallback_fn``'s result) or "none" (keep
            the best iterate; non-finite rows become 0).
        divergence_factor (float): abort rows whose residual exceeds this times their initial residual.
        sync_free (bool or None): test the stop rule on the device (``solve_fixed_point``'s ``device_stop``), in
            the forward and adjoint solves of training and in the test-time solve: every solve then spends its
            whole budget, with the same result, and synchronises with the host once (to read its statistics and
            decide the fallback) instead of once per evaluation. None: on every device but the CPU, where a
            synchronisation costs nothing and stopping early saves the evaluations left.
    """

    def __init__(self, *, f_solver: str = "broyden", b_solver: str = "broyden", f_max_iter: int = 15,
                 f_max_iter_test: int = 15, b_max_iter: int = 15, f_tol: float = 1e-5, b_tol: float = 2e-10,
                 stop_mode: str = "abs", broyden_memory: int = 27, anderson_m: int = 6,
                 anderson_lam: float = 1e-4, anderson_tau: float = 1.0, backward: str = "implicit",
                 fallback: str = "explicit", divergence_factor: float = 1e6, f_solver_test: Optional[str] = None,
                 sync_free: Optional[bool] = None):
        super().__init__()
        f_solver_test = f_solver if f_solver_test is None else f_solver_test
        for name, value, choices in (("f_solver", f_solver, SOLVERS), ("b_solver", b_solver, SOLVERS),
                                     ("f_solver_test", f_solver_test, SOLVERS),
                                     ("backward", backward, BACKWARDS), ("fallback", fallback, FALLBACKS),
                                     ("stop_mode", stop_mode, ("abs", "rel"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        require_torchdeq()  # fail when the model is built, not at its first solve
        self.f_solver, self.b_solver, self.f_solver_test = f_solver, b_solver, f_solver_test
        self.f_max_iter, self.f_max_iter_test = int(f_max_iter), int(f_max_iter_test)
        self.b_max_iter = int(b_max_iter)
        self.f_tol, self.b_tol, self.stop_mode = float(f_tol), float(b_tol), stop_mode
        self.solver_kwargs = dict(broyden_memory=broyden_memory, anderson_m=anderson_m,
                                  anderson_lam=anderson_lam, anderson_tau=anderson_tau,
                                  divergence_factor=divergence_factor)
        self.backward_mode = backward
        self.fallback = fallback
        self.sync_free = sync_free
        #: totals since construction (rows), for tests and monitoring
        self.total_fallbacks = 0
        self.total_backward_fallbacks = 0

    def extra_repr(self):
        return (f"f_solver={self.f_solver}, b_solver={self.b_solver}, f_max_iter={self.f_max_iter}, "
                f"f_solver_test={self.f_solver_test}, f_max_iter_test={self.f_max_iter_test}, "
                f"b_max_iter={self.b_max_iter}, "
                f"backward={self.backward_mode}")

    # ------------------------------------------------------------------ forward
    def _not_converged(self, z, info, tol):
        """Rows to replace: non-finite, or no evaluated iterate improved on the initial one (and the initial
        one is not itself converged)."""
        bound = tol * math.sqrt(z[0].numel()) if self.stop_mode == "abs" else tol
        crit_ok = info["abs"] < bound if self.stop_mode == "abs" else info["rel"] < bound
        return ~torch.isfinite(z.flatten(1)).all(dim=1) | ~torch.isfinite(info["abs"]) \
            | ((info["abs"] >= info["init_abs"]) & ~crit_ok)

    def _replace_rows(self, z: torch.Tensor, bad: torch.Tensor,
                      fallback_fn: Optional[Callable[[], torch.Tensor]]) -> torch.Tensor:
        """``z`` with its ``bad`` rows replaced by the fallback (or zeros), and never NaN."""
        with torch.no_grad():
            if self.fallback == "explicit" and fallback_fn is not None:
                sub = fallback_fn()
            else:
                sub = torch.zeros_like(z)
            z = torch.where(bad.view(-1, *([1] * (z.dim() - 1))), sub, z)
            return torch.where(torch.isfinite(z), z, torch.zeros_like(z))

    def _sync_free(self, z0: torch.Tensor) -> bool:
        return z0.device.type != "cpu" if self.sync_free is None else self.sync_free

    def solve(self, func: Callable, z0: torch.Tensor, max_iter: int,
              fallback_fn: Optional[Callable[[], torch.Tensor]] = None):
        """No-grad solve with the fallback rule (``f_solver`` in training, ``f_solver_test`` in eval).
        Returns (z*, DEQStats)."""
        solver = self.f_solver if self.training else self.f_solver_test
        tracing = is_tracing_or_exporting()
        z, info = solve_fixed_point(func, z0, solver, max_iter, self.f_tol, self.stop_mode, **self.solver_kwargs,
                                    device_stop=not tracing and self._sync_free(z0))
        bad = self._not_converged(z, info, self.f_tol)
        if tracing:  # no branch on values: the fallback is always computed, then picked per row
            return self._replace_rows(z, bad, fallback_fn), DEQStats(nstep=info["nfe"], num_rows=z.shape[0])
        stats = _solve_stats(info, bad)
        if stats.fallbacks:
            z = self._replace_rows(z, bad, fallback_fn)
            self.total_fallbacks += stats.fallbacks
            _warn(f"DEQ forward solve: {stats.fallbacks}/{z.shape[0]} rows did not converge "
                  f"({stats.diverged} diverged) and used the {self.fallback!r} fallback; "
                  f"{self.total_fallbacks} rows so far.")
        return z, stats

    def forward(self, func: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
                fallback_fn: Optional[Callable[[], torch.Tensor]] = None,
                writer: Optional[Callable[[str, DEQStats], None]] = None,
                return_jac_loss: bool = False, jac_probes: int = 1):
        """Solve and return the (differentiable) equilibrium.

        Args:
            func: ``z -> f(z)``; must be row-independent and differentiable w.r.t. ``z`` and its parameters.
            z0 (Tensor[N, ...]): initial iterate (typically zeros).
            fallback_fn: no-argument callable returning a replacement Tensor[N, ...] (e.g. an explicit unroll);
                called at most once, only when some row did not converge.
            writer: ``writer(kind, stats)`` with kind "forward" (during this call) and "backward" (during
                autograd's backward pass, when the adjoint solve ran).
            return_jac_loss: also return the Jacobian-regularisation loss at z* (training only, else 0).

        Returns:
            Tensor[N, ...]: in training ``f(z*)`` with the implicit gradient attached; in eval ``z*``.
            (and the Jacobian loss, a scalar, if ``return_jac_loss``).
        """
        zero = z0.new_zeros(())
        if z0.shape[0] == 0:
            # no rows: nothing to solve; keep the output connected to f's parameters/inputs for autograd
            out = func(z0) if self.training else z0
            if writer is not None:
                writer("forward", DEQStats())
            return (out, zero) if return_jac_loss else out
        max_iter = self.f_max_iter if self.training else self.f_max_iter_test
        z_star, stats = self.solve(func, z0.detach(), max_iter, fallback_fn)
        if writer is not None:
            writer("forward", stats)
        if not (self.training and torch.is_grad_enabled()):
            return (z_star, zero) if return_jac_loss else z_star

        z_star = z_star.detach().requires_grad_()
        f_out = func(z_star)
        jac = jacobian_loss(f_out, z_star, jac_probes) if return_jac_loss else zero
        if self.backward_mode != "jfb" and f_out.requires_grad:
            self._attach_adjoint_hook(f_out, z_star, writer)
        return (f_out, jac) if return_jac_loss else f_out

    # ----------------------------------------------------------------- backward
    def _attach_adjoint_hook(self, f_out: torch.Tensor, z_star: torch.Tensor, writer):
        handle = None
        layer = self

        def hook(v):
            handle.remove()  # fire once (and never re-enter from the VJPs below)
            vjp = lambda y: torch.autograd.grad(f_out, z_star, y, retain_graph=True)[0]  # noqa: E731
            with torch.enable_grad():
                if layer.backward_mode == "neumann":
                    g, term = v.clone(), v
                    for _ in range(layer.b_max_iter - 1):
                        term = vjp(term)
                        g = g + term
                    res = (vjp(g) + v - g).flatten(1).norm(dim=1)
                    info = {"abs": res, "rel": res / (vjp(g) + v).flatten(1).norm(dim=1).clamp_min(1e-30),
                            "init_abs": v.flatten(1).norm(dim=1), "nfe": layer.b_max_iter + 1,
                            "diverged": torch.zeros_like(res, dtype=torch.bool)}
                else:
                    g, info = solve_fixed_point(lambda y: vjp(y) + v, torch.zeros_like(v), layer.b_solver,
                                                layer.b_max_iter, layer.b_tol, layer.stop_mode,
                                                **layer.solver_kwargs, device_stop=layer._sync_free(v))
            bad = layer._not_converged(g, info, layer.b_tol)
            stats = _solve_stats(info, bad)
            if stats.fallbacks:
                g = torch.where(bad.view(-1, *([1] * (g.dim() - 1))), v, g)  # Jacobian-free gradient
                layer.total_backward_fallbacks += stats.fallbacks
                _warn(f"DEQ backward solve: {stats.fallbacks}/{g.shape[0]} rows did not converge, used the "
                      f"Jacobian-free gradient; {layer.total_backward_fallbacks} rows so far.")
            if writer is not None:
                writer("backward", stats)
            return g.detach()

        handle = f_out.register_hook(hook)
