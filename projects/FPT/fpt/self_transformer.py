"""Self-transformer (ST): non-local attention inside one pyramid level, with a Mixture of Softmaxes."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.nn.weight_init import c2_xavier_fill

from .attention import flatten_hw, mixture_attention, split_mixtures
from .norm import NormSpec, conv_norm

__all__ = ["SelfTransformer"]


class SelfTransformer(nn.Module):
    """``ST(x) = Norm(Conv1x1(y)) + x`` with ``y = sum_m pi_m * softmax(q_m k_m^T * scale) v``.

    q = phi(x) over all H*W positions; k = phi(x~), v = psi(x~) with x~ = x average-pooled 3x3 / stride 2
    (pads not counted) when ``pool_kv``. The C channels of q and k are split into ``mixtures`` contiguous
    groups; the per-image prior ``pi = softmax(W_pi . mean_positions(q))``. The scale uses the full C.

    Args:
        channels (int): C, input and output channels.
        mixtures (int): M, number of softmaxes (C must be divisible by M).
        pool_kv (bool): pool the keys and values (H x W -> ceil(H/2) x ceil(W/2)).
        share_qk (bool): one 1x1 conv for queries and keys (else a separate key conv).
        dropout (float): dropout on each attention map, in training.
        scale (float): logit scale; 0 means 1 / sqrt(C).
        norm (str or callable): norm after the output conv.
        attn_impl (str), query_chunk (int): see :func:`fpt.attention.mixture_attention`.
    """

    def __init__(self, channels: int, *, mixtures: int = 2, pool_kv: bool = True, share_qk: bool = True,
                 dropout: float = 0.1, scale: float = 0.0, norm: NormSpec = "GN", attn_impl: str = "auto",
                 query_chunk: int = 4096):
        super().__init__()
        if mixtures < 1 or channels % mixtures != 0:
            raise ValueError(f"self-transformer: channels ({channels}) must be divisible by "
                             f"MODEL.FPT.SELF.MIXTURES ({mixtures})")
        self.channels = channels
        self.mixtures = mixtures
        self.pool_kv = pool_kv
        self.dropout = float(dropout)
        self.scale = float(scale) if scale > 0 else 1.0 / math.sqrt(channels)
        self.attn_impl = attn_impl
        self.query_chunk = int(query_chunk)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = None if share_qk else nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        for conv in (self.query, self.key, self.value):
            if conv is not None:
                c2_xavier_fill(conv)
        if mixtures > 1:
            bound = 1.0 / math.sqrt(mixtures)
            self.mixture_prior = nn.Parameter(torch.empty(mixtures, channels).uniform_(-bound, bound))
        else:
            self.register_parameter("mixture_prior", None)
        self.out = conv_norm(channels, channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (Tensor[N, C, H, W]) -> Tensor[N, C, H, W]."""
        n, c, h, w = x.shape
        kv_in = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False) if self.pool_kv else x
        q = flatten_hw(self.query(x))
        k = flatten_hw((self.query if self.key is None else self.key)(kv_in))
        v = flatten_hw(self.value(kv_in))
        pi = None
        if self.mixture_prior is not None:
            pi = torch.softmax(q.mean(1) @ self.mixture_prior.t(), dim=-1)  # (N, M)
        y = mixture_attention(split_mixtures(q, self.mixtures), split_mixtures(k, self.mixtures), v, pi,
                              scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
                              impl=self.attn_impl, query_chunk=self.query_chunk)
        y = y.transpose(1, 2).reshape(n, c, h, w)
        return self.out(y) + x

    def extra_repr(self) -> str:
        return (f"mixtures={self.mixtures}, pool_kv={self.pool_kv}, scale={self.scale:.4g}, "
                f"dropout={self.dropout}, attn_impl={self.attn_impl!r}")
