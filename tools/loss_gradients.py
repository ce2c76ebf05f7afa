#!/usr/bin/env python
"""How much of the shared parameters' gradient each loss of a multi-task model contributes.

For a config and its weights (none: the initialisation), runs a few training batches and takes the gradient of
one loss (``--loss``) and of all the others together w.r.t. the parameters whose names start with ``--prefix``
(default ``backbone``: what a method's extra head shares with the detector), each with ``torch.autograd.grad``;
prints the median and maximum ratio of their norms per parameter, and how often the config's gradient clipping
(``SOLVER.CLIP_GRADIENTS``) acts with and without that loss: type ``norm`` / ``value``, the parameter gradients
(of ``--prefix``) whose norm / largest entry exceeds CLIP_VALUE; type ``full_model``, the batches whose total
gradient norm over the whole model exceeds it (what d2_refine/solver/build.py clips).

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
    from torch.nn.utils import get_total_norm

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer, setup_cfg
    from d2_refine.solver import FULL_MODEL

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
    clip_type = clip.CLIP_TYPE if clip.ENABLED else None
    limit = clip.CLIP_VALUE if clip_type else None
    # the whole model's trainable parameters: full_model clipping acts on the norm of all their gradients
    everything = [p for p in model.parameters() if p.requires_grad] if clip_type == FULL_MODEL else []
    model.train()
    data = iter(Trainer.build_train_loader(cfg))
    ratios, over_without, over_with, totals_without, totals_with = [], 0, 0, [], []
    by_name = {}  # parameter -> its ratios over the batches
    with EventStorage(0):
        for _ in range(args.batches):
            losses = model(next(data))
            if args.loss not in losses:
                raise SystemExit(f"{args.loss!r} is not a loss of this model: {', '.join(sorted(losses))}")
            rest = sum(v for k, v in losses.items() if k != args.loss)
            tensors = [p for _, p in params] + everything
            g_rest = torch.autograd.grad(rest, tensors, retain_graph=True, allow_unused=True)
            g_loss = torch.autograd.grad(losses[args.loss], tensors, allow_unused=True)
            if clip_type == FULL_MODEL:
                pairs = [(a, b) for a, b in zip(g_rest[len(params):], g_loss[len(params):])
                         if a is not None or b is not None]
                without = [a if a is not None else torch.zeros_like(b) for a, b in pairs]
                totals_without.append(float(get_total_norm(without, clip.NORM_TYPE)))
                totals_with.append(float(get_total_norm([w + b if b is not None else w
                                                         for w, (_, b) in zip(without, pairs)], clip.NORM_TYPE)))
                over_without += totals_without[-1] > limit
                over_with += totals_with[-1] > limit
            for (name, p), a, b in zip(params, g_rest, g_loss):
                a = torch.zeros_like(p) if a is None else a
                b = torch.zeros_like(p) if b is None else b
                if float(a.norm()) > 0:
                    ratios.append(float(b.norm() / a.norm()))
                    by_name.setdefault(name, []).append(ratios[-1])
                if clip_type in ("norm", "value"):
                    size = (lambda g: float(g.norm(clip.NORM_TYPE))) if clip_type == "norm" else \
                        (lambda g: float(g.abs().max()) if g.numel() else 0.0)
                    over_without += size(a) > limit
                    over_with += size(a + b) > limit
    out = dict(config=args.config_file, weights=args.weights or None, loss=args.loss, prefix=args.prefix,
               parameters=len(params), batches=args.batches, median_ratio=statistics.median(ratios),
               max_ratio=max(ratios), clip_type=clip_type, clip_norm=limit,
               over_clip_without=over_without if clip_type else None, over_clip_with=over_with if clip_type else None,
               total_norm_without=totals_without or None, total_norm_with=totals_with or None,
               top=[dict(name=n, median_ratio=m) for n, m in
                    sorted(((n, statistics.median(r)) for n, r in by_name.items()), key=lambda nm: -nm[1])[:args.top]])
    print(f"{len(params)} parameters '{args.prefix}*' x {args.batches} batches: |grad {args.loss}| / |grad of the "
          f"other losses| median {out['median_ratio']:.2f}, max {out['max_ratio']:.2f}"
          + (f"; batches whose total gradient norm exceeds the full-model clipping norm {limit}: {over_without} "
             f"without {args.loss}, {over_with} with it (of {args.batches})" if clip_type == FULL_MODEL else
             f"; parameter gradients over the per-parameter clipping {clip_type} {limit}: {over_without} without "
             f"{args.loss}, {over_with} with it" if clip_type else "; no gradient clipping in this config"))
    for t in out["top"]:
        print(f"  {t['name']}: median ratio {t['median_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
