#!/usr/bin/env python
"""How well a method fits the training set against its baseline of the same seed, loss by loss.

Reads detectron2's ``metrics.json`` of each run of a benchmark campaign (``tools/benchmark_table.py``'s
``<campaign>/seed<S>/<model>/``), averages every loss the two models share (``loss_*``; not ``total_loss``, which
adds the method's own losses) over iteration windows, and prints, per loss and window, the method's mean and its
baseline's for each seed with the relative difference, and on how many seeds the method's is the lower. A loss that
one of the two logs as 0 at every iteration of a window is switched off there (e.g. by a loss weight of 0) and is
left out of that window. Only the run folders are read: no model, no detectron2.

``--against`` reads each method beside other models instead of its baseline (an ablation beside the full
method). A run whose folder is gone (run folders live in ``output/``, which does not travel between machines) is
read from ``--reference``: an earlier ``--json`` of this tool that holds its means over the same windows; each row
says where its two means came from.

    python tools/training_losses.py output/benchmark_table/finetune_1000it --models ifr internet_l2 fpt_lite \\
        --seeds 1 2 3 --windows 400:600 900:1000 --json docs/results/training_losses_finetune.json
    python tools/training_losses.py output/benchmark_table/finetune_1000it --models internet_makeup \\
        --against mask_rcnn internet_l2 --seeds 1 2 --windows 400:600 900:1000 \\
        --reference docs/results/training_losses_finetune.json
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
    p.add_argument("--against", nargs="+", choices=sorted(ENTRY_BY_NAME), metavar="MODEL",
                   help="read each method beside these models instead of its baseline")
    p.add_argument("--reference", metavar="JSON",
                   help="an earlier --json of this tool: the means of runs whose folder is missing")
    p.add_argument("--json", help="also write the figures here, with the command and the commit")
    return p.parse_args(argv)


def window_means(rows, window):
    """Each loss's mean over the logged iterations in ``window`` (detectron2 logs a windowed median every 20)."""
    lo, hi = window
    inside = [r for r in rows if "iteration" in r and lo <= r["iteration"] < hi]
    keys = sorted({k for r in inside for k in r if k.startswith("loss_")})
    return {k: statistics.mean(r[k] for r in inside if k in r) for k in keys}


def load_reference(path):
    """``{(model, seed, window): {loss: mean}}`` from an earlier ``--json`` of this tool (both sides of each row)."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    out = {}
    for r in rows:
        w = tuple(r["window"])
        out.setdefault((r["model"], r["seed"], w), {})[r["loss"]] = r["method"]
        out.setdefault((r["baseline"], r["seed"], w), {})[r["loss"]] = r["base"]
    return out


def _means(campaign, name, seed, windows, reference):
    """Per window, each loss's mean of one run: from its ``metrics.json``, else from the reference; and where
    they came from ("run" or "reference")."""
    path = os.path.join(campaign, f"seed{seed}", name, "metrics.json")
    rows = read_metrics(path)
    if any(k.startswith("loss_") for r in rows for k in r):
        means = {w: window_means(rows, w) for w in windows}
        for w, m in means.items():
            if not m:
                raise SystemExit(f"{path}: no logged iteration in {w[0]}:{w[1]}")
        return means, "run"
    if reference:
        means = {w: reference.get((name, seed, w), {}) for w in windows}
        if all(means.values()):
            return means, "reference"
    raise SystemExit(f"{path}: no training losses (missing, or not a detectron2 run)"
                     + (", and the reference has none of this run over these windows" if reference else ""))


def compare(campaign, model, seeds, windows, against=None, reference=None):
    """Per window, loss and seed: the method's mean, the mean of its baseline (or of each model of
    ``against``), and the relative difference. A loss whose mean is 0 in either run (logged as 0 at every
    iteration of the window: switched off) has no row."""
    out = []
    for other in against or [ENTRY_BY_NAME[model].baseline]:
        if other == model:
            raise SystemExit(f"--against {other}: the method itself")
        for seed in seeds:
            (mine, src), (theirs, other_src) = (_means(campaign, n, seed, windows, reference)
                                                for n in (model, other))
            for w in windows:
                for loss in sorted(set(mine[w]) & set(theirs[w])):
                    a, b = mine[w][loss], theirs[w][loss]
                    if a == 0 or b == 0:  # losses are positive while they are on
                        continue
                    out.append(dict(model=model, baseline=other, seed=seed, window=list(w), loss=loss, method=a,
                                    base=b, rel=(a - b) / b, source=[src, other_src]))
    return out


def _groups(rows):
    """The rows by (model, baseline, window, loss), each group in seed order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["baseline"], tuple(r["window"]), r["loss"]), []).append(r)
    return groups


def _summary(groups):
    return [dict(model=m, baseline=b, window=list(w), loss=loss, seeds=[r["seed"] for r in g],
                 rel=[r["rel"] for r in g], lower=sum(r["rel"] < 0 for r in g))
            for (m, b, w, loss), g in groups.items()]


def summary(rows):
    """Per (model, baseline, window, loss): the relative differences over the seeds and how many are below zero."""
    return _summary(_groups(rows))


def main(argv=None):
    args = parse_args(argv)
    reference = load_reference(args.reference) if args.reference else None
    rows = [r for m in args.models
            for r in compare(args.campaign, m, args.seeds, args.windows, args.against, reference)]
    groups = _groups(rows)
    summarized = _summary(groups)
    for s, group in zip(summarized, groups.values()):
        per = ", ".join(f"{r['method']:.3f}/{r['base']:.3f} ({r['rel']:+.0%})" for r in group)
        print(f"{s['model']} vs {s['baseline']}, iterations {s['window'][0]}-"
              f"{s['window'][1] - 1}, {s['loss']}: seeds {s['seeds']}: {per}; lower on {s['lower']} of "
              f"{len(s['seeds'])}")
    if args.json:
        command = "python tools/training_losses.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        with open(args.json, "w") as f:
            json.dump(dict(command=command, code=git_commit(), rows=rows, summary=summarized), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
