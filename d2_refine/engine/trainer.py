"""The trainer used by train_net.py for every method: detectron2's DefaultTrainer + COCO evaluation."""
import os

from detectron2.engine import DefaultTrainer

from .evaluator import D2RefineCOCOEvaluator


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOEvaluator (bbox, and segm when the model predicts masks) for any COCO-format dataset."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return D2RefineCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
