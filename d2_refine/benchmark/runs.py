"""The runs of the benchmark: each (model, seed) trained by ``train_net.py`` in its own folder, scored with
COCOEvaluator, recorded; runs side by side in a process pool; one inference timing pass over the checkpoints."""
import concurrent.futures
import itertools
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
from typing import List, Optional, Sequence

from d2_refine.collect_env import machine_info

from .entries import Entry, regime_entries, run_opts
from .logs import final_results
from .record import REPO, git_commit, make_record, now, record_runs, recorded, update_results, write_json
from .stats import metric
from .timer import time_call


def regime_root(output_dir: str, iters: int, regime: str = "scratch") -> str:
    """``<output-dir>/<iters>it`` from scratch, ``<output-dir>/finetune_<iters>it`` from the pretrained trunk."""
    return os.path.join(output_dir, f"{iters}it" if regime == "scratch" else f"{regime}_{iters}it")


def run_dir(root: str, name: str, seed: int) -> str:
    """``<root>/seed<S>/<name>``; for seed 1, the single-seed layout ``<root>/<name>`` where only it holds a
    checkpoint."""
    new = os.path.join(root, f"seed{seed}", name)
    legacy = os.path.join(root, name)
    if seed == 1 and not os.path.isfile(os.path.join(new, "model_final.pth")) \
            and os.path.isfile(os.path.join(legacy, "model_final.pth")):
        return legacy
    return new


def can_resume(out_dir: str) -> bool:
    """True where a run was cut off: a checkpoint (``last_checkpoint``) but no ``model_final.pth``."""
    return os.path.isfile(os.path.join(out_dir, "last_checkpoint")) and \
        not os.path.isfile(os.path.join(out_dir, "model_final.pth"))


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _load_summary(samples: List[List[float]]) -> Optional[dict]:
    """The 1-minute load average over the samples (mean, max) and the last (1, 5, 15)-minute triple."""
    if not samples:
        return None
    ones = [s[0] for s in samples]
    return dict(mean_1min=round(statistics.fmean(ones), 2), max_1min=max(ones), last=samples[-1],
                samples=len(samples))


def train(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str], num_threads: Optional[int],
          sample_every: float = 30.0, resume: bool = False) -> dict:
    """Train one run with ``train_net.py`` (``--resume``: from the last checkpoint of ``out_dir``, which the
    shapes configs' ``SOLVER.EXACT_RESUME`` makes the same run as an uninterrupted one); returns (and writes to
    ``<out_dir>/run_info.json``) what the record keeps of it: the commit, the machine, the load average sampled
    while it trained, its wall time. The intermediate checkpoints are removed once ``model_final.pth`` is
    written."""
    import time

    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, entry.config),
           *(["--resume"] if resume else []), *run_opts(entry, out_dir, iters, seed, extra)]
    print(f"  $ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(num_threads)} if num_threads else {}))
    info = dict(code=git_commit(), machine=machine_info(num_threads), started=now())
    if resume:  # the wall time and the load will be those of the resumed part
        info["resumed"] = True
    # written now and again at the end: a run cut off after model_final.pth (in train_net.py's final evaluation,
    # which the next invocation redoes) keeps its commit and machine
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "run_info.json"), info)
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
    info.update(run_wall_s=round(time.time() - t0, 1), finished=now(), load=_load_summary(samples))
    drop_intermediate_checkpoints(out_dir)
    write_json(os.path.join(out_dir, "run_info.json"), info)
    return info


def drop_intermediate_checkpoints(out_dir: str) -> None:
    """Remove ``model_0000499.pth`` ... (~120 MB each, needed only to resume) where ``model_final.pth`` exists."""
    if os.path.isfile(os.path.join(out_dir, "model_final.pth")):
        for name in os.listdir(out_dir):
            if re.fullmatch(r"model_\d+\.pth", name):
                os.remove(os.path.join(out_dir, name))


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
    images = iter(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]) if timing_images > 0 else [])
    warm_up = list(itertools.islice(images, 3))
    if warm_up:  # the warm-up images, untimed, are also those the parameters at inference are counted on
        params["inference"] = inference_parameters(model, warm_up) / 1e6
    with torch.no_grad():
        times = [time_call(model, inputs, device=cfg.MODEL.DEVICE)[1]
                 for inputs in itertools.islice(images, timing_images)]
    ms = 1000 * sorted(times)[len(times) // 2] if times else float("nan")
    return results, ms, params


# ------------------------------------------------------------------------------------------------- runs
def pending_runs(entries: Sequence[Entry], seeds: Sequence[int], results: str, eval_only: bool = False):
    """The (entry, seed) pairs with a model or variant not recorded yet (all of them for ``eval_only``)."""
    done = set() if eval_only else recorded(results)
    return [(e, s) for s in seeds for e in entries if any((n, s) not in done for n in (e.name, *e.variants))]


def run_one(entry: Entry, seed: int, args, blocking: bool = True) -> Optional[List[dict]]:
    """Train (if its folder has no checkpoint), score and record one (model, seed) and its variants; returns the
    records written, or None when another process holds the run (``blocking=False``)."""
    from .record import file_lock

    out_dir = run_dir(regime_root(args.output_dir, args.iters, args.regime), entry.name, seed)
    with file_lock(os.path.join(out_dir, ".lock"), blocking) as held:
        if not held:
            return None
        done = set() if args.eval_only else recorded(args.results)
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
                scored = dict(code=git_commit(), at=now())  # may differ from the code that trained it
                drop_intermediate_checkpoints(out_dir)  # left by a run cut off in its final evaluation
            records.append(make_record(entry.name, seed, args.iters, fresh, out_dir, args.opts, config=entry.config))
            if scored:
                records[-1]["scored_again"] = scored
        for vname, (_, vopts) in entry.variants.items():
            if vname in names:
                vres = evaluate(entry, out_dir, args.iters, seed, [*args.opts, *vopts], 0, True,
                                eval_dir=os.path.join(out_dir, vname))[0]
                records.append(make_record(vname, seed, args.iters, vres, out_dir, args.opts, weights_of=entry.name,
                                           config=entry.config))
        record_runs(args.results, args.iters, records)
        for r in records:
            ap = metric(r, "bbox")
            print(f"  recorded {r['model']} seed {seed}: box AP {'–' if ap is None else f'{ap:.1f}'} in "
                  f"{args.results}", flush=True)
        return records


def run_sequential(pending, args) -> None:
    """One run after another; a run another process holds is left for the end, then waited for."""
    busy = [(e, s) for e, s in pending if run_one(e, s, args, blocking=False) is None]
    for e, s in busy:
        print(f"{e.name} seed {s}: another process holds it, waiting", flush=True)
        run_one(e, s, args, blocking=True)


def _init_worker(num_threads: Optional[int]) -> None:
    if num_threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        torch.set_num_threads(num_threads)


def _run_named(name: str, seed: int, args):
    """:func:`run_one` of the model ``name`` of ``args.regime`` (in a worker: entries hold functions, which do
    not pickle)."""
    return run_one(next(e for e in regime_entries(args.regime) if e.name == name), seed, args)


def run_pool(pending, args) -> None:
    """``args.jobs`` runs at a time, each in a worker process (a fresh interpreter) that trains, scores and
    records its own run."""
    from d2_refine.data import prepare_datasets
    from d2_refine.engine import setup_cfg

    for e in {e.name: e for e, _ in pending}.values():  # generate the datasets once, before the workers start
        prepare_datasets(setup_cfg(os.path.join(REPO, e.config), run_opts(e, args.output_dir, args.iters, 1,
                                                                          args.opts)))
    failed = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(args.num_threads,)) as pool:
        futures = {}
        for e, s in pending:
            print(f"[jobs] queued {e.name} seed {s}", flush=True)
            futures[pool.submit(_run_named, e.name, s, args)] = f"{e.name} seed {s}"
        for fut in concurrent.futures.as_completed(futures):
            error = fut.exception()
            print(f"[jobs] {futures[fut]}: {'done' if error is None else f'FAILED ({error!r})'}", flush=True)
            if error is not None:
                failed.append(futures[fut])
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their logs: <run folder>/log.txt); the others are recorded")


def time_rows(entries: Sequence[Entry], args) -> dict:
    """One timing pass, in this process, over every model (and variant) whose checkpoint of ``--timing-seed``
    exists; merged into the record's ``timing`` (rows timed before by another pass keep theirs)."""
    import torch

    root = regime_root(args.output_dir, args.iters, args.regime)
    pass_id = now()
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
