#!/usr/bin/env python
"""Train (or evaluate the checkpoints of) every method and its baseline on `shapes` with one schedule and seed,
and write one Markdown results table.

    python tools/benchmark_table.py --iters 400 --readme README.md          # train all, then embed the table
    python tools/benchmark_table.py --iters 400 --only mask_rcnn fpt_lite   # a subset
    python tools/benchmark_table.py --iters 400 --eval-only                 # re-score existing checkpoints

Each model is trained by `train_net.py` itself (a subprocess, so its progress and logs are the usual ones) in
`<output-dir>/<iters>it/<name>/`; a model whose `model_final.pth` exists there is not trained again. Scores come
from the COCOEvaluator run at the end of training (its `metrics.json`), or from a fresh evaluation for
`--eval-only` and for the variants evaluated with the same weights (e.g. RDSNet + MBRM). Inference time is
measured here, batch 1, on the first `--timing-images` val images after a warm-up.
"""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- benchmark_table:start -->", "<!-- benchmark_table:end -->"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    title: str
    config: str
    baseline: Optional[str] = None
    # extra KEY VALUE opts that depend on the schedule (e.g. IFR's warm-up is a fraction of it)
    opts: Callable[[int], List[str]] = lambda iters: []
    # name -> (title, KEY VALUE opts): evaluated with this entry's weights, no training
    variants: Dict[str, tuple] = dataclasses.field(default_factory=dict)


ENTRIES = [
    Entry("mask_rcnn", "Mask R-CNN (FPN)", "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml"),
    Entry("faster_rcnn", "Faster R-CNN (FPN)", "configs/Baselines/faster_rcnn_R_18_FPN_shapes.yaml"),
    Entry("retinanet", "RetinaNet (FPN)", "configs/Baselines/retinanet_R_18_FPN_shapes.yaml"),
    Entry("iounet", "IoU-Net (IoU-NMS + refinement)", "configs/IoUNet/iounet_R_18_FPN_shapes.yaml", "faster_rcnn"),
    Entry("fpt_lite", "Mask R-CNN + FPT `fpt_lite`", "configs/FPT/mask_rcnn_fpt_lite_R_18_shapes.yaml", "mask_rcnn"),
    Entry("fpt_paper", "Mask R-CNN + FPT `fpt_paper`", "configs/FPT/mask_rcnn_fpt_paper_R_18_shapes.yaml",
          "mask_rcnn"),
    Entry("ifr", "Mask R-CNN + IFR (implicit)", "configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml", "mask_rcnn",
          # the paper's plain-head warm-up: 50k of its 90k iterations
          opts=lambda iters: ["MODEL.IFR.PRETRAIN_STEPS", str(round(iters * 5 / 9))]),
    Entry("internet_l2", "Mask R-CNN + InterNet (l2)", "configs/InterNet/internet_l2_R_18_FPN_shapes.yaml",
          "mask_rcnn"),
    Entry("internet_ot", "Mask R-CNN + InterNet (ot)", "configs/InterNet/internet_ot_R_18_FPN_shapes.yaml",
          "mask_rcnn"),
    Entry("rdsnet", "RDSNet", "configs/RDSNet/rdsnet_R_18_FPN_shapes.yaml", "retinanet",
          variants={"rdsnet_mbrm": ("RDSNet + MBRM (same weights)", ["MODEL.RDSNET.MBRM.ENABLED", "True"])}),
]
ENTRY_BY_NAME = {e.name: e for e in ENTRIES}
METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("bbox", "APs"), ("segm", "AP")]


def schedule_opts(iters: int, seed: int) -> List[str]:
    """The shapes schedule (2,000 iterations: warm-up 200, decay at 75 % and 90 %) scaled to ``iters``."""
    if iters < 10:
        raise ValueError(f"--iters must be at least 10, got {iters}")
    steps = (round(iters * 0.75), round(iters * 0.9))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps), "SOLVER.WARMUP_ITERS", str(iters // 10),
            "SOLVER.CHECKPOINT_PERIOD", str(iters), "SEED", str(seed)]


def final_results(metrics_json: str) -> Optional[Dict[str, Dict[str, float]]]:
    """The COCO results of the evaluation at the end of training, from detectron2's ``metrics.json``."""
    if not os.path.isfile(metrics_json):
        return None
    last = None
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if line and '"bbox/AP"' in line:
                last = json.loads(line)
    if last is None:
        return None
    out: Dict[str, Dict[str, float]] = {}
    for key, value in last.items():
        task, _, metric = key.partition("/")
        if task in ("bbox", "segm") and metric:
            out.setdefault(task, {})[metric] = float(value)
    return out


def train_speed(log_txt: str) -> Optional[float]:
    """Seconds per iteration of the last training logged in ``log.txt`` (detectron2's 'Overall training speed')."""
    if not os.path.isfile(log_txt):
        return None
    found = re.findall(r"Overall training speed: \d+ iterations in \S+ \(([\d.]+) s / it\)", open(log_txt).read())
    return float(found[-1]) if found else None


def run_opts(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str] = ()) -> List[str]:
    """The KEY VALUE options of one model: the common schedule, the entry's own, the user's, the output folder."""
    return [*schedule_opts(iters, seed), *entry.opts(iters), *extra, "OUTPUT_DIR", out_dir]


def train(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str], num_threads: Optional[int]):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, entry.config),
           *run_opts(entry, out_dir, iters, seed, extra)]
    print(f"  $ {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def evaluate(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str], timing_images: int,
             score: bool):
    """Load ``model_final.pth``; return (COCO results or None, inference ms/img, parameters in millions)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer, setup_cfg

    opts = [*run_opts(entry, out_dir, iters, seed, extra), "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
    cfg = setup_cfg(os.path.join(REPO, entry.config), opts)
    prepare_datasets(cfg)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    results = None
    if score:
        results = {k: dict(v) for k, v in Trainer.test(cfg, model).items()}
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    times = []
    cuda = cfg.MODEL.DEVICE.startswith("cuda")  # kernels run asynchronously: wait for them around the timer
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= timing_images + 3:
                break
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(inputs)
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t0)
    ms = 1000 * sorted(times)[len(times) // 2] if times else float("nan")
    return results, ms, params


def fmt(x, digits=1):
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def markdown(rows: List[dict], iters: int, seed: int, command: str) -> str:
    head = ("| model | baseline | box AP | AP50 | AP75 | APs | mask AP | Δ box AP | train s/it | inference ms/img "
            "| params (M) |")
    lines = [f"Schedule: {iters} iterations × 4 images from scratch (seed {seed}), scored by COCOEvaluator on "
             f"`shapes_val` (300 images). Produced by:", "", "```bash", command, "```", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        res = r["results"] or {}
        vals = [res.get(task, {}).get(metric) for task, metric in METRICS]
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        delta = None
        if base and base["results"] and res.get("bbox"):
            delta = res["bbox"]["AP"] - base["results"]["bbox"]["AP"]
        delta_s = "–" if delta is None else f"{delta:+.1f}"
        lines.append(f"| {r['title']} | {base['title'] if base else '–'} | " + " | ".join(fmt(v) for v in vals)
                     + f" | {delta_s} | {fmt(r['s_per_iter'], 2)} | {fmt(r['ms_per_img'], 0)} | "
                     f"{fmt(r['params_m'], 1)} |")
    return "\n".join(lines) + "\n"


def embed(readme: str, table: str) -> None:
    text = open(readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to put the table between")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(before + START + "\n" + table + END + after)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000, help="training iterations of every model (default: 2000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=sorted(ENTRY_BY_NAME), help="these models (and their baselines)")
    p.add_argument("--output-dir", default=os.path.join(REPO, "output", "benchmark_table"))
    p.add_argument("--eval-only", action="store_true", help="score existing checkpoints, never train")
    p.add_argument("--timing-images", type=int, default=50)
    p.add_argument("--num-threads", type=int, default=None, help="OMP_NUM_THREADS of the training processes")
    p.add_argument("--out", default=None, help="the Markdown table (default: <output-dir>/<iters>it/table.md)")
    p.add_argument("--readme", default=None, help=f"also put the table between {START} and {END} in this file")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE options added to every model's config (after the schedule)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from d2_refine.utils.env import require_detectron2

    require_detectron2("tools/benchmark_table.py")
    names = list(args.only or ENTRY_BY_NAME)
    for n in list(names):  # a method is always scored next to its baseline
        b = ENTRY_BY_NAME[n].baseline
        if b and b not in names:
            names.insert(0, b)
    entries = [e for e in ENTRIES if e.name in names]
    root = os.path.join(args.output_dir, f"{args.iters}it")
    rows = []
    for i, e in enumerate(entries, 1):
        out_dir = os.path.join(root, e.name)
        ckpt = os.path.join(out_dir, "model_final.pth")
        fresh = final_results(os.path.join(out_dir, "metrics.json"))
        if os.path.isfile(ckpt):
            print(f"[{i}/{len(entries)}] {e.name}: using {ckpt}", flush=True)
        elif args.eval_only:
            raise SystemExit(f"--eval-only: no checkpoint {ckpt}; train it first (drop --eval-only)")
        else:
            print(f"[{i}/{len(entries)}] {e.name}: training {args.iters} iterations", flush=True)
            train(e, out_dir, args.iters, args.seed, args.opts, args.num_threads)
            fresh = final_results(os.path.join(out_dir, "metrics.json"))
        score = args.eval_only or fresh is None
        results, ms, params = evaluate(e, out_dir, args.iters, args.seed, args.opts, args.timing_images, score)
        row = dict(name=e.name, title=e.title, baseline=e.baseline, config=e.config, results=results or fresh,
                   s_per_iter=train_speed(os.path.join(out_dir, "log.txt")), ms_per_img=ms, params_m=params)
        rows.append(row)
        print(f"  {e.name}: box AP {fmt((row['results'] or {}).get('bbox', {}).get('AP'))}", flush=True)
        for vname, (vtitle, vopts) in e.variants.items():
            vres, vms, _ = evaluate(e, out_dir, args.iters, args.seed, [*args.opts, *vopts], args.timing_images, True)
            rows.append(dict(row, name=vname, title=vtitle, results=vres, ms_per_img=vms))
    command = "python tools/benchmark_table.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    table = markdown(rows, args.iters, args.seed, command.strip())
    out = args.out or os.path.join(root, "table.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(dict(iters=args.iters, seed=args.seed, rows=rows), f, indent=1)
    if args.readme:
        embed(args.readme, table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
