"""Batched entropic optimal transport: the Sinkhorn divergence of many pairs of point clouds at once.

Solved with the POT library's batched solver (``ot.batch.solve_batch``, log-domain Sinkhorn, torch backend):
one call solves every problem of the batch, no Python loop over pairs. The plan is computed on the detached
cost and held fixed, so gradients flow through the cost only (the "detached plan" of InterNet's ``OptTrans``
and of WGAN-style Sinkhorn losses):

    W(a, b) = <P*, C(a, b)>,  P* = Sinkhorn(C(a, b).detach())  (no entropy term)
    S(a, b) = 2 W(a, b) - W(a, a) - W(b, b)

POT is needed only here; importing this module works without it and the functions raise one clear error.
Torch-only (no detectron2).
"""
from typing import Optional

import torch

__all__ = ["pairwise_cost", "sinkhorn_plan", "sinkhorn_cost", "sinkhorn_divergence", "require_pot"]

POT_INSTALL_HINT = 'pip install "d2_refine[methods]" (or pip install "POT>=0.9.6")'
_COSTS = ("sqeuclidean", "cosine")


def require_pot(what: str = "the Sinkhorn divergence"):
    """Return the ``ot.batch`` module of POT, or raise an ImportError that says how to install it."""
    try:
        import ot.batch as ot_batch
    except ImportError:
        raise ImportError(f"{what} needs the POT library (Python Optimal Transport, POT >= 0.9.6), which is not "
                          f"installed: {POT_INSTALL_HINT}") from None
    if not hasattr(ot_batch, "solve_batch"):
        raise ImportError(f"{what} needs ot.batch.solve_batch (POT >= 0.9.6; this POT is older): "
                          'pip install --upgrade "d2_refine[methods]"')
    return ot_batch


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost: str = "sqeuclidean") -> torch.Tensor:
    """Cost matrices between two batches of point clouds.

    Args:
        x (Tensor[B, N, D]): the first cloud of each problem.
        y (Tensor[B, M, D]): the second cloud of each problem.
        cost (str): ``"sqeuclidean"``: ``C_ij = |x_i - y_j|^2``; ``"cosine"``: ``C_ij = 1 - cos(x_i, y_j)``
            (rows L2-normalised with ``+1e-20`` in the norm, as InterNet's original).

    Returns:
        Tensor[B, N, M]
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must be Tensor[B, N, D] and Tensor[B, M, D], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if cost == "sqeuclidean":
        if x.shape[2] <= 16:  # exact (no cancellation) when the samples are low-dimensional
            return (x[:, :, None, :] - y[:, None, :, :]).pow(2).sum(-1)
        xx = x.pow(2).sum(-1)[:, :, None]
        yy = y.pow(2).sum(-1)[:, None, :]
        return (xx + yy - 2 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0)
    if cost == "cosine":
        xn = x / (x.norm(dim=-1, keepdim=True) + 1e-20)
        yn = y / (y.norm(dim=-1, keepdim=True) + 1e-20)
        return 1 - torch.bmm(xn, yn.transpose(1, 2))
    raise ValueError(f"cost must be one of {_COSTS}, got {cost!r}")


def sinkhorn_plan(C: torch.Tensor, epsilon: float = 1.0, iters: int = 5,
                  a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropic transport plans of a batch of problems, after exactly ``iters`` log-domain Sinkhorn iterations.

    Iterations start from ``v = 1`` and update ``u`` first (``u = a / K v``, then ``v = b / K^T u``), with
    ``K = exp(-C / epsilon)``, in the log domain; no early stop. The result carries no gradient.

    Args:
        C (Tensor[B, N, M]): cost matrices.
        epsilon (float): entropic regularisation.
        iters (int): number of Sinkhorn iterations (each updates u then v).
        a (Tensor[B, N], optional), b (Tensor[B, M], optional): marginals; uniform when None.

    Returns:
        Tensor[B, N, M]: the plans ``diag(e^u) K diag(e^v)``.
    """
    ot_batch = require_pot()
    if C.dim() != 3:
        raise ValueError(f"C must be Tensor[B, N, M], got shape {tuple(C.shape)}")
    if epsilon <= 0 or iters < 1:
        raise ValueError(f"epsilon must be > 0 and iters >= 1, got epsilon={epsilon}, iters={iters}")
    if C.numel() == 0:
        return C.detach().new_zeros(C.shape)
    C = C.detach()
    a = a.detach() if a is not None else None
    b = b.detach() if b is not None else None
    # tol=0: the solver's convergence test (max marginal error < tol) never fires, so exactly `iters` run.
    res = ot_batch.solve_batch(C, reg=float(epsilon), a=a, b=b, max_iter=int(iters), tol=0.0,
                               method="log_sinkhorn", grad="detach")
    return res.plan


def sinkhorn_cost(C: torch.Tensor, epsilon: float = 1.0, iters: int = 5,
                  a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Transport cost ``<P, C>`` of each problem with its Sinkhorn plan held fixed (no entropy term).

    Equals POT's ``value_linear``; the gradient flows through ``C`` only.

    Args:
        C (Tensor[B, N, M]): cost matrices (may require grad).

    Returns:
        Tensor[B]
    """
    P = sinkhorn_plan(C, epsilon, iters, a, b)
    return (P * C).sum(dim=(1, 2))


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, epsilon: float = 1.0, iters: int = 5,
                        cost: str = "sqeuclidean") -> torch.Tensor:
    """Sinkhorn divergence ``2 W(x, y) - W(x, x) - W(y, y)`` of B pairs of point clouds, uniform weights.

    All ``3 B`` transport problems go to one batched solve when ``N == M`` (two or three solves otherwise).

    Args:
        x (Tensor[B, N, D]): first clouds (N samples of dimension D each).
        y (Tensor[B, M, D]): second clouds.
        epsilon (float): entropic regularisation of each Sinkhorn solve.
        iters (int): Sinkhorn iterations (exactly that many).
        cost (str): ``"sqeuclidean"`` or ``"cosine"``, see :func:`pairwise_cost`.

    Returns:
        Tensor[B]: one divergence per pair (an empty tensor when B == 0).
    """
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be Tensor[B, N, D] and Tensor[B, M, D], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] == 0:
        return (x.sum() + y.sum()).reshape(1)[:0]  # empty, still attached to the inputs' graph
    cxy = pairwise_cost(x, y, cost)
    cxx = pairwise_cost(x, x, cost)
    cyy = pairwise_cost(y, y, cost)
    B = x.shape[0]
    if x.shape[1] == y.shape[1]:
        w = sinkhorn_cost(torch.cat([cxy, cxx, cyy], dim=0), epsilon, iters)
        wxy, wxx, wyy = w[:B], w[B:2 * B], w[2 * B:]
    else:
        wxy = sinkhorn_cost(cxy, epsilon, iters)
        wxx = sinkhorn_cost(cxx, epsilon, iters)
        wyy = sinkhorn_cost(cyy, epsilon, iters)
    return 2 * wxy - wxx - wyy
