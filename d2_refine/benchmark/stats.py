"""The aggregation over seeds: each metric's mean ± sample std, the Δ to the baseline paired by seed, and the
verdict on it."""
import statistics
from typing import Dict, Iterable, List, Optional, Sequence

from .entries import ENTRY_BY_NAME
from .logs import finite
from .record import row_key

VERDICT_RULE = ("verdict from the paired Δ box AP over the n seeds both runs have: **gain** when mean Δ > 2 × "
                "std(Δ), **loss** when mean Δ < −2 × std(Δ), **level** otherwise, for n ≥ 2; with one paired "
                "seed: no verdict")


def mean_std(values: Iterable[Optional[float]]) -> Optional[dict]:
    """{"mean", "std", "n"} of the values that are not None: the sample standard deviation (n − 1), None for
    n = 1. None when no value is left."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return dict(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else None, n=len(vals))


def verdict(delta: Optional[dict]) -> str:
    """The verdict on a paired Δ box AP (:func:`mean_std` of the per-seed differences); see VERDICT_RULE."""
    if not delta:
        return "–"
    if delta["n"] < 2:
        return "1 seed: no verdict"
    if delta["mean"] > 2 * delta["std"]:
        return "gain"
    if delta["mean"] < -2 * delta["std"]:
        return "loss"
    return "level"


def metric(rec: dict, task: str, name: str = "AP") -> Optional[float]:
    """One metric of a record (None where it is missing or not finite)."""
    return finite((rec["metrics"].get(task) or {}).get(name))


def paired_delta(runs: Dict[int, dict], base_runs: Dict[int, dict], task: str, name: str = "AP") -> Optional[dict]:
    """:func:`mean_std` of one metric's difference to the baseline over the seeds both have it (records keyed by
    seed), with those ``seeds``; None when no seed pairs."""
    pairs = {}
    for x in sorted(runs):
        ours, base = metric(runs[x], task, name), metric(base_runs[x], task, name) if x in base_runs else None
        if ours is not None and base is not None:
            pairs[x] = ours - base
    d = mean_std(pairs.values())
    return d and dict(d, seeds=sorted(pairs))


def _range(values: List[float]) -> Optional[List[float]]:
    return [min(values), max(values)] if values else None


def by_model(records: Sequence[dict]) -> Dict[str, Dict[int, dict]]:
    """The records as {model: {seed: record}}."""
    runs: Dict[str, Dict[int, dict]] = {}
    for r in records:
        runs.setdefault(r["model"], {})[r["seed"]] = r
    return runs


def summarize(records: Sequence[dict]) -> List[dict]:
    """One row per model of the records: each metric's mean/std/n over its seeds, the paired Δ box/mask AP to
    its baseline (same seed) with the verdict, and the range of training s/it over the seeds."""
    runs = by_model(records)
    rows = []
    for name in sorted(runs, key=row_key):
        by_seed = runs[name]
        seeds = sorted(by_seed)
        last = by_seed[seeds[-1]]
        # the pairing is the table's: a model's entry names its baseline now; records of models without an
        # entry (and the tests' made-up ones) keep the baseline they were recorded with
        base = ENTRY_BY_NAME[name].baseline if name in ENTRY_BY_NAME else last.get("baseline")
        keys = sorted({(t, m) for r in by_seed.values() for t, ms in r["metrics"].items() for m in ms})
        stats: Dict[str, Dict[str, dict]] = {}
        for task, name_ in keys:
            s = mean_std(metric(by_seed[x], task, name_) for x in seeds)
            if s:
                stats.setdefault(task, {})[name_] = s
        delta = {task: paired_delta(by_seed, runs[base], task) for task in ("bbox", "segm")} if base in runs else {}
        if base is None:
            base_title = None
        elif base in runs:
            base_title = runs[base][max(runs[base])].get("title", base)
        else:
            base_title = ENTRY_BY_NAME[base].title if base in ENTRY_BY_NAME else base
        train = [by_seed[x].get("train") or {} for x in seeds]
        # a resumed run's speed and time cover the part after the resume only (for IFR the implicit phase,
        # several times slower than the unrolled warm-up): left out of both ranges
        whole = [t for t in train if not t.get("resumed")]
        speeds = [t["s_per_iter"] for t in whole if t.get("s_per_iter") is not None]
        minutes = [t["train_s"] / 60 for t in whole if t.get("train_s")]
        loads = [by_seed[x]["load"]["mean_1min"] for x in seeds if (by_seed[x].get("load") or {}).get("mean_1min")]
        rows.append(dict(name=name, title=last.get("title", name), baseline=base, baseline_title=base_title,
                         seeds=seeds, n=len(seeds), stats=stats, delta=delta,
                         verdict=verdict(delta.get("bbox")) if base in runs else ("no baseline run" if base else "–"),
                         s_per_iter=_range(speeds), train_min=_range(minutes), load=_range(loads)))
    return rows
