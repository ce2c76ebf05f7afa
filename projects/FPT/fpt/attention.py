"""Attention kernels of FPT as pure tensor functions (no modules, no detectron2).

Every function takes flattened maps: queries ``q (Tensor[N, M, L, d])`` (M mixtures / heads, L query
positions), keys ``k (Tensor[N, M, S, d])`` and values ``v (Tensor[N, S, Cv])`` shared by all mixtures, plus a
per-image mixture prior ``pi (Tensor[N, M])`` (``None`` when M = 1). They return ``Tensor[N, L, Cv]``:

    y = sum_m pi_m * A_m v

with ``A_m`` a softmax attention (:func:`mixture_attention`) or an unnormalised linear one
(:func:`linear_mixture_attention`). ``impl`` picks how it is computed:

- ``"naive"``: the full (N, M, L, S) matrix, the reference the others are tested against;
- ``"chunked"``: queries in chunks of ``query_chunk`` rows (exact: softmax is per query row), so at most
  ``query_chunk x S`` logits per mixture exist at once; dropout is drawn exactly as in ``"naive"``;
- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`. On CPU its fused low-memory kernel
  needs the value width to equal the query width and no dropout, so without dropout the values are cut into
  chunks of the (8-aligned, zero-padded) query width, giving M x J heads whose outputs are pi-weighted and
  concatenated back (each head recomputes its mixture's q k^T). On CUDA (whose memory-efficient kernel takes a
  value width other than the query width) and with dropout: M heads with the full value width, q k^T once per
  mixture (:data:`SPLIT_VALUES` says where the values are cut).
- ``"auto"``: ``"chunked"`` on CPU with dropout, ``"sdpa"`` otherwise.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "sdpa", "chunked", "naive")

#: Per device type: whether the ``"sdpa"`` path without dropout cuts the values into chunks of the query width
#: (M x J heads, q k^T computed J times per mixture) instead of M heads with the full value width.
SPLIT_VALUES = {"cpu": True, "cuda": False}

__all__ = ["ATTN_IMPLS", "SPLIT_VALUES", "mixture_attention", "euclidean_mixture_attention", "linear_mixture_attention",
           "euclidean_qk", "flatten_hw", "split_mixtures"]


def flatten_hw(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def split_mixtures(x: torch.Tensor, mixtures: int) -> torch.Tensor:
    """(N, L, C) -> (N, M, L, C/M): M contiguous channel groups."""
    n, length, c = x.shape
    if c % mixtures != 0:
        raise ValueError(f"channels ({c}) must be divisible by the number of mixtures ({mixtures})")
    return x.view(n, length, mixtures, c // mixtures).transpose(1, 2)


def euclidean_qk(q: torch.Tensor, k: torch.Tensor):
    """Rewrite softmax_j(-tau * |q_i - k_j|^2) as a dot-product softmax.

    The -tau*|q_i|^2 term is constant along keys and cancels in the softmax, so the logits equal
    tau * (q_hat_i . k_hat_j) with q_hat = [q, 1] and k_hat = [2k, -|k|^2].

    In half precision (float16 / bfloat16) q and k are first centred on the keys' mean mu (per image and
    mixture, in float32): |q - k| = |(q - mu) - (k - mu)|, so the logits are unchanged while |k|^2, and the
    rounding of the large -|k|^2 logit term, shrink. Where |k|^2 would still exceed float16's range (65504) the
    -|k|^2 column is divided by a power of two c (per image and mixture) and q_hat's column of ones multiplied by
    it: exact scalings, the same logits. float32 / float64 inputs are used as they are.

    Args:
        q (Tensor[..., L, d]), k (Tensor[..., S, d])
    Returns:
        q_hat (Tensor[..., L, d + 1]), k_hat (Tensor[..., S, d + 1]); |k|^2 is accumulated in float32 at least.
    """
    acc = torch.promote_types(k.dtype, torch.float32)
    if acc != k.dtype and k.shape[-2] > 0:  # half precision: centre in float32 (the mean only shifts both)
        mu = k.to(acc).mean(-2, keepdim=True).detach()
        q = (q.to(acc) - mu).to(q.dtype)
        k32 = k.to(acc) - mu
        k = k32.to(k.dtype)
        k_sq = k32.pow(2).sum(-1, keepdim=True)
        # c = 1 while max |k|^2 <= 2^14, else the power of two that brings it there (on the device, no sync)
        c = torch.exp2(torch.log2(k_sq.amax(-2, keepdim=True) * 2.0 ** -14).ceil_().clamp_(0, 15))
        q_col = c.to(q.dtype).expand(q.shape[:-1] + (1,))  # q_hat's last column: c instead of 1
        k_sq = (k_sq / c).to(k.dtype)
    else:
        k_sq = k.to(acc).pow(2).sum(-1, keepdim=True).to(k.dtype)
        q_col = q.new_ones(q.shape[:-1] + (1,))
    q_hat = torch.cat([q, q_col], dim=-1)
    k_hat = torch.cat([2 * k, -k_sq], dim=-1)
    return q_hat, k_hat


def _check(q, k, v, pi):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 3:
        raise ValueError(f"expected q (N, M, L, d), k (N, M, S, d), v (N, S, Cv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    n, m, _, d = q.shape
    if k.shape[0] != n or k.shape[1] != m or k.shape[3] != d or v.shape[0] != n or v.shape[1] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match")
    if pi is None and m != 1:
        raise ValueError(f"pi (Tensor[N, M]) is required with M = {m} mixtures")
    if pi is not None and tuple(pi.shape) != (n, m):
        raise ValueError(f"pi must be Tensor[{n}, {m}], got {tuple(pi.shape)}")


def _mix(a: torch.Tensor, pi: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, M, ...) -> (N, ...): the pi-weighted sum over mixtures, in the dtype of ``a`` (under autocast pi comes
    from a float32 softmax: a half-precision ``a`` would otherwise become a float32 copy, (N, M, L, Cv) at P2)."""
    if pi is None:
        return a[:, 0]
    return (a * pi.to(a.dtype).view(pi.shape + (1,) * (a.dim() - 2))).sum(1)


def _naive(q, k, v, pi, scale, dropout_p):
    attn = torch.softmax(torch.einsum("nmld,nmsd->nmls", q, k) * scale, dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p, training=True)
    return _mix(attn, pi) @ v


def _chunked(q, k, v, pi, scale, dropout_p, query_chunk):
    outs = [_naive(q[:, :, i:i + query_chunk], k, v, pi, scale, dropout_p)
            for i in range(0, q.shape[2], max(int(query_chunk), 1))]
    return torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape[0], 0, v.shape[2])


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _sdpa(q, k, v, pi, scale, dropout_p):
    n, m, length, d = q.shape
    s, cv = v.shape[1], v.shape[2]
    if dropout_p > 0 or not SPLIT_VALUES.get(q.device.type, True):
        # one head per mixture, full value width: q k^T once per mixture, one dropout mask per A_m (as naive);
        # q and k zero-padded to a multiple of 8 (the fused kernels' alignment; dot products unchanged). Every
        # fused kernel needs a last dimension of stride 1, which the maps' views (flatten_hw, split_mixtures) do
        # not have: without these copies SDPA falls back to its math kernel, the full (N, M, L, S) matrix.
        width = 8 * math.ceil(d / 8)
        q, k = _pad_last(q, width).contiguous(), _pad_last(k, width).contiguous()
        vv = v.unsqueeze(1).expand(n, m, s, cv).contiguous()
        out = F.scaled_dot_product_attention(q, k, vv, dropout_p=dropout_p, scale=scale)
        return _mix(out, pi)
    width = 8 * math.ceil(d / 8)  # zero padding leaves the dot products unchanged
    chunks = math.ceil(cv / width)
    q = _pad_last(q, width).unsqueeze(2).expand(n, m, chunks, length, width).reshape(n, m * chunks, length, width)
    k = _pad_last(k, width).unsqueeze(2).expand(n, m, chunks, s, width).reshape(n, m * chunks, s, width)
    vv = _pad_last(v, chunks * width).view(n, s, chunks, width).transpose(1, 2)
    vv = vv.unsqueeze(1).expand(n, m, chunks, s, width).reshape(n, m * chunks, s, width)
    out = F.scaled_dot_product_attention(q, k, vv, scale=scale)  # (N, M*J, L, w)
    out = _mix(out.view(n, m, chunks, length, width), pi)  # (N, J, L, w)
    return out.transpose(1, 2).reshape(n, length, chunks * width)[..., :cv]


def mixture_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pi: Optional[torch.Tensor] = None, *,
                      scale: float, dropout_p: float = 0.0, impl: str = "auto",
                      query_chunk: int = 4096) -> torch.Tensor:
    """Mixture of softmaxes: ``y = sum_m pi_m * dropout(softmax(q_m k_m^T * scale)) v``.

    Args:
        q (Tensor[N, M, L, d]): queries, one group of channels per mixture.
        k (Tensor[N, M, S, d]): keys.
        v (Tensor[N, S, Cv]): values, shared by the mixtures.
        pi (Tensor[N, M] or None): per-image mixture weights (None only when M = 1).
        scale (float): logit scale (temperature), passed explicitly to SDPA.
        dropout_p (float): dropout on each A_m; pass 0 in eval mode.
        impl (str): one of :data:`ATTN_IMPLS`.
        query_chunk (int): query rows per chunk of the ``"chunked"`` path.

    Returns:
        Tensor[N, L, Cv]
    """
    _check(q, k, v, pi)
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "chunked" if (dropout_p > 0 and q.device.type == "cpu") else "sdpa"
    if q.shape[2] == 0:
        return v.new_zeros(v.shape[0], 0, v.shape[2])
    if impl == "naive":
        return _naive(q, k, v, pi, scale, dropout_p)
    if impl == "chunked":
        return _chunked(q, k, v, pi, scale, dropout_p, query_chunk)
    return _sdpa(q, k, v, pi, scale, dropout_p)


def linear_mixture_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             pi: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """Unnormalised dot-product attention ``y = sum_m pi_m * (q_m k_m^T / S) v`` (FPT's "dot" grounding).

    It is linear: every path but ``"naive"`` forms ``k_m^T v`` (d x Cv) first, never the (L, S) matrix.
    Shapes as in :func:`mixture_attention`.
    """
    _check(q, k, v, pi)
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
    s = max(k.shape[2], 1)
    if impl == "naive":
        attn = torch.einsum("nmld,nmsd->nmls", q, k) / s
        return _mix(attn, pi) @ v
    if _runs_in_float16(k):
        # k^T v sums S products: in float16 (largest value 65504) the sum overflows before the division by S
        # (S = 16800 products of mean 4 do). Each factor scaled by S^-1/2 instead: the result is the mean.
        r = s ** -0.5
        kv = torch.einsum("nmsd,nsc->nmdc", k * r, v * r)
    else:
        kv = torch.einsum("nmsd,nsc->nmdc", k, v) / s
    return _mix(q @ kv, pi)


def _runs_in_float16(x: torch.Tensor) -> bool:
    """Whether a matmul of ``x`` runs in float16 (its dtype, or autocast's on its device)."""
    dev = x.device.type
    autocast16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16
    return x.dtype == torch.float16 or autocast16


def euclidean_mixture_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                pi: Optional[torch.Tensor] = None, *, temperature: float, impl: str = "auto",
                                query_chunk: int = 4096) -> torch.Tensor:
    """``y = sum_m pi_m * softmax_j(-temperature * |q_mi - k_mj|^2) v`` (FPT's euclidean grounding).

    ``"naive"`` forms the squared distances explicitly (the reference); the other paths use
    :func:`euclidean_qk` and :func:`mixture_attention`. Shapes as in :func:`mixture_attention`.
    """
    _check(q, k, v, pi)
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "naive":
        dist = (q.unsqueeze(3) - k.unsqueeze(2)).pow(2).sum(-1)  # (N, M, L, S)
        return _mix(torch.softmax(-temperature * dist, dim=-1), pi) @ v
    q_hat, k_hat = euclidean_qk(q, k)
    return mixture_attention(q_hat, k_hat, v, pi, scale=temperature, impl=impl, query_chunk=query_chunk)
