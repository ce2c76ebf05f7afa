#!/usr/bin/env python
"""Train every method and its baseline on `shapes` with one schedule over several seeds, keep a results record
that survives without the checkpoints, and write one Markdown table that states the spread over the seeds.

    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3                 # train what is missing, table
    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3 --jobs 2 --num-threads 1   # two at a time
    python tools/benchmark_table.py --iters 2000 --seeds 1 --only iounet       # a method (and its baseline)
    python tools/benchmark_table.py --iters 2000 --seeds 1 2 3 --timing-only   # re-time the checkpoints
    python tools/benchmark_table.py --from-json docs/results/shapes_2000it.json --readme README.md   # no d2

Runs. Each (model, seed) is trained by `train_net.py` itself (a subprocess, with its usual logs) in
`<output-dir>/<iters>it/seed<S>/<name>/`. A run is finished when `model_final.pth` is there and `metrics.json`
holds the COCOEvaluator results of the last iteration; a finished run is never trained again, and a
checkpoint without those results is scored again from the checkpoint. A run that was cut off (a checkpoint
every quarter of the schedule, no `model_final.pth`) resumes from its last checkpoint with `--resume`, which
the shapes configs' `SOLVER.EXACT_RESUME` makes the same run as an uninterrupted one; its record says
`"resumed": true` and its s/it and times are those of the resumed part. The quarter checkpoints are removed
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
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- benchmark_table:start -->", "<!-- benchmark_table:end -->"
RESULTS_DIR = os.path.join(REPO, "docs", "results")
SCHEMA = 1

# Every model's config, one line each.
CONFIGS = {
    "mask_rcnn": "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml",
    "faster_rcnn": "configs/Baselines/faster_rcnn_R_18_FPN_shapes.yaml",
    "retinanet": "configs/Baselines/retinanet_R_18_FPN_shapes.yaml",
    "iounet": "configs/IoUNet/iounet_R_18_FPN_shapes.yaml",
    "fpt_lite": "configs/FPT/mask_rcnn_fpt_lite_R_18_shapes.yaml",
    "fpt_paper": "configs/FPT/mask_rcnn_fpt_paper_R_18_shapes.yaml",
    "ifr": "configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml",
    "ifr_ws": "configs/IFR/ifr_ws_mask_rcnn_R_18_FPN_shapes.yaml",
    "cascade_mask_rcnn": "configs/Baselines/cascade_mask_rcnn_R_18_FPN_shapes.yaml",
    "cascade_ifr": "configs/IFR/ifr_cascade_mask_rcnn_R_18_FPN_shapes.yaml",
    "internet_l2": "configs/InterNet/internet_l2_R_18_FPN_shapes.yaml",
    "internet_ot": "configs/InterNet/internet_ot_R_18_FPN_shapes.yaml",
    "internet_makeup": "configs/InterNet/internet_makeup_only_R_18_FPN_shapes.yaml",
    "rdsnet": "configs/RDSNet/rdsnet_R_18_FPN_shapes.yaml",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    title: str
    config: str
    baseline: Optional[str] = None
    # extra KEY VALUE opts that depend on the schedule (e.g. IFR's warm-up is a fraction of it)
    opts: Callable[[int], List[str]] = lambda iters: []
    # name -> (title, KEY VALUE opts): evaluated with this entry's weights, no training
    variants: Dict[str, tuple] = dataclasses.field(default_factory=dict)


def _ifr_warm_up(iters: int) -> List[str]:
    """The paper's plain-head warm-up of the implicit IFR head: 50k of its 90k iterations."""
    return ["MODEL.IFR.PRETRAIN_STEPS", str(round(iters * 5 / 9))]


ENTRIES = [
    Entry("mask_rcnn", "Mask R-CNN (FPN)", CONFIGS["mask_rcnn"]),
    Entry("faster_rcnn", "Faster R-CNN (FPN)", CONFIGS["faster_rcnn"]),
    Entry("retinanet", "RetinaNet (FPN)", CONFIGS["retinanet"]),
    Entry("iounet", "IoU-Net (IoU-NMS + refinement)", CONFIGS["iounet"], "faster_rcnn"),
    Entry("fpt_lite", "Mask R-CNN + FPT `fpt_lite`", CONFIGS["fpt_lite"], "mask_rcnn"),
    Entry("fpt_paper", "Mask R-CNN + FPT `fpt_paper`", CONFIGS["fpt_paper"], "mask_rcnn"),
    Entry("ifr", "Mask R-CNN + IFR (implicit)", CONFIGS["ifr"], "mask_rcnn", opts=_ifr_warm_up),
    Entry("ifr_ws", "Mask R-CNN + IFR (weight sharing, K = 4)", CONFIGS["ifr_ws"], "mask_rcnn"),
    # the cascade alone, against Mask R-CNN; Cascade + IFR against it, so that its Δ is IFR's share
    Entry("cascade_mask_rcnn", "Cascade Mask R-CNN (FPN)", CONFIGS["cascade_mask_rcnn"], "mask_rcnn"),
    Entry("cascade_ifr", "Cascade Mask R-CNN + IFR (implicit)", CONFIGS["cascade_ifr"], "cascade_mask_rcnn",
          opts=_ifr_warm_up),
    Entry("internet_l2", "Mask R-CNN + InterNet (l2)", CONFIGS["internet_l2"], "mask_rcnn"),
    Entry("internet_ot", "Mask R-CNN + InterNet (ot)", CONFIGS["internet_ot"], "mask_rcnn"),
    # ablation: InterNet (l2) without its loss, to tell the intertwiner loss from the make-up layer's extra convs
    Entry("internet_makeup", "Mask R-CNN + InterNet make-up layer only (l2, loss weight 0; ablation)",
          CONFIGS["internet_makeup"], "mask_rcnn"),
    Entry("rdsnet", "RDSNet", CONFIGS["rdsnet"], "retinanet",
          variants={"rdsnet_mbrm": ("RDSNet + MBRM (same weights)", ["MODEL.RDSNET.MBRM.ENABLED", "True"])}),
]
ENTRY_BY_NAME = {e.name: e for e in ENTRIES}
VARIANT_OF = {v: e.name for e in ENTRIES for v in e.variants}
ROW_ORDER = [n for e in ENTRIES for n in (e.name, *e.variants)]


def row_title(name: str) -> str:
    """The title of an entry or of a variant (evaluated with its entry's weights)."""
    if name in ENTRY_BY_NAME:
        return ENTRY_BY_NAME[name].title
    return ENTRY_BY_NAME[VARIANT_OF[name]].variants[name][0]
METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("bbox", "AP90"), ("bbox", "APs"), ("segm", "AP")]


def schedule_opts(iters: int, seed: int) -> List[str]:
    """The shapes schedule (2,000 iterations: warm-up 200, decay at 75 % and 90 %) scaled to ``iters``."""
    if iters < 10:
        raise ValueError(f"--iters must be at least 10, got {iters}")
    steps = (round(iters * 0.75), round(iters * 0.9))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps), "SOLVER.WARMUP_ITERS", str(iters // 10),
            "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period(iters)), "SEED", str(seed)]


def checkpoint_period(iters: int) -> int:
    """A checkpoint every quarter of the schedule, so that a run cut off (a session that ends) resumes from it."""
    return max(1, iters // 4)


# ------------------------------------------------------------------------------------------- run folders
def run_dir(root: str, name: str, seed: int) -> str:
    """``<root>/seed<S>/<name>``; for seed 1, the single-seed layout ``<root>/<name>`` where only it holds a
    checkpoint."""
    new = os.path.join(root, f"seed{seed}", name)
    legacy = os.path.join(root, name)
    if seed == 1 and not os.path.isfile(os.path.join(new, "model_final.pth")) \
            and os.path.isfile(os.path.join(legacy, "model_final.pth")):
        return legacy
    return new


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def final_results(metrics_json: str, min_iteration: Optional[int] = None) -> Optional[Dict[str, Dict[str, float]]]:
    """The COCO results of the last evaluation in detectron2's ``metrics.json`` (None if there is none, or if it
    was logged before ``min_iteration``: detectron2 logs the one after training at MAX_ITER). NaN becomes None."""
    if not os.path.isfile(metrics_json):
        return None
    last = None
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if line and '"bbox/AP"' in line:
                last = json.loads(line)
    if last is None or (min_iteration is not None and last.get("iteration", -1) < min_iteration):
        return None
    out: Dict[str, Dict[str, float]] = {}
    for key, value in last.items():
        task, _, metric = key.partition("/")
        if task in ("bbox", "segm") and metric:
            out.setdefault(task, {})[metric] = _finite(float(value))
    return out


def train_speed(log_txt: str) -> Optional[float]:
    """Seconds per iteration of the last training logged in ``log.txt`` (detectron2's 'Overall training speed')."""
    found = _training_lines(log_txt)
    return float(found[-1][1]) if found else None


def train_time(log_txt: str) -> Optional[float]:
    """Seconds of the last training logged in ``log.txt`` (the 'H:MM:SS' of 'Overall training speed')."""
    found = _training_lines(log_txt)
    if not found:
        return None
    h, m, s = found[-1][0].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _training_lines(log_txt: str):
    if not os.path.isfile(log_txt):
        return []
    with open(log_txt) as f:
        return re.findall(r"Overall training speed: \d+ iterations in (\S+) \(([\d.]+) s / it\)", f.read())


def run_opts(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str] = ()) -> List[str]:
    """The KEY VALUE options of one model: the common schedule, the entry's own, the user's, the output folder."""
    return [*schedule_opts(iters, seed), *entry.opts(iters), *extra, "OUTPUT_DIR", out_dir]


def git_commit() -> dict:
    """The commit of the code here and whether tracked files differ from it (None where git cannot tell)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def machine_info(num_threads: Optional[int] = None) -> dict:
    """The machine a run or a timing pass used: host, CPU, cores, OMP_NUM_THREADS, GPU, torch."""
    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    info = dict(host=platform.node(), cpu=cpu, cpu_count=os.cpu_count(),
                omp_num_threads=num_threads or (int(os.environ["OMP_NUM_THREADS"])
                                                if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None),
                python=platform.python_version())
    with contextlib.suppress(ImportError):
        import torch

        info.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def file_lock(path: str, blocking: bool = True):
    """An exclusive lock on ``path`` (created) while the block runs; with ``blocking=False`` yields False at once
    when another process holds it. POSIX flock: released by the OS if the holder dies."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def can_resume(out_dir: str) -> bool:
    """True where a run was cut off: a checkpoint (``last_checkpoint``) but no ``model_final.pth``."""
    return os.path.isfile(os.path.join(out_dir, "last_checkpoint")) and \
        not os.path.isfile(os.path.join(out_dir, "model_final.pth"))


def train(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str], num_threads: Optional[int],
          sample_every: float = 30.0, resume: bool = False) -> dict:
    """Train one run with ``train_net.py`` (``--resume``: from the last checkpoint of ``out_dir``, which the
    shapes configs' ``SOLVER.EXACT_RESUME`` makes the same run as an uninterrupted one); returns (and writes to
    ``<out_dir>/run_info.json``) what the record keeps of it: the commit, the machine, the load average sampled
    while it trained, its wall time. The intermediate checkpoints are removed once ``model_final.pth`` is
    written."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, entry.config),
           *(["--resume"] if resume else []), *run_opts(entry, out_dir, iters, seed, extra)]
    print(f"  $ {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    info = dict(code=git_commit(), machine=machine_info(num_threads), started=_now())
    samples, t0 = [], time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    while True:
        la = loadavg()
        if la:
            samples.append(la)
        try:
            rc = proc.wait(timeout=sample_every)
            break
        except subprocess.TimeoutExpired:
            continue
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)
    info.update(run_wall_s=round(time.time() - t0, 1), finished=_now(), load=_load_summary(samples))
    if resume:  # the wall time and the load are those of the resumed part
        info["resumed"] = True
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(os.path.join(out_dir, "model_final.pth")):
        for name in os.listdir(out_dir):  # model_0000499.pth ...: ~120 MB each, needed only to resume
            if re.fullmatch(r"model_\d+\.pth", name):
                os.remove(os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _load_summary(samples: List[List[float]]) -> Optional[dict]:
    """The 1-minute load average over the samples (mean, max) and the last (1, 5, 15)-minute triple."""
    if not samples:
        return None
    ones = [s[0] for s in samples]
    return dict(mean_1min=round(statistics.fmean(ones), 2), max_1min=max(ones), last=samples[-1],
                samples=len(samples))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def inference_parameters(model, batches) -> int:
    """The number of parameters that take part in inference on ``batches`` (an iterable of model inputs): those
    held directly by a module whose ``forward`` ran on one of them. Training-only parts (InterNet's critic, a
    loss's generator) are left out; a parameter is counted once however often its module runs. Heads that run
    only on detections (masks, refinement) count where the batches give some."""
    import torch

    ran = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: ran.add(id(mod))) for m in model.modules()]
    try:
        with torch.no_grad():
            for inputs in batches:
                model(inputs)
    finally:
        for h in hooks:
            h.remove()
    seen, n = set(), 0
    for m in model.modules():
        if id(m) in ran:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
    return n


def evaluate(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str], timing_images: int,
             score: bool, eval_dir: Optional[str] = None):
    """Load ``model_final.pth``; return (COCO results or None, inference ms/img, parameters in millions: a dict
    with ``total`` and ``inference``, see :func:`inference_parameters`). The evaluator writes its files under
    ``eval_dir`` (default ``out_dir``): a variant scored with the same weights gets its own, so the run's
    ``inference/`` keeps the detections of the model itself."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_refine.data import prepare_datasets
    from d2_refine.engine import Trainer, setup_cfg

    opts = [*run_opts(entry, out_dir, iters, seed, extra), "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
    if eval_dir:
        opts += ["OUTPUT_DIR", eval_dir]
    cfg = setup_cfg(os.path.join(REPO, entry.config), opts)
    prepare_datasets(cfg)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    params = dict(total=sum(p.numel() for p in model.parameters()) / 1e6)
    results = None
    if score:
        results = {k: dict(v) for k, v in Trainer.test(cfg, model).items()}
    times = []
    images = iter(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]) if timing_images > 0 else [])
    warm_up = list(itertools.islice(images, 3))
    if warm_up:  # the warm-up images, untimed, are also those the parameters at inference are counted on
        params["inference"] = inference_parameters(model, warm_up) / 1e6
    cuda = cfg.MODEL.DEVICE.startswith("cuda")  # kernels run asynchronously: wait for them around the timer
    with torch.no_grad():
        for inputs in itertools.islice(images, timing_images):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    ms = 1000 * sorted(times)[len(times) // 2] if times else float("nan")
    return results, ms, params


# ------------------------------------------------------------------------------------------ results record
def default_results_path(iters: int) -> str:
    return os.path.join(RESULTS_DIR, f"shapes_{iters}it.json")


def empty_results(iters: int) -> dict:
    return dict(command=f"python tools/benchmark_table.py --iters {iters} ... (each record: one (model, seed) it "
                        "trained and scored; code: the commit it trained from)",
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


def _row_key(name: str):
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
    return dict(doc, records=[merged[k] for k in sorted(merged, key=lambda k: (_row_key(k[0]), k[1]))])


def update_results(path: str, iters: int, change: Callable[[dict], dict]) -> dict:
    """Read the record at ``path`` (or start one), apply ``change`` and write it back atomically, all under the
    lock ``<path>.lock``: concurrent writers never lose each other's records."""
    with file_lock(path + ".lock"):
        doc = load_results(path) if os.path.isfile(path) else empty_results(iters)
        if doc["iters"] != iters:
            raise ValueError(f"{path} records {doc['iters']}-iteration runs, not {iters}")
        doc = change(doc)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    return doc


def record_runs(path: str, iters: int, records: Sequence[dict]) -> dict:
    return update_results(path, iters, lambda doc: merge_records(doc, records))


def make_record(name: str, seed: int, iters: int, metrics: Dict[str, Dict[str, float]], out_dir: str,
                extra: Sequence[str] = (), weights_of: Optional[str] = None) -> dict:
    """One (model, seed) record: its COCO metrics, and what ``out_dir`` tells of its training (detectron2's log,
    and ``run_info.json`` where this tool trained it: commit, machine, load)."""
    entry = ENTRY_BY_NAME[weights_of or name]
    title = row_title(name)
    info = {}
    if os.path.isfile(os.path.join(out_dir, "run_info.json")):
        with open(os.path.join(out_dir, "run_info.json")) as f:
            info = json.load(f)
    log = os.path.join(out_dir, "log.txt")
    rec = dict(model=name, seed=seed, iters=iters, title=title, baseline=entry.baseline, config=entry.config,
               metrics={t: {k: _finite(v) for k, v in sorted(m.items())} for t, m in sorted(metrics.items())
                        if t in ("bbox", "segm")},
               train=dict(s_per_iter=train_speed(log), train_s=train_time(log), run_wall_s=info.get("run_wall_s")),
               machine=info.get("machine"), load=info.get("load"), code=info.get("code"),
               trained=info.get("finished"), recorded=_now(), opts=list(extra),
               run_dir=os.path.relpath(out_dir, REPO) if os.path.abspath(out_dir).startswith(REPO + os.sep)
               else os.path.abspath(out_dir))
    if weights_of:
        rec["weights_of"] = weights_of
    if info.get("resumed"):
        rec["train"]["resumed"] = True  # s/it, train and wall time: the part after the resume
    if not info:
        rec["note"] = "no run_info.json (not trained by this tool's current version): machine, load, commit unknown"
    return rec


# ------------------------------------------------------------------------------------------- aggregation
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


def _metric(rec: dict, task: str, metric: str = "AP") -> Optional[float]:
    return _finite((rec["metrics"].get(task) or {}).get(metric))


def summarize(records: Sequence[dict]) -> List[dict]:
    """One row per model of the records: each metric's mean/std/n over its seeds, the paired Δ box/mask AP to
    its baseline (same seed) with the verdict, and the range of training s/it over the seeds."""
    runs: Dict[str, Dict[int, dict]] = {}
    for r in records:
        runs.setdefault(r["model"], {})[r["seed"]] = r
    rows = []
    for name in sorted(runs, key=_row_key):
        by_seed = runs[name]
        seeds = sorted(by_seed)
        last = by_seed[seeds[-1]]
        # the pairing is the table's: a model's entry names its baseline now; records of models without an
        # entry (and the tests' made-up ones) keep the baseline they were recorded with
        base = ENTRY_BY_NAME[name].baseline if name in ENTRY_BY_NAME else last.get("baseline")
        keys = sorted({(t, m) for r in by_seed.values() for t, ms in r["metrics"].items() for m in ms})
        stats: Dict[str, Dict[str, dict]] = {}
        for task, metric in keys:
            s = mean_std(_metric(by_seed[x], task, metric) for x in seeds)
            if s:
                stats.setdefault(task, {})[metric] = s
        delta: Dict[str, Optional[dict]] = {}
        if base in runs:
            for task in ("bbox", "segm"):
                pairs = {x: _metric(by_seed[x], task) - _metric(runs[base][x], task) for x in seeds
                         if x in runs[base] and _metric(by_seed[x], task) is not None
                         and _metric(runs[base][x], task) is not None}
                d = mean_std(pairs.values())
                delta[task] = d and dict(d, seeds=sorted(pairs))
        if base is None:
            base_title = None
        elif base in runs:
            base_title = runs[base][max(runs[base])].get("title", base)
        else:
            base_title = ENTRY_BY_NAME[base].title if base in ENTRY_BY_NAME else base
        speeds = [by_seed[x]["train"].get("s_per_iter") for x in seeds if by_seed[x].get("train")]
        speeds = [v for v in speeds if v is not None]
        minutes = [by_seed[x]["train"]["train_s"] / 60 for x in seeds
                   if (by_seed[x].get("train") or {}).get("train_s") and not by_seed[x]["train"].get("resumed")]
        loads = [by_seed[x]["load"]["mean_1min"] for x in seeds if (by_seed[x].get("load") or {}).get("mean_1min")]
        rows.append(dict(name=name, title=last.get("title", name), baseline=base, baseline_title=base_title,
                         seeds=seeds, n=len(seeds), stats=stats, delta=delta,
                         verdict=verdict(delta.get("bbox")) if base in runs else ("no baseline run" if base else "–"),
                         s_per_iter=[min(speeds), max(speeds)] if speeds else None,
                         train_min=[min(minutes), max(minutes)] if minutes else None,
                         load=[min(loads), max(loads)] if loads else None))
    return rows


# ------------------------------------------------------------------------------------------------ output
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


def _speed(r: dict) -> str:
    return _range(r["s_per_iter"])


def _training(r: dict) -> str:
    """'23–25 min (load 2.1–2.5)': the range over the seeds of the training time and of the mean load."""
    if not r.get("train_min"):
        return "–"
    load = f" (load {_range(r['load'], 1)})" if r.get("load") else ""
    return f"{_range(r['train_min'], 0)} min{load}"


def _timing_caption(doc: dict, names: Sequence[str]) -> str:
    used = sorted({doc["timing"][n]["pass"] for n in names if n in doc["timing"]})
    if not used:
        return "inference ms/img: not measured yet (`--timing-only`)."
    parts = []
    for pid in used:
        p = doc["timing_passes"].get(pid, {})
        m = p.get("machine") or {}
        where = m.get("gpu") if str(p.get("device", "")).startswith("cuda") else \
            f"{m.get('cpu') or 'CPU'}, {m.get('torch_threads', '?')} threads"
        timed = [n for n in names if doc["timing"].get(n, {}).get("pass") == pid]
        rows = "" if len(used) == 1 else f" ({', '.join(timed)})"
        la = (p.get("load_before") or ["?"])[0]
        parts.append(f"{pid}: seed {p.get('seed', '?')}'s checkpoints, median over {p.get('images', '?')} val "
                     f"images after 3 warm-up, {where}, load {la} before{rows}")
    head = "one pass in one process" if len(used) == 1 else f"{len(used)} passes"
    return f"inference ms/img: batch 1, measured apart from training ({head}): " + "; ".join(parts) + "."


def markdown(rows: List[dict], doc: dict, command: str, source: str = "") -> str:
    head = ("| model | baseline | seeds | box AP | AP50 | AP75 | AP90 | APs | mask AP | Δ box AP | Δ mask AP "
            "| verdict | train s/it | training | inference ms/img |")
    seeds = sorted({x for r in rows for x in r["seeds"]})
    lines = [f"Schedule: {doc['iters']} iterations from scratch per run, seeds {', '.join(map(str, seeds))}, scored "
             f"by COCOEvaluator on `shapes_val`. Written from {source or 'the results record'} by:", "",
             "```bash", command, "```", "",
             "Each cell: mean ± sample standard deviation (n − 1) over the row's n seeds (`seeds`). Δ: the "
             "difference to the baseline run with the same seed, mean ± std over the seeds both have ('(n=k)' where "
             f"fewer than the row's); {VERDICT_RULE}. train s/it: detectron2's overall training speed, the range "
             "over the seeds; training: the range of the training times over the seeds (resumed runs left out) and "
             "of the 1-minute load average while each run trained. "
             f"{_timing_caption(doc, [r['name'] for r in rows])}", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        n, st = r["n"], r["stats"]
        cells = [fmt_stat(st.get(task, {}).get(metric), n) for task, metric in METRICS]
        d = r["delta"]
        timing = doc["timing"].get(r["name"], {})
        lines.append(f"| {r['title']} | {r['baseline_title'] or '–'} | {n} | " + " | ".join(cells)
                     + f" | {fmt_stat(d.get('bbox'), n, sign=True)} | {fmt_stat(d.get('segm'), n, sign=True)} | "
                       f"{r['verdict']} | {_speed(r)} | {_training(r)} | {fmt(timing.get('ms_per_img'), 0)} |")
    done = {r["name"] for r in rows}
    missing = [n for n in ROW_ORDER if n not in done]
    if missing:
        lines += ["", "Not in the record yet (no run at this schedule): " + ", ".join(map(row_title, missing)) + "."]
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


def embed(readme: str, table: str) -> None:
    text = open(readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to put the table between")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(before + START + "\n" + table + END + after)


def write_outputs(doc: dict, args, source: str, command: str) -> List[dict]:
    """table.md, table.json, and the README block / the figure where asked, from the results record alone."""
    rows = summarize(doc["records"])
    if not rows:
        raise SystemExit(f"{source} has no records yet: train runs first")
    rel = os.path.relpath(source, REPO) if os.path.abspath(source).startswith(REPO + os.sep) else source
    table = markdown(rows, doc, command, f"`{rel}`")
    out = args.out or os.path.join(args.output_dir, f"{doc['iters']}it", "table.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(table_json(rows, doc), f, indent=1)
    if args.readme:
        embed(args.readme, table)
    if args.figure:
        import plots  # a sibling script: tools/ is on sys.path when a script of it runs

        plots.plot_delta(doc, args.figure)
        print(f"wrote {args.figure}")
    print(table)
    return table_json(rows, doc)["rows"]


# ------------------------------------------------------------------------------------------------- runs
def _recorded(path: str) -> set:
    if not os.path.isfile(path):
        return set()
    with file_lock(path + ".lock"):
        return {(r["model"], r["seed"]) for r in load_results(path)["records"]}


def pending_runs(entries: Sequence[Entry], seeds: Sequence[int], results: str, eval_only: bool = False):
    """The (entry, seed) pairs with a model or variant not recorded yet (all of them for ``eval_only``)."""
    done = set() if eval_only else _recorded(results)
    return [(e, s) for s in seeds for e in entries if any((n, s) not in done for n in (e.name, *e.variants))]


def run_one(entry: Entry, seed: int, args, blocking: bool = True) -> Optional[List[dict]]:
    """Train (if its folder has no checkpoint), score and record one (model, seed) and its variants; returns the
    records written, or None when another process holds the run (``blocking=False``)."""
    root = os.path.join(args.output_dir, f"{args.iters}it")
    out_dir = run_dir(root, entry.name, seed)
    with file_lock(os.path.join(out_dir, ".lock"), blocking) as held:
        if not held:
            return None
        done = set() if args.eval_only else _recorded(args.results)
        names = [n for n in (entry.name, *entry.variants) if (n, seed) not in done]
        if not names:
            print(f"{entry.name} seed {seed}: recorded in {args.results}", flush=True)
            return []
        ckpt = os.path.join(out_dir, "model_final.pth")
        if not os.path.isfile(ckpt):
            if args.eval_only:
                raise SystemExit(f"--eval-only: no checkpoint {ckpt}; train it first (drop --eval-only)")
            resume = can_resume(out_dir)
            print(f"{entry.name} seed {seed}: {'resuming' if resume else 'training'} {args.iters} iterations in "
                  f"{out_dir}", flush=True)
            train(entry, out_dir, args.iters, seed, args.opts, args.num_threads, resume=resume)
            names = [entry.name, *entry.variants]
        else:
            print(f"{entry.name} seed {seed}: using {ckpt}", flush=True)
        fresh = None if args.eval_only else final_results(os.path.join(out_dir, "metrics.json"), args.iters)
        records = []
        if entry.name in names:
            scored = None
            if fresh is None:  # scored again from the checkpoint
                fresh = evaluate(entry, out_dir, args.iters, seed, args.opts, 0, True)[0]
                scored = dict(code=git_commit(), at=_now())  # may differ from the code that trained it
            records.append(make_record(entry.name, seed, args.iters, fresh, out_dir, args.opts))
            if scored:
                records[-1]["scored_again"] = scored
        for vname, (_, vopts) in entry.variants.items():
            if vname in names:
                vres = evaluate(entry, out_dir, args.iters, seed, [*args.opts, *vopts], 0, True,
                                eval_dir=os.path.join(out_dir, vname))[0]
                records.append(make_record(vname, seed, args.iters, vres, out_dir, args.opts, weights_of=entry.name))
        record_runs(args.results, args.iters, records)
        for r in records:
            print(f"  recorded {r['model']} seed {seed}: box AP {fmt(_metric(r, 'bbox'))} in {args.results}",
                  flush=True)
        return records


def run_sequential(pending, args) -> None:
    """One run after another; a run another process holds is left for the end, then waited for."""
    busy = [(e, s) for e, s in pending if run_one(e, s, args, blocking=False) is None]
    for e, s in busy:
        print(f"{e.name} seed {s}: another process holds it, waiting", flush=True)
        run_one(e, s, args, blocking=True)


def _worker_argv(args) -> List[str]:
    argv = ["--iters", str(args.iters), "--output-dir", args.output_dir, "--results", args.results]
    if args.num_threads:
        argv += ["--num-threads", str(args.num_threads)]
    if args.eval_only:
        argv.append("--eval-only")
    return argv


def run_pool(pending, args, poll: float = 5.0) -> None:
    """``args.jobs`` runs at a time, each in a worker process of this tool (which records its own runs)."""
    from d2_refine.data import prepare_datasets
    from d2_refine.engine import setup_cfg

    for e in {e.name: e for e, _ in pending}.values():  # generate the datasets once, before the workers start
        prepare_datasets(setup_cfg(os.path.join(REPO, e.config), run_opts(e, args.output_dir, args.iters, 1,
                                                                          args.opts)))
    queue, running, failed = list(pending), {}, []
    while queue or running:
        while queue and len(running) < args.jobs:
            e, s = queue.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), *_worker_argv(args), "--seeds", str(s),
                   "--worker", e.name, "--opts", *args.opts]
            print(f"[jobs] starting {e.name} seed {s}", flush=True)
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.num_threads)} if args.num_threads else {}))
            running[subprocess.Popen(cmd, cwd=REPO, env=env)] = (e.name, s)
        time.sleep(poll)
        for proc in [p for p in running if p.poll() is not None]:
            name, s = running.pop(proc)
            print(f"[jobs] {name} seed {s}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}",
                  flush=True)
            if proc.returncode:
                failed.append(f"{name} seed {s}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their logs: <run folder>/log.txt); the others are recorded")


def time_rows(entries: Sequence[Entry], args) -> dict:
    """One timing pass, in this process, over every model (and variant) whose checkpoint of ``--timing-seed``
    exists; merged into the record's ``timing`` (rows timed before by another pass keep theirs)."""
    import torch

    root = os.path.join(args.output_dir, f"{args.iters}it")
    pass_id = _now()
    info = dict(seed=args.timing_seed, images=args.timing_images, load_before=loadavg(), code=git_commit(),
                machine=dict(machine_info(), torch_threads=torch.get_num_threads()))
    rows = {}
    for e in entries:
        out_dir = run_dir(root, e.name, args.timing_seed)
        if not os.path.isfile(os.path.join(out_dir, "model_final.pth")):
            print(f"timing: {e.name} has no seed {args.timing_seed} checkpoint in {out_dir}; skipped", flush=True)
            continue
        if "device" not in info:
            from d2_refine.engine import setup_cfg

            info["device"] = setup_cfg(os.path.join(REPO, e.config), run_opts(e, out_dir, args.iters, args.timing_seed,
                                                                             args.opts)).MODEL.DEVICE
        for name, vopts in [(e.name, []), *((v, o) for v, (_, o) in e.variants.items())]:
            _, ms, params = evaluate(e, out_dir, args.iters, args.timing_seed, [*args.opts, *vopts],
                                     args.timing_images, False)
            used = params.get("inference", float("nan"))  # nan: no val image to run
            rows[name] = dict(ms_per_img=round(ms, 1), params_m=round(params["total"], 3),
                              params_inference_m=round(used, 3), **{"pass": pass_id})
            print(f"timing: {name} {ms:.1f} ms/img, {params['total']:.1f} M parameters "
                  f"({used:.1f} M at inference)", flush=True)
    info["load_after"] = loadavg()

    def change(doc):
        timing = dict(doc["timing"], **rows)
        passes = dict(doc["timing_passes"], **{pass_id: info})
        used = {t["pass"] for t in timing.values()}
        return dict(doc, timing=timing, timing_passes={k: v for k, v in passes.items() if k in used})

    return update_results(args.results, args.iters, change) if rows else {}


# -------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000, help="training iterations of every model (default: 2000)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to train (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="one seed: the same as --seeds SEED")
    p.add_argument("--only", nargs="+", choices=sorted(ENTRY_BY_NAME), help="these models (and their baselines)")
    p.add_argument("--output-dir", default=os.path.join(REPO, "output", "benchmark_table"))
    p.add_argument("--results", default=None,
                   help="the results record (JSON, default: docs/results/shapes_<iters>it.json)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process")
    p.add_argument("--eval-only", action="store_true", help="score existing checkpoints again, never train")
    p.add_argument("--timing-only", action="store_true", help="only time inference from the checkpoints")
    p.add_argument("--no-timing", action="store_true", help="no timing pass after training")
    p.add_argument("--timing-seed", type=int, default=None, help="whose checkpoints are timed (default: first seed)")
    p.add_argument("--timing-images", type=int, default=50)
    p.add_argument("--from-json", nargs="?", const="", default=None, metavar="RESULTS",
                   help="only write the table (and --readme, --figure) from a results record (default: "
                        "docs/results/shapes_<iters>it.json); needs neither checkpoints nor detectron2")
    p.add_argument("--num-threads", type=int, default=None, help="OMP_NUM_THREADS of the training processes")
    p.add_argument("--out", default=None, help="the Markdown table (default: <output-dir>/<iters>it/table.md)")
    p.add_argument("--readme", default=None, help=f"also put the table between {START} and {END} in this file")
    p.add_argument("--figure", default=None, help="also draw Δ vs baseline into this PNG (tools/plots.py)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, from --jobs
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
    if args.results is None:
        args.results = default_results_path(args.iters)
    schedule_opts(args.iters, 1)  # checks --iters
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
    if args.worker:
        for s in args.seeds:
            run_one(ENTRY_BY_NAME[args.worker], s, args)
        return []
    names = list(args.only or ENTRY_BY_NAME)
    for n in list(names):  # a method is always trained next to its baseline, and that one next to its own
        b = ENTRY_BY_NAME[n].baseline
        while b and b not in names:
            names.insert(0, b)
            b = ENTRY_BY_NAME[b].baseline
    entries = [e for e in ENTRIES if e.name in names]
    if not args.timing_only:
        pending = pending_runs(entries, args.seeds, args.results, args.eval_only)
        print(f"{len(pending)} of {len(entries) * len(args.seeds)} runs to train or record "
              f"({args.results})", flush=True)
        if args.jobs > 1 and len(pending) > 1:
            run_pool(pending, args)
        else:
            run_sequential(pending, args)
    if args.timing_only or not args.no_timing:
        time_rows(entries, args)
    if not os.path.isfile(args.results):
        raise SystemExit(f"no results record {args.results}: nothing was trained or recorded")
    return write_outputs(load_results(args.results), args, args.results, command.strip())


if __name__ == "__main__":
    main()
