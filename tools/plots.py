#!/usr/bin/env python
"""Regenerate the README figures (PNG, matplotlib's Agg backend) from the JSON the benchmark tools write.

    python tools/plots.py                                   # every figure whose JSON exists, into docs/figures/
    python tools/plots.py --only ifr_memory --ifr-memory-json output/benchmarks/ifr_memory.json

Figures and their inputs (a figure whose JSON is missing is skipped with a message naming the command to run):

- ``ap_vs_iou.png``: box AP at each single IoU threshold (AP50, AP60, ... whichever the table has) of IoU-Net
  (and of any ``--ap-methods``) next to its same-schedule baseline, from ``tools/benchmark_table.py``'s
  ``table.json`` (default: the longest schedule under ``output/benchmark_table/``).
- ``ifr_memory.png``: IFR head training memory against solver depth (explicit K-unroll vs implicit solves),
  peak allocator memory and tensors saved for backward, from ``benchmarks/ifr_memory.py --json``.
- ``ops_ratios.png``: time ratio ours / baseline of each op benchmark case, from ``benchmarks/ops.py --json``.
- ``delta_vs_baseline.png``: per method, the paired Δ box AP and Δ mask AP to its baseline (same seed), mean ±
  std over the seeds, from the results record of ``tools/benchmark_table.py`` (default: the longest schedule
  in ``docs/results/shapes_<iters>it.json``); the aggregation is d2_refine.benchmark.stats's.
"""
import argparse
import glob
import json
import os
import re
import sys
import textwrap
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("ap_vs_iou", "ifr_memory", "ops_ratios", "delta_vs_baseline")
COMMANDS = {
    "ap_vs_iou": "python tools/benchmark_table.py --iters N",
    "ifr_memory": "python benchmarks/ifr_memory.py --json output/benchmarks/ifr_memory.json",
    "ops_ratios": "python benchmarks/ops.py --json output/benchmarks/ops.json",
    "delta_vs_baseline": "python tools/benchmark_table.py --iters N --seeds 1 2 3",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def default_table_json(root: str = os.path.join(REPO, "output", "benchmark_table")) -> Optional[str]:
    """``<root>/<iters>it/table.json`` of the longest schedule present, or None."""
    return _longest(os.path.join(root, "*it", "table.json"), lambda p: os.path.basename(os.path.dirname(p)))


def default_results_json(root: str = os.path.join(REPO, "docs", "results")) -> Optional[str]:
    """``<root>/shapes_<iters>it.json`` of the longest schedule present, or None."""
    return _longest(os.path.join(root, "shapes_*it.json"), lambda p: os.path.basename(p)[len("shapes_"):-5])


def _longest(pattern: str, schedule_of) -> Optional[str]:
    found = []
    for path in glob.glob(pattern):
        m = re.fullmatch(r"(\d+)it", schedule_of(path))
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------ AP vs IoU
def iou_thresholds(bbox: Dict[str, float]) -> List[int]:
    """The single-threshold AP keys of a results dict ("AP50" -> 50), sorted."""
    return sorted(int(m.group(1)) for k in bbox for m in [re.fullmatch(r"AP(\d{2})", k)] if m)


def plot_ap_vs_iou(table: dict, out: str, methods=("iounet",)) -> str:
    """One panel per method: box AP against the IoU threshold, the method next to its baseline."""
    rows = {r["name"]: r for r in table["rows"]}
    pairs = []
    for name in methods:
        if name not in rows:
            raise ValueError(f"{name!r} is not a row of the table (rows: {sorted(rows)})")
        base = rows[name].get("baseline")
        if base not in rows:
            raise ValueError(f"the baseline {base!r} of {name!r} is not a row of the table")
        pairs.append((rows[name], rows[base]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.8), squeeze=False)
    for ax, (row, base) in zip(axes[0], pairs):
        for r, style in ((base, dict(color="0.45", marker="s", linestyle="--")),
                         (row, dict(color="C3", marker="o", linestyle="-"))):
            bbox = ((r.get("results") or {}).get("bbox")) or {}
            ts = iou_thresholds(bbox)
            if not ts:
                raise ValueError(f"row {r['name']!r} has no single-threshold box AP (AP50, AP75, ...)")
            mean = f", AP {bbox['AP']:.1f}" if isinstance(bbox.get("AP"), (int, float)) else ""
            ax.plot([t / 100 for t in ts], [bbox[f"AP{t}"] for t in ts], label=f"{r['title']}{mean}", **style)
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel("box AP")
        ax.set_title(f"{row['title']} vs its baseline", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = table.get("seeds", [table.get("seed", "?")])
    fig.suptitle(f"shapes val, {table.get('iters', '?')} iterations, seed(s) {', '.join(map(str, seeds))}"
                 + (" (mean over seeds)" if len(seeds) > 1 else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------- IFR memory
def plot_ifr_memory(data: dict, out: str) -> str:
    """Peak training memory and saved-for-backward memory against depth (K or T), one line per variant."""
    series: Dict[str, list] = {}
    for r in data["rows"]:
        label = "explicit (K-unroll)" if r["mode"] == "explicit" else f"implicit, {r['solver']}"
        series.setdefault(label, []).append(r)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    implicit_colors = iter(["C0", "C1", "C2", "C4", "C5", "C6"])
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["depth"])
        style = dict(color="C3", marker="o", linewidth=2) if label.startswith("explicit") else \
            dict(color=next(implicit_colors), marker="s")
        for ax, key in zip(axes, ("peak_mib", "saved_mib")):
            ax.plot([r["depth"] for r in rs], [r[key] for r in rs], label=label, **style)
    titles = ("peak memory of one training iteration", "tensors saved for backward (implicit solvers coincide)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("solver depth (explicit: K steps, implicit: T solver iterations)")
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"IFR mask head, {data.get('num_rois', '?')} RoIs x {data.get('channels', '?')} x 14 x 14, "
                 f"{data.get('device', '')}, torch {data.get('torch', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------- op ratios
def plot_ops_ratios(data: dict, out: str) -> str:
    """Horizontal bars of ours / baseline per case (log scale; left of 1 = ours faster)."""
    rows = data["rows"]
    if not rows:
        raise ValueError("the op benchmark JSON has no rows")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.4))
    labels = ["\n".join(textwrap.wrap(r["case"], 60)) for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = ["C0" if r["case"].startswith("prroi_pool") else "C2" for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, ratios, color=colors)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    for yi, ratio in zip(y, ratios):
        ax.annotate(f"{ratio:.2f}x", (ratio, yi), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("time ours / baseline (log scale; < 1: ours faster)")
    ax.set_xlim(min(ratios + [1.0]) / 2, max(ratios + [1.0]) * 3)
    ax.set_title(f"d2_refine ops vs baselines: {data.get('device', '?')}, torch {data.get('torch', '?')}",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------- Δ vs baseline
def plot_delta(results: dict, out: str) -> str:
    """Per method (a row with a baseline that has runs), Δ box AP and Δ mask AP to the baseline with the same
    seed: mean with ± one standard deviation over the seeds as error bars (a hollow marker: one seed, no bar)."""
    from d2_refine.benchmark.stats import summarize

    rows = [r for r in summarize(results["records"]) if r["delta"].get("bbox")]
    if not rows:
        raise ValueError("the results record has no method with a baseline run of the same seed")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.62 * len(rows) + 1.9))
    y = list(range(len(rows)))[::-1]
    for task, label, color, marker, dy in (("bbox", "Δ box AP", "C0", "o", 0.13),
                                           ("segm", "Δ mask AP", "C1", "s", -0.13)):
        drawn = [(yi + dy, r["delta"][task]) for yi, r in zip(y, rows) if r["delta"].get(task)]
        if not drawn:
            continue
        ys, ds = [p[0] for p in drawn], [p[1] for p in drawn]
        ax.errorbar([d["mean"] for d in ds], ys, xerr=[d["std"] or 0.0 for d in ds], fmt=marker, color=color,
                    capsize=4, label=label)
        single = [(d["mean"], yy) for d, yy in zip(ds, ys) if d["n"] == 1]
        if single:  # one seed: hollow, no spread
            ax.scatter(*zip(*single), marker=marker, facecolor="white", edgecolor=color, zorder=3)
    for yi, r in zip(y, rows):
        d = r["delta"]["bbox"]
        ax.annotate(f"{r['verdict']} (n={d['n']})", (1.0, yi), xycoords=("axes fraction", "data"),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0.0, color="0.3", linewidth=1)
    ax.set_ylim(-0.6, len(rows) - 0.4)  # each row's band around its tick, whatever the number of rows
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['title']}\nvs {r['baseline_title']}".replace("`", "") for r in rows], fontsize=8)
    ax.set_xlabel("AP difference to the baseline, same seed (points; bars: ± 1 std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    seeds = sorted({s for r in rows for s in r["seeds"]})
    ax.set_title(f"shapes val, {results.get('iters', '?')} iterations, seeds {', '.join(map(str, seeds))}; "
                 "hollow: one seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-json", default=None,
                   help="tools/benchmark_table.py's table.json (default: the longest schedule under "
                        "output/benchmark_table/)")
    p.add_argument("--ifr-memory-json", default=os.path.join(REPO, "output", "benchmarks", "ifr_memory.json"))
    p.add_argument("--ops-json", default=os.path.join(REPO, "output", "benchmarks", "ops.json"))
    p.add_argument("--results-json", default=None,
                   help="tools/benchmark_table.py's results record (default: the longest schedule in docs/results/)")
    p.add_argument("--ap-methods", nargs="+", default=["iounet"],
                   help="table rows drawn next to their baselines in ap_vs_iou.png (default: iounet)")
    p.add_argument("--out-dir", default=os.path.join(REPO, "docs", "figures"))
    p.add_argument("--only", nargs="+", choices=(*FIGURES, "delta"), default=list(FIGURES),
                   help="these figures (delta: delta_vs_baseline)")
    args = p.parse_args(argv)
    args.only = ["delta_vs_baseline" if f == "delta" else f for f in args.only]
    return args


def main(argv=None) -> Dict[str, str]:
    """Writes the figures; returns {figure: PNG path} of those written."""
    args = parse_args(argv)
    table_json = args.table_json or default_table_json()
    inputs = {"ap_vs_iou": table_json, "ifr_memory": args.ifr_memory_json, "ops_ratios": args.ops_json,
              "delta_vs_baseline": args.results_json or default_results_json()}
    plotters = {
        "ap_vs_iou": lambda data, out: plot_ap_vs_iou(data, out, args.ap_methods),
        "ifr_memory": plot_ifr_memory,
        "ops_ratios": plot_ops_ratios,
        "delta_vs_baseline": plot_delta,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    written = {}
    for fig in args.only:
        path = inputs[fig]
        if not path or not os.path.isfile(path):
            print(f"skipped {fig}.png: its JSON {path or '(none found)'} is missing; "
                  f"write it with `{COMMANDS[fig]}`", file=sys.stderr)
            continue
        out = plotters[fig](_load(path), os.path.join(args.out_dir, f"{fig}.png"))
        print(f"wrote {out} (from {path})")
        written[fig] = out
    return written


if __name__ == "__main__":
    main()
