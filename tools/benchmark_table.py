#!/usr/bin/env python
"""Train every method and its baseline on `shapes` with one schedule over several seeds, keep a results record
that survives without the checkpoints, and write one Markdown table that states the spread over the seeds.

    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3                 # train what is missing, table
    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3 --jobs 2 --num-threads 1   # two at a time
    python tools/benchmark_table.py --iters 2000 --seeds 1 --only iounet       # a method (and its baseline)
    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3 --timing-only   # re-time the checkpoints
    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3 --regime finetune   # from the pretrained trunk
    python tools/benchmark_table.py --from-json docs/results/shapes_2000it.json --readme docs/results/shapes.md  # no d2

Regimes. ``--regime scratch`` (default) trains every model from random weights into
``<output-dir>/<iters>it/`` and records into ``docs/results/shapes_<iters>it.json``; ``--regime finetune`` trains
every model but FPT paper (``FINETUNE_MODELS`` in ``d2_refine/benchmark/entries.py``) from the
pretrained R-18 trunk with each one's ``<config>_pretrained.yaml`` into ``<output-dir>/finetune_<iters>it/`` and
records into ``docs/results/shapes_finetune.json`` (same schema). The code lives in ``d2_refine/benchmark/``;
this script is its command line.

Runs. Each (model, seed) is trained by `train_net.py` itself (a subprocess, with its usual logs) in
`<output-dir>/<iters>it/seed<S>/<name>/`. A run is finished when `model_final.pth` is there and `metrics.json`
holds the COCOEvaluator results of the last iteration; a finished run is never trained again, and a
checkpoint without those results is scored again from the checkpoint. A run that was cut off (a checkpoint
every twentieth of the schedule, no `model_final.pth`) resumes from its last checkpoint with `--resume`, which
the shapes configs' `SOLVER.EXACT_RESUME` makes the same run as an uninterrupted one; its record says
`"resumed": true` and its s/it and times are those of the resumed part. These checkpoints are removed
once `model_final.pth` is written. The layout of the single-seed tool,
`<output-dir>/<iters>it/<name>/`, is read as seed 1 (its default then) where `seed1/<name>/` has no checkpoint;
nothing is moved. A run folder is locked while it trains, so two invocations never train the same run.

The results record (`--results`, default `docs/results/shapes_<iters>it.json`, committed): one record per
(model, seed), written as soon as a run is trained and evaluated: the COCO metrics (bbox and, where masks exist,
segm), detectron2's training s/it and time, the run's wall time, the machine (CPU, threads, GPU), the load
average while it trained, and the git commit of the code that trained it. Variants evaluated with a model's
weights (RDSNet + MBRM) are records of their own. Writes are merged under a lock file (`<results>.lock`):
re-recording a (model, seed) replaces its record and leaves the others; any number of processes may record.
`--from-json` writes the table (and `--readme`, `--figure`) from that file alone.

Parallel training. `--jobs J` runs J runs at a time, each in a worker process of this tool (train, evaluate,
record), then times inference alone. Separate invocations may also run side by side: the run locks and the
record lock keep them apart (give them `--no-timing` and re-time at the end with `--timing-only`).

Costs. Training s/it is detectron2's "Overall training speed" of each run (the table gives the range over
seeds). Inference ms/img is measured apart from training, after it: one pass in one process over every row, on
the checkpoints of one seed (`--timing-seed`), batch 1, the median over `--timing-images` val images after 3
warm-up images (`--timing-only` repeats it from the checkpoints).
"""
import argparse
import json
import os
import sys
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the d2_refine of this checkout, also when it is not installed

from d2_refine.benchmark import report  # noqa: E402
from d2_refine.benchmark.entries import (  # noqa: E402
    ENTRIES,
    ENTRY_BY_NAME,
    REGIMES,
    regime_entries,
    rows_with_baselines,
    with_baselines,
)
from d2_refine.benchmark.record import default_results_path, load_results  # noqa: E402
from d2_refine.benchmark.stats import summarize  # noqa: E402

START, END = "<!-- benchmark_table:start -->", "<!-- benchmark_table:end -->"


def markers(regime: str):
    """The --readme markers: a regime's table has its own, so that one file can hold both regimes' tables."""
    return (START, END) if regime == "scratch" else tuple(m.replace("benchmark_table", f"benchmark_table_{regime}")
                                                          for m in (START, END))


def write_outputs(doc: dict, args, source: str, command: str) -> List[dict]:
    """table.md, table.json, and the README block / the figure where asked, from the results record alone."""
    rows = summarize(doc["records"])
    expected = rows_with_baselines(args.only or [e.name for e in regime_entries(args.regime)])
    if args.only:
        rows = [r for r in rows if r["name"] in expected]
    if not rows:
        raise SystemExit(f"{source} has no records yet: train runs first")
    table = report.markdown(rows, doc, command, f"`{report.relative(source, REPO)}`", short=args.short,
                            regime=args.regime, expected=expected)
    folder = f"{doc['iters']}it" if args.regime == "scratch" else f"{args.regime}_{doc['iters']}it"
    out = args.out or os.path.join(args.output_dir, folder, "table.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(report.table_json(rows, doc), f, indent=1)
    if args.readme:
        report.embed(args.readme, table, *markers(args.regime))
    if args.figure:
        import plots  # a sibling script: tools/ is on sys.path when a script of it runs

        plots.plot_delta(doc, args.figure)
        print(f"wrote {args.figure}")
    print(table)
    return report.table_json(rows, doc)["rows"]


# -------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000, help="training iterations of every model (default: 2000)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to train (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="one seed: the same as --seeds SEED")
    p.add_argument("--only", nargs="+", choices=sorted(ENTRY_BY_NAME), help="these models (and their baselines)")
    p.add_argument("--regime", choices=REGIMES, default="scratch",
                   help="scratch: every model from random weights; finetune: every model but fpt_paper from the "
                        "pretrained trunk, with their <config>_pretrained.yaml (default: scratch)")
    p.add_argument("--output-dir", default=os.path.join(REPO, "output", "benchmark_table"))
    p.add_argument("--results", default=None,
                   help="the results record (JSON, default: docs/results/shapes_<iters>it.json; "
                        "docs/results/shapes_finetune.json with --regime finetune)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process")
    p.add_argument("--eval-only", action="store_true", help="score existing checkpoints again, never train")
    p.add_argument("--timing-only", action="store_true", help="only time inference from the checkpoints")
    p.add_argument("--no-timing", action="store_true", help="no timing pass after training")
    p.add_argument("--timing-seed", type=int, default=None, help="whose checkpoints are timed (default: first seed)")
    p.add_argument("--timing-images", type=int, default=50)
    p.add_argument("--from-json", nargs="?", const="", default=None, metavar="RESULTS",
                   help="only write the table (and --readme, --figure) from a results record (default: "
                        "--results); needs neither checkpoints nor detectron2")
    p.add_argument("--short", action="store_true", help="the short table (box / mask AP, Δ, verdict, ms/img)")
    p.add_argument("--num-threads", type=int, default=None, help="OMP_NUM_THREADS of the training processes")
    p.add_argument("--out", default=None, help="the Markdown table (default: <output-dir>/<iters>it/table.md)")
    p.add_argument("--readme", default=None, help=f"also put the table between {START} and {END} in this file "
                        f"({markers('finetune')[0]} ... with --regime finetune)")
    p.add_argument("--figure", default=None, help="also draw Δ vs baseline into this PNG (tools/plots.py)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run (kept for older callers)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE options added to every model's config (after the schedule)")
    args = p.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        p.error("give --seeds or --seed, not both")
    args.seeds = args.seeds or [args.seed if args.seed is not None else 1]
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    if args.timing_seed is None:
        args.timing_seed = args.seeds[0]
    if args.jobs < 1 or args.timing_images < 1:
        p.error("--jobs and --timing-images must be at least 1 (--no-timing skips the timing)")
    if args.worker and args.worker not in ENTRY_BY_NAME:
        p.error(f"--worker {args.worker}: not a model")
    in_regime = {e.name for e in regime_entries(args.regime)}
    outside = [n for n in (args.only or []) + ([args.worker] if args.worker else []) if n not in in_regime]
    if outside:
        p.error(f"--regime {args.regime} has no {', '.join(outside)} (its models: {', '.join(sorted(in_regime))})")
    if args.results is None:
        args.results = default_results_path(args.iters, args.regime)
    try:
        from d2_refine.benchmark.entries import schedule_opts

        schedule_opts(args.iters, 1)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python tools/benchmark_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json is not None:
        source = args.from_json or args.results
        if not os.path.isfile(source):
            raise SystemExit(f"--from-json: no results record {source}")
        try:
            doc = load_results(source)
        except ValueError as e:
            raise SystemExit(f"--from-json: {e}") from None
        return write_outputs(doc, args, source, command.strip())

    from d2_refine.utils.env import require_detectron2

    require_detectron2("tools/benchmark_table.py")
    from d2_refine.benchmark import runs

    entries_by_name = {e.name: e for e in regime_entries(args.regime)}
    missing = [e.config for e in entries_by_name.values() if not os.path.isfile(os.path.join(REPO, e.config))]
    if missing:
        raise SystemExit(f"--regime {args.regime}: no config {', '.join(missing)}")
    if args.worker:
        for s in args.seeds:
            runs.run_one(entries_by_name[args.worker], s, args)
        return []
    names = with_baselines(args.only or list(entries_by_name))
    entries = [entries_by_name[e.name] for e in ENTRIES if e.name in names]
    if not args.timing_only:
        pending = runs.pending_runs(entries, args.seeds, args.results, args.eval_only)
        print(f"{len(pending)} of {len(entries) * len(args.seeds)} runs to train or record "
              f"({args.results})", flush=True)
        if args.jobs > 1 and len(pending) > 1:
            runs.run_pool(pending, args)
        else:
            runs.run_sequential(pending, args)
    if args.timing_only or not args.no_timing:
        runs.time_rows(entries, args)
    if not os.path.isfile(args.results):
        raise SystemExit(f"no results record {args.results}: nothing was trained or recorded")
    return write_outputs(load_results(args.results), args, args.results, command.strip())


if __name__ == "__main__":
    main()
