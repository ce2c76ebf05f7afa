"""The intertwiner loss between small-object critic outputs and the class centroids (torch only).

Class level (released): ``sbar_c`` = mean output of the step's less reliable RoIs of class c; the classes used
are those with such RoIs and a centroid (``n_c > 0``); ``D`` is a plain mean over (#classes x dim) elements:

    l2: mean (sbar - mu)^2      l1: mean |sbar - mu|      kl: mean mu * (log mu - log sbar)   (KL(mu || sbar))
    ot: mean over classes of the Sinkhorn divergence of the OT critic's samples (see :class:`IntertwinerOT`)

Instance level: every RoI's output against its class centroid (mean over RoIs x dim). A negative value is
replaced by 0. No class with a centroid: an exact 0 that stays attached to the graph.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from d2_refine.layers.sinkhorn import require_pot, sinkhorn_divergence

__all__ = ["DISTANCES", "IntertwinerOT", "intertwiner_loss"]

DISTANCES = ("l2", "l1", "kl", "ot")
_LOG_EPS = 1e-12


class IntertwinerOT(nn.Module):
    """The OT distance of the original ``OptTrans``, batched over the (sbar_c, mu_c) pairs.

    Each pair is a 1-d signal (``dim`` channels x length 1). A generator G (conv1d k3 pad 1 + ReLU, no norm)
    maps sbar; an OT critic (conv1d dim -> ``ot_dim``, k3 pad 1 + ReLU) maps G(sbar) and mu, whose ``ot_dim``
    output channels are the 1-d samples of two uniform distributions. Their Sinkhorn divergence
    ``2 W(G sbar, mu) - W(G sbar, G sbar) - W(mu, mu)`` (plan detached, exactly ``iters`` log-domain
    iterations via POT) is averaged over the pairs.

    Args:
        dim (int): critic output dimension.
        ot_dim (int): channels of the OT critic (number of samples).
        epsilon (float), iters (int): Sinkhorn parameters.
        cost (str): "sqeuclidean" or "cosine" (released; gradient-free almost everywhere: 1-d samples after a ReLU).
    """

    def __init__(self, dim: int = 1024, ot_dim: int = 256, epsilon: float = 1.0, iters: int = 5,
                 cost: str = "sqeuclidean"):
        super().__init__()
        if cost not in ("sqeuclidean", "cosine"):
            raise ValueError(f"MODEL.INTERNET.OT.COST must be 'sqeuclidean' or 'cosine', got {cost!r}")
        require_pot("InterNet's OT loss (MODEL.INTERNET.LOSS \"ot\")")  # at build time, not at the first step
        self.generator = nn.Conv1d(dim, dim, 3, padding=1)
        self.critic = nn.Conv1d(dim, ot_dim, 3, padding=1)
        self.epsilon = float(epsilon)
        self.iters = int(iters)
        self.cost = cost

    def forward(self, sbar: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """
        Args:
            sbar (Tensor[n, dim]): class means of the less reliable set.
            mu (Tensor[n, dim]): their centroids (no gradient).

        Returns:
            Tensor[n]: one divergence per pair.
        """
        gx = F.relu(self.generator(sbar[:, :, None]))
        a = F.relu(self.critic(gx))                 # [n, ot_dim, 1]: ot_dim samples of dimension 1
        b = F.relu(self.critic(mu[:, :, None].to(sbar)))
        return sinkhorn_divergence(a, b, self.epsilon, self.iters, self.cost)


def _elementwise(distance: str, s: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    if distance == "l2":
        return (s - mu).pow(2)
    if distance == "l1":
        return (s - mu).abs()
    if distance == "kl":
        return mu * (mu.clamp_min(_LOG_EPS).log() - s.clamp_min(_LOG_EPS).log())
    raise ValueError(f"MODEL.INTERNET.LOSS must be one of {DISTANCES}, got {distance!r}")


def intertwiner_loss(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                     filled: torch.Tensor, distance: str = "l2", instance_level: bool = False,
                     ot: Optional[IntertwinerOT] = None) -> torch.Tensor:
    """Distance between the less reliable set and the class centroids (unweighted, >= 0).

    Args:
        features (Tensor[R, D]): activated critic outputs of the step's foreground less reliable RoIs.
        labels (LongTensor[R]): their classes in ``[0, K)``.
        centroids (Tensor[K, D]): class centroids (treated as constants).
        filled (BoolTensor[K]): classes that have a centroid.
        distance (str): "l2" | "l1" | "kl" | "ot".
        instance_level (bool): compare each RoI (instead of each class mean) with its centroid.
        ot (IntertwinerOT): required for "ot".

    Returns:
        Tensor[]: the loss (0, attached to ``features``, when no RoI has a filled class).
    """
    if distance not in DISTANCES:
        raise ValueError(f"MODEL.INTERNET.LOSS must be one of {DISTANCES}, got {distance!r}")
    if distance == "ot" and ot is None:
        raise ValueError("distance 'ot' needs the IntertwinerOT module")
    zero = features.sum() * 0.0
    if features.shape[0] == 0:
        return zero
    centroids = centroids.detach().to(features.dtype)
    keep = filled[labels]
    if not bool(keep.any()):
        return zero
    feats, labs = features[keep], labels[keep]
    if instance_level:
        s, mu = feats, centroids[labs]
    else:
        classes, inverse = torch.unique(labs, return_inverse=True)
        sums = feats.new_zeros(classes.numel(), feats.shape[1]).index_add(0, inverse, feats)
        cnt = torch.bincount(inverse, minlength=classes.numel()).to(feats.dtype)
        s, mu = sums / cnt[:, None], centroids[classes]
    if distance == "ot":
        value = ot(s, mu).mean()
    else:
        value = _elementwise(distance, s, mu).mean()
    return value.clamp_min(0.0) + zero
