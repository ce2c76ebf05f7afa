#!/usr/bin/env python
"""IFR's test-time solve: accuracy and cost at several solver budgets, and the default chosen from them.

The implicit mask head solves for its fixed point at test time with ``MODEL.IFR.F_SOLVER_TEST`` (empty: the
training solver) and at most ``MODEL.IFR.F_MAX_ITER_TEST`` f evaluations (Broyden, 15 in the paper, Sec. 4.1);
neither changes training. This tool scores one trained IFR checkpoint with each
(solver, budget) pair on ``shapes_tune`` -- a held-out split of its own seed, never ``shapes_val`` -- and
picks the cheapest setting whose mask AP is within ``--within`` (0.3) of the best one there. It then scores the
chosen setting, the paper's setting and the Mask R-CNN baseline on ``shapes_val`` in the same process, so the
cost ratio compares like with like (batch 1, the median over the images of one pass, after 3 warm-up images).

    OMP_NUM_THREADS=1 python tools/ifr_test_budget.py \\
        --weights output/benchmark_table/2000it/seed1/ifr/model_final.pth \\
        --baseline-weights output/benchmark_table/2000it/seed1/mask_rcnn/model_final.pth \\
        --json docs/results/ifr_test_budget.json

Writes ``--json`` (every setting: box and mask AP, ms/img, f evaluations per solve, fallbacks; the choice; the
val rows) and prints a Markdown table.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IFR_CONFIG = os.path.join(REPO, "configs", "IFR", "ifr_mask_rcnn_R_18_FPN_shapes.yaml")
BASELINE_CONFIG = os.path.join(REPO, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes.yaml")
PAPER = ("broyden", 15)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="IFR (implicit) checkpoint")
    p.add_argument("--config", default=IFR_CONFIG, help="its config (default: %(default)s)")
    p.add_argument("--baseline-weights", help="Mask R-CNN checkpoint timed next to IFR on shapes_val")
    p.add_argument("--baseline-config", default=BASELINE_CONFIG)
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 15], help="F_MAX_ITER_TEST values")
    p.add_argument("--solvers", nargs="+", default=["broyden", "anderson"], choices=["broyden", "anderson",
                                                                                      "fixed_point"])
    p.add_argument("--within", type=float, default=0.3, help="mask AP below the best that still counts as level")
    p.add_argument("--tune-images", type=int, default=300, help="images of shapes_tune (DATASETS.SHAPES.NUM_TUNE)")
    p.add_argument("--val-images", type=int, default=0, help="images of shapes_val (0: the config's 300)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--output-dir", default=os.path.join(REPO, "output", "ifr_test_budget"),
                   help="the evaluators' files (default: %(default)s)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config options for every model")
    return p.parse_args(argv)


def build(config, weights, opts):
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer, setup_cfg

    cfg = setup_cfg(config, opts)
    prepare_datasets(cfg)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    return cfg, model


def score(cfg, model, dataset, out_dir, warmup=3):
    """COCO results of ``model`` on ``dataset`` and its median ms/img (batch 1, after ``warmup`` images), with
    the IFR head's test-time solver statistics where it has one."""
    import torch

    from d2_refine.benchmark.timer import time_call
    from d2_refine.engine import Trainer

    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = Trainer.build_evaluator(cfg, dataset, out_dir)
    evaluator.reset()
    head = getattr(model.roi_heads, "mask_head", None)
    solving = hasattr(head, "_test_stats")  # IFRMaskHead keeps one DEQStats per test-time solve
    if solving:
        head._test_stats = []
    times = []
    with torch.no_grad():
        for inputs in loader:
            outputs, seconds = time_call(model, inputs, device=cfg.MODEL.DEVICE)
            times.append(seconds)
            evaluator.process(inputs, outputs)
    res = evaluator.evaluate()
    solve = None
    if solving:
        st, head._test_stats = head._test_stats, []
        rows = sum(s.num_rows for s in st)
        solve = dict(solves=len(st), rois=rows,
                     f_evals_mean=statistics.fmean(s.nstep for s in st) if st else None,
                     fallbacks=sum(s.fallbacks for s in st))
    ms = statistics.median(times[warmup:] if len(times) > warmup else times) * 1e3
    return dict(bbox=res["bbox"]["AP"], segm=res["segm"]["AP"], ms_per_img=round(ms, 1), images=len(times),
                solve=solve)


def choose(rows, within):
    """The cheapest (lowest ms/img) row whose mask AP is within ``within`` of the best mask AP."""
    best = max(r["segm"] for r in rows)
    level = [r for r in rows if r["segm"] >= best - within]
    return min(level, key=lambda r: r["ms_per_img"]), best


def markdown(doc):
    lines = ["| model | solver | F_MAX_ITER_TEST | split | box AP | mask AP | ms/img | f evals / solve | fallbacks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["tune"] + doc["val"]:
        s = r.get("solve") or {}
        fe = f"{s['f_evals_mean']:.2f}" if s.get("f_evals_mean") is not None else "–"
        lines.append(f"| {r.get('model', 'ifr')} | {r.get('solver', '–')} | {r.get('budget', '–')} | "
                     f"{r['split']} | {r['bbox']:.2f} | "
                     f"{r['segm']:.2f} | {r['ms_per_img']:.1f} | {fe} | {s.get('fallbacks', '–')} |")
    c = doc["chosen"]
    lines.append("")
    lines.append(f"chosen on shapes_tune: {c['solver']} {c['budget']} (best mask AP there {doc['best_tune_segm']:.2f}, "
                 f"level = within {doc['within']}); on shapes_val: {doc['ratio_vs_mask_rcnn']}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from d2_refine.benchmark.record import git_commit

    torch.set_num_threads(args.num_threads)
    sizes = ["DATASETS.SHAPES.NUM_TUNE", str(args.tune_images)]
    if args.val_images:
        sizes += ["DATASETS.SHAPES.NUM_VAL", str(args.val_images)]
    common = [*sizes, "DATASETS.TEST", "('shapes_tune', 'shapes_val')", *args.opts]
    out = args.output_dir
    tune = []
    for solver in args.solvers:
        for budget in args.budgets:
            opts = [*common, "MODEL.IFR.F_SOLVER_TEST", solver, "MODEL.IFR.F_MAX_ITER_TEST", str(budget)]
            cfg, model = build(args.config, args.weights, opts)
            r = dict(solver=solver, budget=budget, split="shapes_tune",
                     **score(cfg, model, "shapes_tune", os.path.join(out, f"{solver}_{budget}")))
            print(json.dumps(r), flush=True)
            tune.append(r)
    chosen, best = choose(tune, args.within)
    val = []
    settings = [(chosen["solver"], chosen["budget"])] + ([PAPER] if PAPER != (chosen["solver"], chosen["budget"])
                                                         else [])
    for solver, budget in settings:
        opts = [*common, "MODEL.IFR.F_SOLVER_TEST", solver, "MODEL.IFR.F_MAX_ITER_TEST", str(budget)]
        cfg, model = build(args.config, args.weights, opts)
        val.append(dict(model="ifr", solver=solver, budget=budget, split="shapes_val",
                        **score(cfg, model, "shapes_val", os.path.join(out, f"val_{solver}_{budget}"))))
        print(json.dumps(val[-1]), flush=True)
    ratio = None
    if args.baseline_weights:
        cfg, model = build(args.baseline_config, args.baseline_weights, common)
        val.append(dict(model="mask_rcnn", split="shapes_val", **score(cfg, model, "shapes_val",
                                                                         os.path.join(out, "val_mask_rcnn"))))
        print(json.dumps(val[-1]), flush=True)
        base = val[-1]["ms_per_img"]
        ratio = {f"{r['solver']} {r['budget']}": round(r["ms_per_img"] / base, 2) for r in val if r["model"] == "ifr"}
    doc = dict(command="python tools/ifr_test_budget.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               weights=args.weights, baseline_weights=args.baseline_weights, code=git_commit(),
               within=args.within, tune=tune, chosen=dict(solver=chosen["solver"], budget=chosen["budget"]),
               best_tune_segm=best, val=val, ratio_vs_mask_rcnn=ratio,
               machine=dict(host=platform.node(), threads=args.num_threads, torch=torch.__version__,
                            cpu_count=os.cpu_count(), load=list(os.getloadavg())),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
