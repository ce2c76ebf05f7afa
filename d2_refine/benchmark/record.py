"""The results record: one JSON file per schedule and regime (``docs/results/shapes_<iters>it.json``,
``docs/results/shapes_finetune.json``) holding one record per (model, seed) and the inference timing, read and
written under a lock so that any number of processes may record into it."""
import contextlib
import datetime
import json
import os
import subprocess
import time
from typing import Callable, Dict, Iterable, Optional, Sequence

import portalocker

from .entries import ENTRY_BY_NAME, ROW_ORDER, row_title
from .logs import finite, train_speed, train_time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(REPO, "docs", "results")
SCHEMA = 1


def default_results_path(iters: int, regime: str = "scratch") -> str:
    """``docs/results/shapes_<iters>it.json`` from scratch, ``docs/results/shapes_finetune.json`` pretrained."""
    name = f"shapes_{iters}it.json" if regime == "scratch" else f"shapes_{regime}.json"
    return os.path.join(RESULTS_DIR, name)


def utc(timestamp: float) -> str:
    """A POSIX time as the records write it."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def now() -> str:
    return utc(time.time())


@contextlib.contextmanager
def file_lock(path: str, blocking: bool = True):
    """An exclusive lock on ``path`` (created) while the block runs; with ``blocking=False`` yields False at once
    when another process (or another open file) holds it. Released by the OS if the holder dies."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        try:
            portalocker.lock(f, portalocker.LOCK_EX | (0 if blocking else portalocker.LOCK_NB))
        except portalocker.exceptions.LockException:
            yield False
            return
        try:
            yield True
        finally:
            portalocker.unlock(f)


def git_commit() -> dict:
    """The commit of the code here and whether the tracked code differs from it (None where git cannot tell).

    What the tools write, the records and tables under ``docs/`` and the Markdown files, is not code: a campaign that
    writes each finished run into a committed record, or a tool that rewrites its own record, leaves the code as
    committed, and the runs after it are not "dirty"."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs", ":(exclude)*.md")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def empty_results(iters: int) -> dict:
    return dict(command=f"python tools/benchmark_table.py --iters {iters} ... (shapes_finetune.json: --regime "
                        "finetune; each record: one (model, seed) it trained and scored; code: the commit it "
                        "trained from)",
                schema=SCHEMA, dataset="shapes", iters=iters, records=[], timing={}, timing_passes={})


def load_results(path: str) -> dict:
    """The results record at ``path``, checked: an object with ``iters`` and ``records``, each record with a
    model, an integer seed and its metrics."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list) or not isinstance(doc.get("iters"), int):
        raise ValueError(f"{path} is not a results record (an object with 'iters' and a 'records' list)")
    for i, r in enumerate(doc["records"]):
        if not (isinstance(r, dict) and isinstance(r.get("model"), str) and isinstance(r.get("seed"), int)
                and isinstance(r.get("metrics"), dict)):
            raise ValueError(f"{path}: record {i} needs 'model' (str), 'seed' (int) and 'metrics' (object): {r!r:.200}")
    doc.setdefault("timing", {})
    doc.setdefault("timing_passes", {})
    return doc


def row_key(name: str):
    """The sort key of a model: the table's row order, unknown models after it by name."""
    return (ROW_ORDER.index(name), "") if name in ROW_ORDER else (len(ROW_ORDER), name)


def merge_records(doc: dict, records: Iterable[dict]) -> dict:
    """``doc`` with ``records`` added; a record of a (model, seed) already there replaces it. Sorted by the
    table's row order, then seed."""
    merged = {(r["model"], r["seed"]): r for r in doc["records"]}
    for r in records:
        if r.get("iters", doc["iters"]) != doc["iters"]:
            raise ValueError(f"record {r['model']} seed {r['seed']} is of {r['iters']} iterations, the file of "
                             f"{doc['iters']}")
        merged[(r["model"], r["seed"])] = r
    return dict(doc, records=[merged[k] for k in sorted(merged, key=lambda k: (row_key(k[0]), k[1]))])


def update_results(path: str, iters: int, change: Callable[[dict], dict]) -> dict:
    """Read the record at ``path`` (or start one), apply ``change`` and write it back atomically, all under the
    lock ``<path>.lock``: concurrent writers never lose each other's records."""
    with file_lock(path + ".lock"):
        doc = load_results(path) if os.path.isfile(path) else empty_results(iters)
        if doc["iters"] != iters:
            raise ValueError(f"{path} records {doc['iters']}-iteration runs, not {iters}")
        doc = change(doc)
        write_json(path, doc)
    return doc


def write_json(path: str, doc) -> None:
    """Write ``doc`` to ``path`` as indented JSON, atomically: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def record_runs(path: str, iters: int, records: Sequence[dict]) -> dict:
    return update_results(path, iters, lambda doc: merge_records(doc, records))


def recorded(path: str) -> set:
    """The (model, seed) pairs the record at ``path`` holds (none where it does not exist)."""
    if not os.path.isfile(path):
        return set()
    with file_lock(path + ".lock"):
        return {(r["model"], r["seed"]) for r in load_results(path)["records"]}


def make_record(name: str, seed: int, iters: int, metrics: Dict[str, Dict[str, float]], out_dir: str,
                extra: Sequence[str] = (), weights_of: Optional[str] = None, config: Optional[str] = None) -> dict:
    """One (model, seed) record: its COCO metrics, and what ``out_dir`` tells of its training (detectron2's log,
    and ``run_info.json`` where this tool trained it: commit, machine, load). ``config``: the config it trained
    with, where not its entry's (the finetune regime)."""
    entry = ENTRY_BY_NAME[weights_of or name]
    info = {}
    if os.path.isfile(os.path.join(out_dir, "run_info.json")):
        with open(os.path.join(out_dir, "run_info.json")) as f:
            info = json.load(f)
    log = os.path.join(out_dir, "log.txt")
    rec = dict(model=name, seed=seed, iters=iters, title=row_title(name), baseline=entry.baseline,
               config=config or entry.config,
               metrics={t: {k: finite(v) for k, v in sorted(m.items())} for t, m in sorted(metrics.items())
                        if t in ("bbox", "segm")},
               train=dict(s_per_iter=train_speed(log), train_s=train_time(log), run_wall_s=info.get("run_wall_s")),
               machine=info.get("machine"), load=info.get("load"), code=info.get("code"),
               trained=info.get("finished"), recorded=now(), opts=list(extra),
               run_dir=os.path.relpath(out_dir, REPO) if os.path.abspath(out_dir).startswith(REPO + os.sep)
               else os.path.abspath(out_dir))
    if weights_of:
        rec["weights_of"] = weights_of
    if info.get("resumed"):
        rec["train"]["resumed"] = True  # s/it, train and wall time: the part after the resume
    if not info:
        rec["note"] = "no run_info.json (not trained by this tool's current version): machine, load, commit unknown"
    elif "finished" not in info:
        final = os.path.join(out_dir, "model_final.pth")
        if os.path.isfile(final):
            rec["trained"] = utc(os.path.getmtime(final))
        rec["note"] = ("cut off after it started (train_net.py did not exit; scored again from model_final.pth, "
                       "written at 'trained'): commit and machine from its start, load and wall time unknown")
    return rec
