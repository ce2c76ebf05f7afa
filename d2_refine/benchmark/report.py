"""The Markdown tables written from the results records alone (no checkpoint, no detectron2): the per-model table
with its spread over seeds, its JSON twin, and the one table a user reads first: per method, the verdict from
scratch and from the pretrained trunk side by side, next to the paper's reported gain."""
import os
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from .entries import ROW_ORDER, entry_of, in_regime, row_title
from .stats import VERDICT_RULE

METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("bbox", "AP90"), ("bbox", "APs"), ("segm", "AP")]

#: What each paper reports for the method (its setting and table), beside our verdicts. Not re-measured here.
PAPER = {
    "iounet": "COCO minival, R-50-FPN Faster R-CNN: +1.7 box AP (36.4 → 38.1; paper's ablation of the IoU-Net "
              "stages)",
    "fpt_lite": "COCO test-dev, FPN baselines: up to +8.5 box / +6.0 mask AP (paper's main comparison; "
                "multi-scale, longer schedules)",
    "fpt_paper": "as `fpt_lite` (the paper's own transformer settings)",
    "ifr": "COCO val2017, R-50-FPN, 90k iterations: about +1 mask AP over Mask R-CNN (36.3 mask AP; box AP not "
           "reported)",
    "ifr_ws": "COCO val2017, R-50-FPN: 35.9 mask AP, 0.4 below implicit IFR",
    "cascade_ifr": "COCO val2017, R-50-FPN: 36.9 mask AP with a cascade",
    "internet_l2": "COCO test-dev, R-101-FPN: +4.3 box AP over Mask R-CNN (38.2 → 42.5; paper's main table)",
    "internet_ot": "as l2 (the paper's OT variant of the loss)",
    "rdsnet": "COCO val, R-50-FPN 1x: 36.8 box / 32.1 mask AP (no RetinaNet Δ reported)",
    "rdsnet_mbrm": "COCO val, R-50-FPN: +1.0 box AP from MBRM over RDSNet (37.8), masks unchanged",
}


#: the folder of each method's README (relative to the repository root)
FOLDER = {"iounet": "IoUNet", "fpt_lite": "FPT", "fpt_paper": "FPT", "ifr": "IFR", "ifr_ws": "IFR",
          "cascade_ifr": "IFR", "internet_l2": "InterNet", "internet_ot": "InterNet", "internet_makeup": "InterNet",
          "rdsnet": "RDSNet", "rdsnet_mbrm": "RDSNet"}


def fmt(x, digits=1):
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def fmt_stat(s: Optional[dict], row_n: int, digits: int = 1, sign: bool = False) -> str:
    """'mean ± std' (the mean alone for one value), '(n=k)' added where k is not the row's n."""
    if not s:
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    out = f.format(s["mean"]) if s["std"] is None else f"{f.format(s['mean'])} ± {s['std']:.{digits}f}"
    return out if s["n"] == row_n else f"{out} (n={s['n']})"


def _range(pair: Optional[List[float]], digits: int = 2) -> str:
    if not pair:
        return "–"
    lo, hi = (f"{v:.{digits}f}" for v in pair)
    return lo if lo == hi else f"{lo}–{hi}"


def _training(r: dict) -> str:
    """'23–25 min (load 2.1–2.5)': the range over the seeds of the training time and of the mean load."""
    if not r.get("train_min"):
        return "–"
    load = f" (load {_range(r['load'], 1)})" if r.get("load") else ""
    return f"{_range(r['train_min'], 0)} min{load}"


def _passes(doc: Optional[dict], names: Sequence[str]) -> List[str]:
    """The ids of the timing passes of a results record (None: no record) that timed any of ``names``."""
    timing = (doc or {}).get("timing", {})
    return sorted({timing[n]["pass"] for n in names if n in timing})


def _where(timing_pass: dict, cpu_name: bool = False) -> str:
    """Where a timing pass ran, in a few words: the GPU's name, or the CPU threads ("2 CPU threads"; with
    ``cpu_name``, "<CPU>, 2 threads")."""
    m = timing_pass.get("machine") or {}
    if str(timing_pass.get("device", "")).startswith("cuda"):
        return str(m.get("gpu") or "a GPU")
    n = m.get("torch_threads", "?")
    return f"{m.get('cpu') or 'CPU'}, {n} threads" if cpu_name else f"{n} CPU thread{'' if n == 1 else 's'}"


def _timing_caption(doc: dict, names: Sequence[str]) -> str:
    used = _passes(doc, names)
    if not used:
        return "inference ms/img: not measured yet (`--timing-only`)."
    parts = []
    for pid in used:
        p = doc["timing_passes"].get(pid, {})
        where = _where(p, cpu_name=True)
        timed = [n for n in names if doc["timing"].get(n, {}).get("pass") == pid]
        rows = "" if len(used) == 1 else f" ({', '.join(timed)})"
        la = (p.get("load_before") or ["?"])[0]
        parts.append(f"{pid}: seed {p.get('seed', '?')}'s checkpoints, median over {p.get('images', '?')} val "
                     f"images after 3 warm-up, {where}, load {la} before{rows}")
    head = "one pass in one process" if len(used) == 1 else f"{len(used)} passes"
    return f"inference ms/img: batch 1, measured apart from training ({head}): " + "; ".join(parts) + "."


def _apart(doc: Optional[dict], names: Sequence[str]) -> List[str]:
    """The titles of the rows of ``names`` timed apart from the others: where the rows come from more than one
    timing pass, those outside the pass that timed the most of them."""
    used = _passes(doc, names)
    if len(used) < 2:
        return []
    timing = doc["timing"]
    by_pass = {p: [n for n in names if timing.get(n, {}).get("pass") == p] for p in used}
    main = max(used, key=lambda p: len(by_pass[p]))
    return [row_title(n) for p in used if p != main for n in by_pass[p]]


def _pass_words(apart: Dict[str, List[str]]) -> tuple:
    """The caption's words for the timing passes (one per regime, or which rows a pass of their own timed): the
    pass and, where some rows were timed apart, the clause that names them."""
    rows = "; ".join(f"{', '.join(titles)}{f' ({regime})' if regime else ''}" for regime, titles in apart.items()
                     if titles)
    one = "one timing pass" if not rows else "a timing pass"
    return (f"{one} in one process (its machine, threads and load are in the record)",
            f"; {rows}: timed in a pass of {'its' if sum(map(len, apart.values())) == 1 else 'their'} own" if rows
            else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True).splitlines()


def markdown(rows: List[dict], doc: dict, command: str, source: str = "", short: bool = False,
             regime: str = "scratch", expected: Optional[Sequence[str]] = None) -> str:
    """The per-model table of a results record. ``short``: box / mask AP, Δ, verdict and inference time only
    (a method README's table). ``expected``: the rows listed as missing when the record has none (default:
    every model)."""
    seeds = sorted({x for r in rows for x in r["seeds"]})
    start = "from scratch" if regime == "scratch" else "from the pretrained R-18 trunk"
    lines = [f"Schedule: {doc['iters']} iterations {start} per run, seeds {', '.join(map(str, seeds))}, scored "
             f"by COCOEvaluator on `shapes_val`. Written from {source or 'the results record'} by:", "",
             "```bash", command, "```", ""]
    if short:
        lines += [f"Mean ± std over the seeds; Δ: paired with the baseline of the same seed; {VERDICT_RULE}. "
                  "inference ms/img: batch 1, the median over val images of "
                  f"{''.join(_pass_words({'': _apart(doc, [r['name'] for r in rows])}))}.", ""]
        headers = ["model", "seeds", "box AP", "mask AP", "Δ box AP", "Δ mask AP", "verdict", "inference ms/img"]
    else:
        lines += ["Each cell: mean ± sample standard deviation (n − 1) over the row's n seeds (`seeds`). Δ: the "
                  "difference to the baseline run with the same seed, mean ± std over the seeds both have ('(n=k)' "
                  f"where fewer than the row's); {VERDICT_RULE}. train s/it: detectron2's overall training speed, "
                  "the range over the seeds; training: the range of the training times over the seeds and of the "
                  "1-minute load average while each run trained (resumed runs are left out of s/it and times: "
                  "theirs cover the part after the resume). "
                  f"{_timing_caption(doc, [r['name'] for r in rows])}", ""]
        headers = ["model", "baseline", "seeds", "box AP", "AP50", "AP75", "AP90", "APs", "mask AP", "Δ box AP",
                   "Δ mask AP", "verdict", "train s/it", "training", "inference ms/img"]
    body = []
    for r in rows:
        if short:
            body.append([r["title"], *_short_cells(r, doc)])
        else:
            n, st, d = r["n"], r["stats"], r["delta"]
            cells = [fmt_stat(st.get(task, {}).get(m), n) for task, m in METRICS]
            body.append([r["title"], r["baseline_title"] or "–", str(n), *cells, fmt_stat(d.get("bbox"), n, sign=True),
                         fmt_stat(d.get("segm"), n, sign=True), r["verdict"], _range(r["s_per_iter"]), _training(r),
                         _ms(doc, r["name"])])
    lines += table(headers, body)
    done = {r["name"] for r in rows}
    missing = [n for n in (expected or ROW_ORDER) if n not in done]
    if missing:
        lines += ["", "Not in the record yet (no run at this schedule): " + ", ".join(map(row_title, missing)) + "."]
    return "\n".join(lines) + "\n"


def _ms(doc: dict, name: str) -> str:
    return fmt((doc.get("timing") or {}).get(name, {}).get("ms_per_img"), 0)


def _short_cells(r: dict, doc: dict) -> List[str]:
    """seeds, box AP, mask AP, Δ box AP, Δ mask AP, verdict, inference ms/img of one summarized row."""
    n, st, d = r["n"], r["stats"], r["delta"]
    return [str(n), fmt_stat(st.get("bbox", {}).get("AP"), n), fmt_stat(st.get("segm", {}).get("AP"), n),
            fmt_stat(d.get("bbox"), n, sign=True), fmt_stat(d.get("segm"), n, sign=True), r["verdict"],
            _ms(doc, r["name"])]


#: how the tables name the two training regimes
REGIME_WORDS = {"scratch": "from scratch", "finetune": "pretrained trunk"}


def method_markdown(parts: Sequence[tuple], names: Sequence[str], command: str, sources: Dict[str, str]) -> str:
    """A method README's results table: its rows and their baselines (``names``) in both regimes, one block of
    rows per regime. ``parts``: (regime, summarized rows, results record or None) per regime, in table order."""
    body, schedules, unmeasured, timed_on, apart = [], {}, set(), {}, {}
    for regime, rows, doc in parts:
        by = {r["name"]: r for r in rows}
        schedules[regime] = (doc or {}).get("iters")
        where = sorted({_where(doc["timing_passes"].get(p) or {}) for p in _passes(doc, names)})
        if where:
            timed_on[REGIME_WORDS[regime]] = " / ".join(where)
        apart[REGIME_WORDS[regime]] = _apart(doc, [n for n in names if n in by])
        for name in names:
            if name in by:
                cells = _short_cells(by[name], doc)
                body.append([by[name]["title"], REGIME_WORDS[regime], *cells])
                if cells[-1] == "–":  # its inference ms/img
                    unmeasured.add(REGIME_WORDS[regime])
            elif in_regime(name, regime):
                body.append([row_title(name), REGIME_WORDS[regime], *["–"] * 5, "not run yet", "–"])
    passes, apart_rows = _pass_words(apart)
    timing = f"inference ms/img: batch 1, the median over the val images of {passes}"
    if len(timed_on) > 1:  # the regimes' passes may differ in threads: their times compare within a regime only
        timing += " on " + ", ".join(f"{w} ({regime})" for regime, w in timed_on.items()) + \
            "; compare rows of one regime"
    timing += apart_rows
    if unmeasured:
        timing += f"; –: not timed yet ({', '.join(sorted(unmeasured, reverse=True))})"
    lines = [f"Written from {', '.join(f'`{p}`' for p in sources.values())} by:", "", "```bash", command, "```", "",
             f"R-18-FPN on `shapes`, {_schedules(schedules)} (the `*_pretrained.yaml` configs), scored by "
             f"COCOEvaluator on `shapes_val`. Mean ± std over the seeds; Δ: paired with the baseline of the same "
             f"seed; {VERDICT_RULE}. {timing}.", ""]
    lines += table(["model", "regime", "seeds", "box AP", "mask AP", "Δ box AP", "Δ mask AP", "verdict",
                    "inference ms/img"], body)
    return "\n".join(lines) + "\n"


def table_json(rows: List[dict], doc: dict) -> dict:
    """The table as JSON: per row the means (``results``, as tools/plots.py reads them), stds, n, Δ, verdict."""
    out = []
    for r in rows:
        t = doc["timing"].get(r["name"], {})
        out.append(dict(name=r["name"], title=r["title"], baseline=r["baseline"], seeds=r["seeds"], n=r["n"],
                        results={task: {m: s["mean"] for m, s in ms.items()} for task, ms in r["stats"].items()},
                        std={task: {m: s["std"] for m, s in ms.items()} for task, ms in r["stats"].items()},
                        delta=r["delta"], verdict=r["verdict"], s_per_iter=r["s_per_iter"],
                        train_min=r.get("train_min"), load=r.get("load"),
                        ms_per_img=t.get("ms_per_img"), params_m=t.get("params_m"),
                        params_inference_m=t.get("params_inference_m")))
    return dict(iters=doc["iters"], seeds=sorted({x for r in rows for x in r["seeds"]}), rule=VERDICT_RULE,
                rows=out)


def verdict_cell(row: Optional[dict], regime: str, name: str) -> str:
    """'gain: +4.2 ± 0.6 / +2.9 ± 0.8 (3 seeds)' (Δ box / Δ mask AP), or 'not run'."""
    if row is None or not row["delta"].get("bbox"):
        return "not run" if in_regime(name, regime) else "not in this regime"
    d = row["delta"]
    n = d["bbox"]["n"]
    box, mask = fmt_stat(d["bbox"], n, sign=True), fmt_stat(d.get("segm"), n, sign=True)
    change = box if mask == "–" else f"{box} / {mask}"
    word = "no verdict" if n < 2 else row["verdict"]
    return f"{word}: {change} ({n} seed{'s' if n > 1 else ''})"


def verdict_markdown(scratch: List[dict], finetune: List[dict], command: str,
                     sources: Dict[str, str], iters: Optional[Dict[str, Optional[int]]] = None) -> str:
    """Per method (every model with a baseline), the verdict and Δ box / Δ mask AP from scratch and from the
    pretrained trunk, and what the paper reports. ``iters``: each regime's schedule (its record's "iters")."""
    by = {"scratch": {r["name"]: r for r in scratch}, "finetune": {r["name"]: r for r in finetune}}
    body = []
    for name in ROW_ORDER:
        entry = entry_of(name)
        if entry.baseline is None:
            continue
        title = f"[{row_title(name)}](projects/{FOLDER[name]})" if name in FOLDER else row_title(name)
        body.append([title, row_title(entry.baseline), verdict_cell(by["scratch"].get(name), "scratch", name),
                     verdict_cell(by["finetune"].get(name), "finetune", name), PAPER.get(name, "–")])
    lines = [f"Written from {', '.join(f'`{p}`' for p in sources.values())} by:", "", "```bash", command, "```", "",
             f"Δ box / Δ mask AP against the baseline trained with the same seed, mean ± std over the seeds; "
             f"{VERDICT_RULE}. R-18-FPN on `shapes`, {_schedules(iters or {})}; paper: what its authors report, "
             "not re-measured here.", ""]
    lines += table(["method", "baseline", "from scratch", "pretrained trunk", "paper (setting: reported)"], body)
    return "\n".join(lines) + "\n"


def _schedules(iters: Dict[str, Optional[int]]) -> str:
    """"from scratch 2,000 iterations, from the pretrained trunk 1,000" (the regimes whose schedule is known)."""
    words = {"scratch": "from scratch", "finetune": "from the pretrained trunk"}
    known = [f"{words[k]} {n:,} iterations" for k, n in iters.items() if n]
    return ", ".join(known) if known else "schedule as recorded"


def embed(readme: str, table: str, start: str, end: str) -> None:
    """Put ``table`` between the ``start`` and ``end`` markers of ``readme``."""
    text = open(readme).read()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers to put the table between")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(before + start + "\n" + table + end + after)


def relative(path: str, repo: str) -> str:
    return os.path.relpath(path, repo) if os.path.abspath(path).startswith(repo + os.sep) else path
