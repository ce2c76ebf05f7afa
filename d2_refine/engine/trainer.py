"""The trainer used by train_net.py for every method: detectron2's DefaultTrainer + COCO evaluation, test-time
augmentation (TEST.AUG), exact resume, and several CPU processes (gloo)."""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import CheckedDatasetMapper, DatasetError
from ..solver import build_optimizer
from .checks import CheckedCheckpointer, check_amp
from .evaluator import D2RefineCOCOEvaluator
from .resume import ExactResumeHook


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        """DefaultTrainer's constructor (detectron2/engine/defaults.py: the same objects, built in the same order by
        the same overridable builders), except for the DistributedDataParallel wrapper of a CPU model.

        DefaultTrainer wraps the model with ``create_ddp_model(model, broadcast_buffers=False)``, which passes
        ``device_ids=[local rank]``: right for a GPU model, refused by DistributedDataParallel for a CPU one (several
        CPU processes with gloo). The alternatives were to replace detectron2's ``create_ddp_model`` module global
        while ``DefaultTrainer.__init__`` runs (a patch of another package, visible to every thread meanwhile) or to
        wrap the model after it (impossible: the constructor fails first). Writing the constructor here costs a
        dozen lines that call detectron2's public builders only, and passes ``device_ids=None`` on the CPU. Its
        checkpointer is :class:`CheckedCheckpointer` (one line for a checkpoint file it cannot read); AMP off CUDA
        is refused first (:func:`check_amp`), before the model and the data are built."""
        check_amp(cfg)
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_device_kwargs(cfg))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = CheckedCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """detectron2's hooks + an evaluation with test-time augmentation after the last iteration when
        TEST.AUG.ENABLED (after the plain one, before the writers, as detectron2's tools/train_net.py adds it) +
        :class:`ExactResumeHook` when SOLVER.EXACT_RESUME (generator states in checkpoints, fast-forward of the
        data on resume)."""
        ret = super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:
            writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            ret.insert(writers[0] if writers else len(ret), hooks.EvalHook(0, self._test_with_TTA_and_save))
        return ret + [ExactResumeHook()] if self.cfg.SOLVER.EXACT_RESUME else ret

    def _test_with_TTA_and_save(self):
        res = self.test_with_TTA(self.cfg, self.model)
        # DefaultTrainer.train checks _last_eval_results against TEST.EXPECTED_RESULTS: the TTA results with the rest
        self._last_eval_results = OrderedDict(getattr(self, "_last_eval_results", None) or {}, **res)
        return res

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` (a GeneralizedRCNN, see :func:`~d2_refine.engine.check_test_aug`) wrapped in
        detectron2's GeneralizedRCNNWithTTA (TEST.AUG: MIN_SIZES x FLIP, boxes merged by NMS, masks averaged) on
        DATASETS.TEST; results are keyed "<task>_TTA" and written to OUTPUT_DIR/inference_TTA."""
        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA",
                                                                                name))
                      for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    @classmethod
    def evaluate(cls, cfg, model):
        """What ``--eval-only`` runs, as detectron2's tools/train_net.py: :meth:`test`, then :meth:`test_with_TTA`
        when TEST.AUG.ENABLED, then (main process) ``verify_results`` against TEST.EXPECTED_RESULTS."""
        res = cls.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(cls.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader, with :class:`CheckedDatasetMapper` (one line naming an unreadable image), and
        one :class:`DatasetError` line when no image is left to train on."""
        try:
            return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))
        except AssertionError as e:  # detectron2's get_detection_dataset_dicts, after it drops the empty images
            if "No valid data found" not in str(e):
                raise
            raise DatasetError(f"DATASETS.TRAIN {', '.join(cfg.DATASETS.TRAIN)}: no image to train on: every image "
                               "has no annotation or only crowd ones (DATALOADER.FILTER_EMPTY_ANNOTATIONS drops "
                               "them from training)") from None

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, with :class:`CheckedDatasetMapper`."""
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

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


def ddp_device_kwargs(cfg) -> dict:
    """Extra arguments of ``create_ddp_model`` for the model's device: ``device_ids=None`` on the CPU (any spelling,
    "cpu" or "cpu:0"; DistributedDataParallel refuses device ids for a CPU model), none otherwise (detectron2 then
    passes the local rank)."""
    return {"device_ids": None} if torch.device(cfg.MODEL.DEVICE).type == "cpu" else {}
