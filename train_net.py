#!/usr/bin/env python
"""Train or evaluate any d2_refine model (every method is selected by its config alone).

    python train_net.py --config-file configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <output>/model_final.pth
    python train_net.py --config-file <cfg> --num-gpus 8 SOLVER.IMS_PER_BATCH 16
"""
import sys

from d2_refine.utils.env import MissingDetectron2Error, require_detectron2


def setup(args):
    from detectron2.engine import default_setup

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    prepare_datasets(cfg)
    return cfg


def main(args):
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_refine.engine import Trainer

    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    try:
        require_detectron2("train_net.py")
        from detectron2.engine import default_argument_parser, launch

        import d2_refine  # noqa: F401  (registers every component)
        from d2_refine.engine import ConfigError, setup_cfg
    except MissingDetectron2Error as e:
        sys.exit(f"error: {e}")
    args = default_argument_parser().parse_args()
    try:
        setup_cfg(args.config_file, args.opts)  # fail here, in one line, before any worker starts
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
