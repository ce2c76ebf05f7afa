#!/usr/bin/env python
"""The one table a user reads first: per method, the verdict against its baseline trained from scratch and from
the pretrained R-18 trunk, side by side, with the paper's reported gain, then each paper's claim and whether either
regime reproduces it in direction; written from the two results records alone (no checkpoint, no detectron2). A
record that does not exist reads "not run". With ``--only``, a method README's table instead: those models and
their baselines in both regimes (box / mask AP, Δ, verdict, inference time).

    python tools/verdict_table.py --readme README.md
    python tools/verdict_table.py --only iounet --readme projects/IoUNet/README.md
    python tools/verdict_table.py --scratch docs/results/shapes_2000it.json --finetune docs/results/shapes_finetune.json
"""
import argparse
import os
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the d2_refine of this checkout, also when it is not installed

from d2_refine.benchmark import claims, report  # noqa: E402
from d2_refine.benchmark.entries import ENTRY_BY_NAME, ROW_ORDER, rows_with_baselines  # noqa: E402
from d2_refine.benchmark.record import default_results_path, load_results  # noqa: E402
from d2_refine.benchmark.stats import summarize  # noqa: E402

START, END = "<!-- verdict_table:start -->", "<!-- verdict_table:end -->"


def load(path: str) -> Optional[dict]:
    """The results record at ``path``; None where it does not exist."""
    if not os.path.isfile(path):
        return None
    try:
        return load_results(path)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=default_results_path(2000), help="the from-scratch record")
    p.add_argument("--finetune", default=default_results_path(2000, "finetune"), help="the pretrained-trunk record")
    p.add_argument("--only", nargs="+", metavar="MODEL", choices=sorted(ENTRY_BY_NAME),
                   help="a method README's table: these models (and their baselines and variants) in both regimes")
    p.add_argument("--readme", default=None, help=f"put the table between {START} and {END} in this file")
    args = p.parse_args(argv)
    command = "python tools/verdict_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sources = {k: report.relative(getattr(args, k), REPO) for k in ("scratch", "finetune")}
    docs = {k: load(getattr(args, k)) for k in ("scratch", "finetune")}
    records = {k: (d or {}).get("records", []) for k, d in docs.items()}
    if args.only:
        keep = rows_with_baselines(args.only)
        names = [n for n in ROW_ORDER if n in keep]
        parts = [(k, summarize(records[k]), docs[k]) for k in ("scratch", "finetune")]
        table = report.method_markdown(parts, names, command.strip(), sources)
    else:
        table = report.verdict_markdown(summarize(records["scratch"]), summarize(records["finetune"]),
                                        command.strip(), sources, {k: (d or {}).get("iters") for k, d in docs.items()})
        table += "\n" + claims.markdown(records["scratch"], records["finetune"])
    if args.readme:
        report.embed(args.readme, table, START, END)
    print(table)
    return table


if __name__ == "__main__":
    main()
