#!/usr/bin/env python
"""How much of the shared parameters' gradient each loss of a multi-task model contributes.

For a config and its weights (none: the initialisation), runs a few training batches and takes the gradient of
one loss (``--loss``) and of all the others together w.r.t. the parameters whose names start with ``--prefix``
(default ``backbone``: what a method's extra head shares with the detector), each with ``torch.autograd.grad``;
prints the median and maximum ratio of their norms per parameter, and how many parameter gradients exceed
the config's per-parameter clipping norm (``SOLVER.CLIP_GRADIENTS``, type ``norm``) with and without that loss.

    python tools/loss_gradients.py --config-file configs/IoUNet/iounet_R_18_FPN_shapes.yaml --loss loss_iou SEED 2
    python tools/loss_gradients.py --config-file configs/IoUNet/iounet_R_18_FPN_shapes.yaml --loss loss_iou \\
        --weights output/benchmark_table/2000it/seed2/iounet/model_final.pth SEED 2
"""
import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--loss", required=True, help="the loss whose share is measured, e.g. loss_iou")
    p.add_argument("--weights", default="", help="checkpoint (default: the initialisation of SEED)")
    p.add_argument("--prefix", default="backbone", help="parameters whose names start with this (default: %(default)s)")
    p.add_argument("--batches", type=int, default=3, help="training batches (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="name this many parameters with the largest ratio")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config options")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer, setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    prepare_datasets(cfg)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    model = Trainer.build_model(cfg)
    if args.weights:
        DetectionCheckpointer(model).load(args.weights)
    params = [(n, p) for n, p in model.named_parameters() if n.startswith(args.prefix) and p.requires_grad]
    if not params:
        raise SystemExit(f"no trainable parameter's name starts with {args.prefix!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    limit = clip.CLIP_VALUE if clip.ENABLED and clip.CLIP_TYPE == "norm" else None
    model.train()
    data = iter(Trainer.build_train_loader(cfg))
    ratios, over_without, over_with = [], 0, 0
    by_name = {}  # parameter -> its ratios over the batches
    with EventStorage(0):
        for _ in range(args.batches):
            losses = model(next(data))
            if args.loss not in losses:
                raise SystemExit(f"{args.loss!r} is not a loss of this model: {', '.join(sorted(losses))}")
            rest = sum(v for k, v in losses.items() if k != args.loss)
            tensors = [p for _, p in params]
            g_rest = torch.autograd.grad(rest, tensors, retain_graph=True, allow_unused=True)
            g_loss = torch.autograd.grad(losses[args.loss], tensors, allow_unused=True)
            for (name, p), a, b in zip(params, g_rest, g_loss):
                a = torch.zeros_like(p) if a is None else a
                b = torch.zeros_like(p) if b is None else b
                if float(a.norm()) > 0:
                    ratios.append(float(b.norm() / a.norm()))
                    by_name.setdefault(name, []).append(ratios[-1])
                if limit is not None:
                    over_without += float(a.norm()) > limit
                    over_with += float((a + b).norm()) > limit
    out = dict(config=args.config_file, weights=args.weights or None, loss=args.loss, prefix=args.prefix,
               parameters=len(params), batches=args.batches, median_ratio=statistics.median(ratios),
               max_ratio=max(ratios), clip_norm=limit, over_clip_without=over_without if limit else None,
               over_clip_with=over_with if limit else None,
               top=[dict(name=n, median_ratio=m) for n, m in
                    sorted(((n, statistics.median(r)) for n, r in by_name.items()), key=lambda nm: -nm[1])[:args.top]])
    print(f"{len(params)} parameters '{args.prefix}*' x {args.batches} batches: |grad {args.loss}| / |grad of the "
          f"other losses| median {out['median_ratio']:.2f}, max {out['max_ratio']:.2f}"
          + (f"; over the clipping norm {limit}: {over_without} without {args.loss}, {over_with} with it"
             if limit is not None else "; no per-parameter norm clipping in this config"))
    for t in out["top"]:
        print(f"  {t['name']}: median ratio {t['median_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
