"""``build_optimizer``: detectron2's, plus ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"``.

detectron2's ``CLIP_TYPE "norm"`` clips the gradient norm of each parameter tensor on its own. Detectors trained
with mmdetection's ``grad_clip=dict(max_norm=35, norm_type=2)`` (RDSNet among them) clip the norm of all
gradients together, as ``torch.nn.utils.clip_grad_norm_(model.parameters(), 35)``: every gradient is scaled by
the same factor, so their directions relative to each other are kept. ``"full_model"`` does that, with
``CLIP_VALUE`` as the maximum norm and ``NORM_TYPE`` as the norm, just before each optimizer step (after AMP's
unscaling: ``GradScaler.step`` unscales before it calls ``step``).
"""
import torch

__all__ = ["FULL_MODEL", "build_optimizer", "clip_full_model_gradient_norm"]

#: the CLIP_TYPE value handled here (detectron2 knows "value" and "norm")
FULL_MODEL = "full_model"


def clip_full_model_gradient_norm(optimizer: torch.optim.Optimizer, max_norm: float,
                                  norm_type: float = 2.0) -> torch.optim.Optimizer:
    """Make ``optimizer`` (in place, and returned) clip the total gradient norm of all its parameters to
    ``max_norm`` at every ``step``. Its state dict (hence checkpoints) is unchanged."""
    if not max_norm > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for {FULL_MODEL!r} clipping, got {max_norm}")
    base = type(optimizer)

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithFullModelGradientClip", (base,), {"step": step})
    return optimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's ``build_optimizer(cfg, model)``; with ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` (and
    ``ENABLED``) its optimizer clips the norm of all gradients together instead of each parameter's."""
    from detectron2.solver import build_optimizer as d2_build_optimizer

    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return d2_build_optimizer(cfg, model)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False  # detectron2 does not know "full_model": the clip is added below
    return clip_full_model_gradient_norm(d2_build_optimizer(cfg, model), clip.CLIP_VALUE, clip.NORM_TYPE)
