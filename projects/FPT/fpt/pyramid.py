"""Per-level assembly of FPT: each level concatenates its transformers' outputs with itself and fuses them."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .grounding_transformer import GroundingTransformer
from .norm import NormSpec, conv_norm
from .rendering_transformer import RenderingTransformer
from .self_transformer import SelfTransformer

__all__ = ["FeaturePyramidTransformer", "CROSS_RANGES"]

#: "all": every pair of transformed levels (release); "adjacent": neighbouring levels only.
CROSS_RANGES = ("all", "adjacent")


class FeaturePyramidTransformer(nn.Module):
    """Maps a pyramid ``[X_l]`` (fine to coarse, C channels each) to one of identical shapes.

    For level l: ``Z_l = cat[ST(X_l) if l in st_levels; RT(X_l <- X_f) for each finer f, nearest first;
    GT(X_l <- X_c) for each coarser c, nearest first; X_l]`` and ``Out_l = FuseNorm(Conv_kxk(Z_l))`` (no
    activation). Every level and every pair owns its modules, named ``st.p<l>``, ``rt.p<coarse>_p<fine>``,
    ``gt.p<fine>_p<coarse>``, ``fuse.p<l>``.

    Args:
        channels (int): C of every level.
        levels (list[int]): log2 stride of each input level, increasing (e.g. [2, 3, 4, 5]).
        self_transformer (dict or None): kwargs of :class:`SelfTransformer`; None disables ST.
        grounding_transformer (dict or None): kwargs of :class:`GroundingTransformer`; None disables GT.
        rendering_transformer (dict or None): kwargs of :class:`RenderingTransformer` (no ``level_gap``);
            None disables RT.
        st_levels (list[int] or None): the levels with an ST (None = all).
        cross_range (str): one of :data:`CROSS_RANGES`.
        fuse_kernel (int): k of the fuse conv (padding k // 2).
        fuse_norm (str or callable): norm after the fuse conv ("" = none, bias then).
        norm (str or callable): norm of the transformers (unless their dict sets one).
    """

    def __init__(self, channels: int, levels: Sequence[int], *, self_transformer: Optional[dict] = None,
                 grounding_transformer: Optional[dict] = None, rendering_transformer: Optional[dict] = None,
                 st_levels: Optional[Sequence[int]] = None, cross_range: str = "all", fuse_kernel: int = 3,
                 fuse_norm: NormSpec = "", norm: NormSpec = "GN"):
        super().__init__()
        levels = [int(lv) for lv in levels]
        if not levels or any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must be a non-empty increasing list of log2 strides, got {levels}")
        if cross_range not in CROSS_RANGES:
            raise ValueError(f"CROSS_RANGE must be one of {CROSS_RANGES}, got {cross_range!r}")
        if fuse_kernel < 1 or fuse_kernel % 2 == 0:
            raise ValueError(f"FUSE_KERNEL must be a positive odd integer, got {fuse_kernel}")
        st_levels = levels if st_levels is None else [int(lv) for lv in st_levels]
        unknown = set(st_levels) - set(levels)
        if unknown:
            raise ValueError(f"ST levels {sorted(unknown)} are not among the transformed levels {levels}")
        self.channels = channels
        self.levels = levels
        self.cross_range = cross_range
        self.st = nn.ModuleDict()
        self.gt = nn.ModuleDict()
        self.rt = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        #: per level index: (ST on, [finer indices for RT], [coarser indices for GT])
        self._plan: List[tuple] = []
        for i, lv in enumerate(levels):
            finer = [j for j in range(i - 1, -1, -1) if cross_range == "all" or j == i - 1]
            coarser = [j for j in range(i + 1, len(levels)) if cross_range == "all" or j == i + 1]
            has_st = self_transformer is not None and lv in st_levels
            if has_st:
                self.st[f"p{lv}"] = SelfTransformer(channels, **{"norm": norm, **self_transformer})
            if rendering_transformer is None:
                finer = []
            for j in finer:
                self.rt[f"p{lv}_p{levels[j]}"] = RenderingTransformer(
                    channels, level_gap=lv - levels[j], **{"norm": norm, **rendering_transformer})
            if grounding_transformer is None:
                coarser = []
            for j in coarser:
                self.gt[f"p{lv}_p{levels[j]}"] = GroundingTransformer(
                    channels, **{"norm": norm, **grounding_transformer})
            parts = int(has_st) + len(finer) + len(coarser) + 1
            self.fuse[f"p{lv}"] = conv_norm(parts * channels, channels, fuse_kernel, bias=fuse_norm in ("", None),
                                            norm=fuse_norm)
            self._plan.append((has_st, finer, coarser))

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """features (list of Tensor[N, C, H_l, W_l], fine to coarse) -> list of the same shapes."""
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} levels (p{self.levels}), got {len(features)}")
        for x in features:
            if x.dim() != 4 or x.shape[1] != self.channels:
                raise ValueError(f"every level must be Tensor[N, {self.channels}, H, W], got {tuple(x.shape)}")
        outs = []
        for i, (lv, (has_st, finer, coarser)) in enumerate(zip(self.levels, self._plan)):
            x = features[i]
            parts = []
            if has_st:
                parts.append(self.st[f"p{lv}"](x))
            for j in finer:
                parts.append(self.rt[f"p{lv}_p{self.levels[j]}"](x, features[j]))
            for j in coarser:
                parts.append(self.gt[f"p{lv}_p{self.levels[j]}"](x, features[j]))
            parts.append(x)
            outs.append(self.fuse[f"p{lv}"](torch.cat(parts, dim=1)))
        return outs

    def input_channels(self) -> Dict[int, int]:
        """Input channels of each level's fuse conv (e.g. 5C per level with four levels, all on)."""
        return {lv: self.fuse[f"p{lv}"].conv.in_channels for lv in self.levels}
