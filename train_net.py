#!/usr/bin/env python
"""Train or evaluate any d2_refine model (every method is selected by its config alone).

    python train_net.py --config-file configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <output>/model_final.pth
    python train_net.py --config-file <cfg> --num-gpus 8 SOLVER.IMS_PER_BATCH 16
"""
import argparse
import os
import sys

from d2_refine.utils.env import MissingDetectron2Error, require_detectron2


def get_parser():
    """detectron2's ``default_argument_parser`` arguments (same names and defaults), built here so that ``--help``
    works before detectron2 is imported, or where it is missing."""
    p = argparse.ArgumentParser(description="Train or evaluate a d2_refine model (detectron2's train_net arguments).",
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    p.add_argument("--resume", action="store_true",
                   help="resume from the last checkpoint of OUTPUT_DIR (see DefaultTrainer.resume_or_load)")
    p.add_argument("--eval-only", action="store_true", help="perform evaluation only (needs MODEL.WEIGHTS)")
    p.add_argument("--num-gpus", type=int, default=1, help="number of gpus *per machine*")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)")
    # detectron2's fixed per-user port: a port left occupied shows orphan processes of an earlier run
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    p.add_argument("--dist-url", default=f"tcp://127.0.0.1:{port}",
                   help="initialization URL for pytorch distributed backend")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="config options as space-separated KEY VALUE pairs, e.g. MODEL.WEIGHTS <file>")
    return p


def setup(args):
    from detectron2.engine import default_setup
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    # default_setup sets up detectron2's and fvcore's loggers; d2_refine's own lines (IFR's solver statistics after
    # each evaluation, the resume message) go to the same console and log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_refine", abbrev_name="d2r")
    prepare_datasets(cfg)
    return cfg


def main(args):
    from d2_refine.engine import CheckedCheckpointer, Trainer

    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        CheckedCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.evaluate(cfg, model)  # + TEST.AUG (keys "<task>_TTA"), checked against TEST.EXPECTED_RESULTS
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    """Parse, check the config, weights, test-time augmentation, the model's config values and datasets (one line
    for each usual mistake, before any worker starts), then launch :func:`main` on every process."""
    args = get_parser().parse_args(argv)
    try:
        require_detectron2("train_net.py")
    except MissingDetectron2Error as e:
        sys.exit(f"error: {e}")
    from detectron2.engine import launch

    import d2_refine  # noqa: F401  (registers every component)
    from d2_refine.data import DatasetError, check_datasets
    from d2_refine.engine import ConfigError, check_amp, check_model, check_test_aug, check_weights, setup_cfg

    try:
        cfg = setup_cfg(args.config_file, args.opts)
        check_weights(cfg, eval_only=args.eval_only, resume=args.resume)
        check_test_aug(cfg)
        if not args.eval_only:
            check_amp(cfg)
        check_model(cfg)
        check_datasets(cfg, train=not args.eval_only)
    except (ConfigError, DatasetError) as e:
        sys.exit(f"error: {e}")
    print("Command Line Args:", args)
    try:  # an image or a json that cannot be read, a checkpoint that cannot be loaded: in one process
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except DatasetError as e:
        sys.exit(f"error: {DatasetError.line(e)}")
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
