#!/usr/bin/env python
"""The one table a user reads first: per method, the verdict against its baseline trained from scratch and from
the pretrained R-18 trunk, side by side, with the paper's reported gain, then each paper's claim and whether either
regime reproduces it in direction; written from the two results records alone (no checkpoint, no detectron2). A
record that does not exist reads "not run".

    python tools/verdict_table.py --readme README.md
    python tools/verdict_table.py --scratch docs/results/shapes_2000it.json --finetune docs/results/shapes_finetune.json
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the d2_refine of this checkout, also when it is not installed

from d2_refine.benchmark import claims, report  # noqa: E402
from d2_refine.benchmark.record import default_results_path, load_results  # noqa: E402
from d2_refine.benchmark.stats import summarize  # noqa: E402

START, END = "<!-- verdict_table:start -->", "<!-- verdict_table:end -->"


def records_of(path: str):
    """The records of the results file at ``path`` and its schedule (iterations); [], None where it does not
    exist."""
    if not os.path.isfile(path):
        return [], None
    try:
        doc = load_results(path)
        return doc["records"], doc.get("iters")
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=default_results_path(2000), help="the from-scratch record")
    p.add_argument("--finetune", default=default_results_path(2000, "finetune"), help="the pretrained-trunk record")
    p.add_argument("--readme", default=None, help=f"put the table between {START} and {END} in this file")
    args = p.parse_args(argv)
    command = "python tools/verdict_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sources = {k: report.relative(getattr(args, k), REPO) for k in ("scratch", "finetune")}
    (scratch, scratch_iters), (finetune, finetune_iters) = records_of(args.scratch), records_of(args.finetune)
    table = report.verdict_markdown(summarize(scratch), summarize(finetune), command.strip(), sources,
                                    {"scratch": scratch_iters, "finetune": finetune_iters})
    table += "\n" + claims.markdown(scratch, finetune)
    if args.readme:
        report.embed(args.readme, table, START, END)
    print(table)
    return table


if __name__ == "__main__":
    main()
