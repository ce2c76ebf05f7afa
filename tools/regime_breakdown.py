#!/usr/bin/env python
"""Where each method's Δ comes from, in both regimes: the paired Δ to its baseline (same seed) of AP at each IoU
threshold and object size, box and mask, from scratch and from the pretrained trunk; and each baseline's spread
over seeds. The evidence beside the verdict table (tools/verdict_table.py) when a regime moves a verdict: a gain
made at high IoU only (localisation), or on small objects only, reads differently from one spread evenly.
Written from the two results records alone (no checkpoint, no detectron2).

    python tools/regime_breakdown.py --embed docs/results/regimes.md
    python tools/regime_breakdown.py --metrics AP AP50 AP90 --task segm
"""
import argparse
import os
import sys
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the d2_refine of this checkout, also when it is not installed

from d2_refine.benchmark import report  # noqa: E402
from d2_refine.benchmark.entries import ENTRY_BY_NAME, ROW_ORDER, entry_of, row_title  # noqa: E402
from d2_refine.benchmark.record import default_results_path, load_results  # noqa: E402
from d2_refine.benchmark.stats import by_model, mean_std, metric, paired_delta  # noqa: E402

START, END = "<!-- regime_breakdown:start -->", "<!-- regime_breakdown:end -->"
METRICS = ["AP", "AP50", "AP75", "AP90", "APs", "APm", "APl"]
REGIMES = report.REGIME_WORDS


def runs_by_model(path: str) -> Dict[str, Dict[int, dict]]:
    """{model: {seed: record}} of the record at ``path``; {} where it does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        return by_model(load_results(path)["records"])
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None


def delta_rows(regimes: Dict[str, Dict[str, Dict[int, dict]]], task: str, metrics: Sequence[str]) -> List[list]:
    """One row per (method, regime) with a paired seed: method, regime, seeds, then Δ mean ± std per metric."""
    rows = []
    for name in ROW_ORDER:
        base = entry_of(name).baseline
        if base is None:
            continue
        for regime, runs in regimes.items():
            if name not in runs or base not in runs:
                continue
            deltas = [paired_delta(runs[name], runs[base], task, m) for m in metrics]
            n = max((d["n"] for d in deltas if d), default=0)
            if n == 0:
                continue
            rows.append([row_title(name), REGIMES[regime], n] + [report.fmt_stat(d, n, sign=True) for d in deltas])
    return rows


def spread_rows(regimes: Dict[str, Dict[str, Dict[int, dict]]], task: str) -> List[list]:
    """Each baseline's AP over its seeds per regime: mean ± std, and the seeds' range."""
    rows = []
    for name in ROW_ORDER:
        if name not in ENTRY_BY_NAME or ENTRY_BY_NAME[name].baseline is not None:
            continue
        for regime, runs in regimes.items():
            values = [v for v in (metric(r, task) for r in (runs.get(name) or {}).values()) if v is not None]
            if not values:
                continue
            s = mean_std(values)
            rows.append([row_title(name), REGIMES[regime], s["n"], report.fmt_stat(s, s["n"]),
                         f"{min(values):.1f} – {max(values):.1f}"])
    return rows


def markdown(regimes, tasks: Sequence[str], metrics: Sequence[str], command: str, sources: Sequence[str]) -> str:
    lines = [f"Written from {', '.join(f'`{s}`' for s in sources)} by:", "", "```bash", command, "```", "",
             "Δ: the method's metric minus its baseline's, trained with the same seed, mean ± std over the paired "
             "seeds (n); AP50 … AP90: AP at one IoU threshold; APs / APm / APl: AP over small / medium / large "
             "objects (COCO's area ranges).", ""]
    for task in tasks:
        rows = delta_rows(regimes, task, metrics)
        if not rows:
            continue
        lines += [f"**{'Box' if task == 'bbox' else 'Mask'} AP, paired Δ**", ""]
        lines += report.table(["method", "regime", "n"] + [f"Δ {m}" for m in metrics], rows) + [""]
    spread = spread_rows(regimes, "bbox")
    if spread:
        lines += ["**Baselines' box AP over seeds**", ""]
        lines += report.table(["baseline", "regime", "seeds", "box AP", "range"], spread) + [""]
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=default_results_path(2000), help="the from-scratch record")
    p.add_argument("--finetune", default=default_results_path(2000, "finetune"), help="the pretrained-trunk record")
    p.add_argument("--task", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--metrics", nargs="+", default=METRICS)
    p.add_argument("--embed", default=None, help=f"put the tables between {START} and {END} in this file")
    args = p.parse_args(argv)
    command = ("python tools/regime_breakdown.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    regimes = {k: runs_by_model(getattr(args, k)) for k in REGIMES}
    sources = [report.relative(getattr(args, k), REPO) for k in REGIMES]
    text = markdown(regimes, args.task, args.metrics, command, sources)
    if args.embed:
        report.embed(args.embed, text, START, END)
    print(text)
    return text


if __name__ == "__main__":
    main()
