#!/usr/bin/env python
"""How well a method fits the training set against its baseline of the same seed, loss by loss.

Reads detectron2's ``metrics.json`` of each run of a benchmark campaign (``tools/benchmark_table.py``'s
``<campaign>/seed<S>/<model>/``), averages every loss the two models share (``loss_*``; not ``total_loss``, which
adds the method's own losses) over iteration windows, and prints, per loss and window, the method's mean and its
baseline's for each seed with the relative difference, and on how many seeds the method's is the lower. Only the
run folders are read: no model, no detectron2.

    python tools/training_losses.py output/benchmark_table/finetune_1000it --models ifr internet_l2 fpt_lite \\
        --seeds 1 2 3 --windows 400:600 900:1000 --json docs/results/training_losses_finetune.json
"""
import argparse
import json
import os
import shlex
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2_refine.benchmark.entries import ENTRY_BY_NAME  # noqa: E402
from d2_refine.benchmark.logs import read_metrics  # noqa: E402
from d2_refine.benchmark.record import git_commit  # noqa: E402


def _window(text):
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window is FIRST:END (iterations, END excluded), not {text!r}")
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"window {text!r}: need 0 <= FIRST < END")
    return lo, hi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", help="the campaign's folder: <campaign>/seed<S>/<model>/metrics.json")
    p.add_argument("--models", nargs="+", required=True, choices=sorted(n for n, e in ENTRY_BY_NAME.items()
                                                                          if e.baseline),
                   help="methods, each read beside its baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--windows", type=_window, nargs="+", default=[(900, 1000)], metavar="FIRST:END",
                   help="iteration windows to average over (default: 900:1000)")
    p.add_argument("--json", help="also write the figures here, with the command and the commit")
    return p.parse_args(argv)


def window_means(rows, window):
    """Each loss's mean over the logged iterations in ``window`` (detectron2 logs a windowed median every 20)."""
    lo, hi = window
    inside = [r for r in rows if "iteration" in r and lo <= r["iteration"] < hi]
    keys = sorted({k for r in inside for k in r if k.startswith("loss_")})
    return {k: statistics.mean(r[k] for r in inside if k in r) for k in keys}


def compare(campaign, model, seeds, windows):
    """Per window, loss and seed: the method's mean, its baseline's, and the relative difference."""
    baseline = ENTRY_BY_NAME[model].baseline
    out = []
    for seed in seeds:
        runs = {}
        for name in (model, baseline):
            path = os.path.join(campaign, f"seed{seed}", name, "metrics.json")
            runs[name] = read_metrics(path)
            if not any(k.startswith("loss_") for r in runs[name] for k in r):
                raise SystemExit(f"{path}: no training losses (missing, or not a detectron2 run)")
        for w in windows:
            mine, theirs = window_means(runs[model], w), window_means(runs[baseline], w)
            if not mine or not theirs:
                raise SystemExit(f"{model} / {baseline} seed {seed}: no logged iteration in {w[0]}:{w[1]}")
            for loss in sorted(set(mine) & set(theirs)):
                out.append(dict(model=model, baseline=baseline, seed=seed, window=list(w), loss=loss,
                                method=mine[loss], base=theirs[loss],
                                rel=(mine[loss] - theirs[loss]) / theirs[loss] if theirs[loss] else None))
    return out


def _groups(rows):
    """The rows by (model, window, loss), each group in seed order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], tuple(r["window"]), r["loss"]), []).append(r)
    return groups


def _summary(groups):
    return [dict(model=m, window=list(w), loss=loss, seeds=[r["seed"] for r in g],
                 rel=[r["rel"] for r in g], lower=sum(r["rel"] is not None and r["rel"] < 0 for r in g))
            for (m, w, loss), g in groups.items()]


def summary(rows):
    """Per (model, window, loss): the relative differences over the seeds and how many are below zero."""
    return _summary(_groups(rows))


def main(argv=None):
    args = parse_args(argv)
    rows = [r for m in args.models for r in compare(args.campaign, m, args.seeds, args.windows)]
    groups = _groups(rows)
    summarized = _summary(groups)
    for s, group in zip(summarized, groups.values()):
        per = ", ".join(f"{r['method']:.3f}/{r['base']:.3f} ("
                        + (f"{r['rel']:+.0%}" if r["rel"] is not None else "baseline 0") + ")" for r in group)
        print(f"{s['model']} vs {ENTRY_BY_NAME[s['model']].baseline}, iterations {s['window'][0]}-"
              f"{s['window'][1] - 1}, {s['loss']}: seeds {s['seeds']}: {per}; lower on {s['lower']} of "
              f"{len(s['seeds'])}")
    if args.json:
        command = "python tools/training_losses.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        with open(args.json, "w") as f:
            json.dump(dict(command=command, code=git_commit(), rows=rows, summary=summarized), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
