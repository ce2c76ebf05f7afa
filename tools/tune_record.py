#!/usr/bin/env python
"""Record `train_net.py` runs made to choose a setting on `shapes_tune` into one JSON: per run, its final COCO results,
the command line it was trained with (from its log), its schedule, and the commit of the code that trained it.

    python tools/tune_record.py output/tune/* --commit 4aa814a --out docs/results/finetune_recipe_tune.json \
        --note "what was compared and why"

A run is a folder with detectron2's `log.txt` and `metrics.json`; a folder without results is reported as not
finished and left out. The evaluation split is read from the run's config (`config.yaml`): runs not evaluated on
`shapes_tune` are refused, since choices are made there only.
"""
import argparse
import ast
import json
import os
import re
import shlex
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from d2_refine.benchmark.logs import final_results, train_speed  # noqa: E402
from d2_refine.benchmark.record import now  # noqa: E402


def run_record(folder: str, commit: str) -> dict:
    """The record of one run folder (ValueError with one line if it cannot be one)."""
    log, cfg_file = os.path.join(folder, "log.txt"), os.path.join(folder, "config.yaml")
    results = final_results(os.path.join(folder, "metrics.json"))
    if results is None or not os.path.isfile(log) or not os.path.isfile(cfg_file):
        raise ValueError(f"{folder}: not finished (no final COCO results, log.txt or config.yaml)")
    with open(log) as f:
        found = re.search(r"Command line arguments: (Namespace\(.*\))", f.read())
    with open(cfg_file) as f:
        test = list(yaml.safe_load(f)["DATASETS"]["TEST"])
    if test != ["shapes_tune"]:
        raise ValueError(f"{folder}: evaluated on {test}, not on shapes_tune alone")
    args = found.group(1) if found else None
    opts = ast.literal_eval(re.search(r"opts=(\[.*?\])", args).group(1)) if args else []
    config = re.search(r"config_file='([^']*)'", args).group(1) if args else None
    return {"run": os.path.basename(os.path.normpath(folder)), "config": config, "opts": opts,
            "command": f"python train_net.py --config-file {config} --resume "
                       + " ".join(shlex.quote(str(o).replace(REPO + os.sep, "")) for o in opts),
            "commit": commit, "s_per_it": train_speed(log), "results": results}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR of each train_net.py run)")
    p.add_argument("--commit", required=True, help="commit of the code the runs were trained from")
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="", help="what was compared, and the choice made from it")
    args = p.parse_args(argv)
    records = []
    for folder in sorted(args.runs):
        try:
            records.append(run_record(folder, args.commit))
        except ValueError as e:
            print(f"skipped: {e}")
    doc = {"command": "python tools/tune_record.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "written": now(),
           "split": "shapes_tune", "note": args.note, "records": records}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for r in records:
        bbox, segm = r["results"].get("bbox", {}), r["results"].get("segm", {})
        print(f"{r['run']}: box AP {bbox.get('AP', float('nan')):.1f}, mask AP {segm.get('AP', float('nan')):.1f}")
    return doc


if __name__ == "__main__":
    main()
