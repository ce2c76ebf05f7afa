"""``IFRMaskHead``: Mask R-CNN mask head whose 4 stacked convs become one implicit (DEQ) refinement block.

x = RoIAlign mask features (N, C, 14, 14) -> refinement z (fixed point of ``IFRBlock`` or its K-step unroll)
-> ConvTranspose 2x2 s2 -> ReLU -> 1x1 conv to class logits (N, num_classes, 28, 28). Loss and inference are
``BaseMaskRCNNHead``'s. Works under StandardROIHeads and CascadeROIHeads (one shared mask head).
"""
import logging
from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import ConvTranspose2d, ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
from detectron2.utils.events import get_event_storage
from torch import nn

from d2_refine.layers.deq import DEQFixedPoint, DEQStats, cached_parametrizations
from d2_refine.utils.tracing import is_tracing_or_exporting

from .block import IFRBlock, explicit_unroll

__all__ = ["IFRMaskHead", "build_ifr_deq"]

logger = logging.getLogger(__name__)


def _current_iter() -> Optional[int]:
    try:
        return get_event_storage().iter
    except AssertionError:  # no EventStorage (used outside a trainer)
        return None


def build_ifr_deq(cfg) -> DEQFixedPoint:
    """The fixed-point layer configured by ``cfg.MODEL.IFR``."""
    c = cfg.MODEL.IFR
    return DEQFixedPoint(f_solver=c.F_SOLVER, b_solver=c.B_SOLVER, f_max_iter=c.F_MAX_ITER,
                         f_max_iter_test=c.F_MAX_ITER_TEST, b_max_iter=c.B_MAX_ITER, f_tol=c.F_TOL, b_tol=c.B_TOL,
                         stop_mode=c.STOP_MODE, broyden_memory=c.BROYDEN_MEMORY, anderson_m=c.ANDERSON.M,
                         anderson_lam=c.ANDERSON.LAM, anderson_tau=c.ANDERSON.TAU, backward=c.BACKWARD,
                         fallback=c.FALLBACK, f_solver_test=c.F_SOLVER_TEST or None)


@ROI_MASK_HEAD_REGISTRY.register()
class IFRMaskHead(BaseMaskRCNNHead):
    """Mask head with implicit feature refinement (IFR, Ma et al., ACM MM 2021).

    Args:
        input_shape (ShapeSpec): RoI feature shape; ``channels`` is the block width C.
        num_classes (int): mask classes (1 = class agnostic).
        mode (str): "implicit" (fixed point, implicit gradient) or "explicit" (weight sharing, K-unroll).
        num_unroll (int): K of the explicit model, of the warm-up and of the fallback.
        pretrain_steps (int): implicit model: training iterations (``EventStorage.iter``) spent in the explicit
            K-unroll before switching to the implicit solve. Test time is always implicit.
        num_groups (int): GroupNorm groups in the block.
        weight_norm (bool): weight-normalise the block's convs.
        jac_loss_weight (float): weight of the Jacobian-regularisation loss ``loss_ifr_jac`` (0 = off).
        deq (DEQFixedPoint): solver settings of the implicit model (default: Broyden, 15 evaluations; needs
            torchdeq); the explicit model has none.
        loss_weight, vis_period: as ``BaseMaskRCNNHead``.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes: int, mode: str = "implicit", num_unroll: int = 4,
                 pretrain_steps: int = 0, num_groups: int = 4, weight_norm: bool = True,
                 jac_loss_weight: float = 0.0, deq: Optional[DEQFixedPoint] = None, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("implicit", "explicit"):
            raise ValueError(f"MODEL.IFR.MODE must be 'implicit' or 'explicit', got {mode!r}")
        if num_unroll < 1:
            raise ValueError(f"MODEL.IFR.NUM_UNROLL must be >= 1, got {num_unroll}")
        channels = input_shape.channels
        self.mode, self.num_unroll, self.pretrain_steps = mode, int(num_unroll), int(pretrain_steps)
        self.jac_loss_weight = float(jac_loss_weight)
        self.block = IFRBlock(channels, num_groups=num_groups, weight_norm=weight_norm)
        # the explicit (weight-sharing) model solves nothing, so it needs no DEQ layer (nor torchdeq)
        self.deq = None if mode == "explicit" else (deq if deq is not None else DEQFixedPoint())
        self.deconv = ConvTranspose2d(channels, channels, kernel_size=2, stride=2, padding=0)
        self.predictor = nn.Conv2d(channels, num_classes, kernel_size=1)
        weight_init.c2_msra_fill(self.deconv)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)
        self._jac_loss = None
        self._logged_switch = False
        self._test_stats = []  # DEQStats of the test-time solves not yet logged, see log_test_stats

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        c = cfg.MODEL.IFR
        ret.update(
            input_shape=input_shape,
            num_classes=1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            mode=c.MODE, num_unroll=c.NUM_UNROLL, pretrain_steps=c.PRETRAIN_STEPS, num_groups=c.NUM_GROUPS,
            weight_norm=c.WEIGHT_NORM, jac_loss_weight=c.JAC_LOSS_WEIGHT,
            deq=build_ifr_deq(cfg) if c.MODE == "implicit" else None,
        )
        return ret

    def use_implicit(self) -> bool:
        """Whether this call solves for the fixed point (else the explicit K-unroll)."""
        if self.mode == "explicit":
            return False
        if not self.training:
            return True
        it = _current_iter()
        return it is None or it >= self.pretrain_steps

    def _log(self, kind: str, s: DEQStats):
        if not self.training:
            if s.num_rows and not is_tracing_or_exporting():
                self._test_stats.append(s)
            return
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        p = "ifr/fwd_" if kind == "forward" else "ifr/bwd_"
        storage.put_scalar(p + "nstep", s.nstep)
        if s.abs_residual == s.abs_residual:  # not NaN (NaN when every RoI fell back)
            storage.put_scalar(p + "residual", s.abs_residual)
            storage.put_scalar(p + "residual_rel", s.rel_residual)
        storage.put_scalar("ifr/fallbacks" if kind == "forward" else "ifr/bwd_fallbacks", s.fallbacks)

    def log_test_stats(self) -> Optional[str]:
        """Log (and forget) the statistics of the test-time solves since the last call: solves, RoIs, mean f
        evaluations, mean final relative and absolute residual, fallbacks. Called by ``train()``, i.e. at the end of
        detectron2's ``inference_on_dataset`` (its ``inference_context`` restores the model's mode on exit), so
        every evaluation ends with one such line. Returns the line (None when nothing was solved)."""
        stats, self._test_stats = self._test_stats, []
        if not stats:
            return None
        rows = sum(s.num_rows for s in stats)
        finite = [s for s in stats if s.rel_residual == s.rel_residual]  # NaN when every RoI fell back
        mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
        msg = (f"IFRMaskHead test-time solves: {len(stats)} solves of {rows} RoIs, "
               f"{mean([s.nstep for s in stats]):.2f} f evaluations on average ({self.deq.f_solver_test}, "
               f"at most {self.deq.f_max_iter_test}), "
               f"final residual {mean([s.rel_residual for s in finite]):.3g} relative / "
               f"{mean([s.abs_residual for s in finite]):.3g} absolute on average, "
               f"{sum(s.fallbacks for s in stats)} RoIs fell back to the explicit unroll "
               f"({sum(s.diverged for s in stats)} diverged).")
        logger.info(msg)
        return msg

    def train(self, mode: bool = True):
        self.log_test_stats()
        return super().train(mode)

    def refine(self, x: torch.Tensor) -> torch.Tensor:
        """Refined RoI features z (Tensor[N, C, H, W]) from x (Tensor[N, C, H, W]), computed in fp32."""
        implicit = self.use_implicit()
        if self.training:
            try:
                get_event_storage().put_scalar("ifr/implicit", float(implicit))
            except AssertionError:
                pass
            if implicit and not self._logged_switch and self.mode == "implicit":
                logger.info("IFRMaskHead: implicit fixed-point refinement from iteration %s on.", _current_iter())
                self._logged_switch = True
        self._jac_loss = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            with cached_parametrizations(self.block):
                if not implicit:
                    return explicit_unroll(self.block, x, self.num_unroll)

                def fallback():
                    with torch.no_grad():
                        return explicit_unroll(self.block, x, self.num_unroll)

                want_jac = self.training and self.jac_loss_weight > 0
                out = self.deq(lambda z: self.block(z, x), torch.zeros_like(x), fallback_fn=fallback,
                               writer=self._log, return_jac_loss=want_jac)
                if want_jac:
                    out, self._jac_loss = out
                return out

    def layers(self, x):
        z = self.refine(x)
        return self.predictor(torch.relu(self.deconv(z)))

    def forward(self, x, instances):
        out = super().forward(x, instances)
        if self.training and self.jac_loss_weight > 0:
            jac = self._jac_loss if self._jac_loss is not None else x.sum() * 0.0
            out["loss_ifr_jac"] = jac * self.jac_loss_weight
        return out
