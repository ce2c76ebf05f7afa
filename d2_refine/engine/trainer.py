"""The trainer used by train_net.py for every method: detectron2's DefaultTrainer + COCO evaluation, exact resume,
and several CPU processes (gloo)."""
import contextlib
import functools
import os

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as _d2_defaults
from detectron2.utils import comm

from ..solver import build_optimizer
from .evaluator import D2RefineCOCOEvaluator
from .resume import ExactResumeHook


@contextlib.contextmanager
def _ddp_without_device_ids():
    """DefaultTrainer wraps the model with ``create_ddp_model(model, ...)``, which passes ``device_ids=[local rank]``:
    right for a GPU model, refused by DistributedDataParallel for a CPU one. While constructing a CPU trainer with
    several processes, the wrapper gets ``device_ids=None`` (the only change; restored on exit)."""
    original = _d2_defaults.create_ddp_model
    _d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        cpu_ddp = comm.get_world_size() > 1 and cfg.MODEL.DEVICE == "cpu"
        with _ddp_without_device_ids() if cpu_ddp else contextlib.nullcontext():
            super().__init__(cfg)

    def build_hooks(self):
        """detectron2's hooks + :class:`ExactResumeHook` when SOLVER.EXACT_RESUME (generator states in checkpoints,
        fast-forward of the data on resume)."""
        hooks = super().build_hooks()
        return hooks + [ExactResumeHook()] if self.cfg.SOLVER.EXACT_RESUME else hooks

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer; ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` clips the gradient norm of the
        whole model (d2_refine/solver/build.py)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOEvaluator (bbox, and segm when the model predicts masks) for any COCO-format dataset."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return D2RefineCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
