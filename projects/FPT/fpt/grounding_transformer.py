"""Grounding transformer (GT): top-down, queries from a finer level, keys/values from a coarser one."""
import math

import torch
import torch.nn as nn
from fvcore.nn.weight_init import c2_xavier_fill

from .attention import (
    ATTN_IMPLS,
    euclidean_mixture_attention,
    flatten_hw,
    linear_mixture_attention,
    mixture_attention,
    split_mixtures,
)
from .norm import NormSpec, conv_norm, zero_init_norm

__all__ = ["GroundingTransformer", "GT_MODES"]

#: "euclidean" (paper): softmax of -tau*|q - k|^2; "dot" (release): q k^T / (H_c W_c), no softmax;
#: "embedded": softmax of q k^T, no scale.
GT_MODES = ("euclidean", "dot", "embedded")


class GroundingTransformer(nn.Module):
    """``GT(fine <- coarse) = Norm(Conv1x1(y))`` at the fine resolution, no residual.

    q = theta(fine), k = phi(coarse), v = g(coarse), all 1x1 convs C -> C_i (bias). ``y`` follows ``mode``
    (:data:`GT_MODES`), optionally as a mixture of ``mixtures`` parts with a per-image prior from the mean of q
    (as in :class:`SelfTransformer`). The output norm's gamma = beta = 0 at init: GT starts silent.

    Args:
        channels (int): C.
        inter_channels (int): C_i; 0 means C // 2.
        mode (str): one of :data:`GT_MODES`.
        mixtures (int): number of mixture parts (C_i must be divisible by it).
        temperature (float): tau of "euclidean"; 0 means 1 / sqrt(C_i).
        norm (str or callable): norm after the output conv.
        attn_impl (str), query_chunk (int): see :mod:`fpt.attention`.
    """

    def __init__(self, channels: int, *, inter_channels: int = 0, mode: str = "euclidean", mixtures: int = 1,
                 temperature: float = 0.0, norm: NormSpec = "GN", attn_impl: str = "auto",
                 query_chunk: int = 4096):
        super().__init__()
        if mode not in GT_MODES:
            raise ValueError(f"MODEL.FPT.GROUNDING.MODE must be one of {GT_MODES}, got {mode!r}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"ATTN_IMPL must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        inter = int(inter_channels) or channels // 2
        if mixtures < 1 or inter % mixtures != 0:
            raise ValueError(f"GT: INTER_CHANNELS ({inter}) must be divisible by MIXTURES ({mixtures})")
        self.mode = mode
        self.mixtures = mixtures
        self.inter_channels = inter
        self.temperature = float(temperature) if temperature > 0 else 1.0 / math.sqrt(inter)
        self.attn_impl = attn_impl
        self.query_chunk = int(query_chunk)
        self.query = nn.Conv2d(channels, inter, 1)
        self.key = nn.Conv2d(channels, inter, 1)
        self.value = nn.Conv2d(channels, inter, 1)
        for conv in (self.query, self.key, self.value):
            c2_xavier_fill(conv)
        if mixtures > 1:
            bound = 1.0 / math.sqrt(mixtures)
            self.mixture_prior = nn.Parameter(torch.empty(mixtures, inter).uniform_(-bound, bound))
        else:
            self.register_parameter("mixture_prior", None)
        self.out = conv_norm(inter, channels, 1, bias=True, norm=norm)
        zero_init_norm(self.out.norm)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """fine (Tensor[N, C, Hf, Wf]), coarse (Tensor[N, C, Hc, Wc]) -> Tensor[N, C, Hf, Wf]."""
        n, _, h, w = fine.shape
        q = flatten_hw(self.query(fine))
        k = flatten_hw(self.key(coarse))
        v = flatten_hw(self.value(coarse))
        pi = None
        if self.mixture_prior is not None:
            pi = torch.softmax(q.mean(1) @ self.mixture_prior.t(), dim=-1)
        qm, km = split_mixtures(q, self.mixtures), split_mixtures(k, self.mixtures)
        if self.mode == "euclidean":
            y = euclidean_mixture_attention(qm, km, v, pi, temperature=self.temperature, impl=self.attn_impl,
                                            query_chunk=self.query_chunk)
        elif self.mode == "dot":
            y = linear_mixture_attention(qm, km, v, pi, impl=self.attn_impl)
        else:
            y = mixture_attention(qm, km, v, pi, scale=1.0, impl=self.attn_impl, query_chunk=self.query_chunk)
        y = y.transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return self.out(y)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, inter_channels={self.inter_channels}, mixtures={self.mixtures}, "
                f"temperature={self.temperature:.4g}, attn_impl={self.attn_impl!r}")
