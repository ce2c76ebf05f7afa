"""tools/benchmark_table.py: the schedule, the parsing of detectron2's outputs, the results record (merge, lock),
the aggregation over seeds (mean/std, paired Δ, verdict), the table from the JSON alone, and one tiny real run."""
import json
import os
import subprocess
import sys

import pytest

from d2_refine.utils.testing import tiny_shapes_opts
from helpers import load_tool

bt = load_tool("benchmark_table")
REPO = bt.REPO


def test_schedule_scales_the_default_one():
    opts = dict(zip(*[iter(bt.schedule_opts(2000, 1))] * 2))
    assert opts["SOLVER.MAX_ITER"] == "2000" and opts["SOLVER.STEPS"] == "(1500, 1800)"
    assert opts["SOLVER.WARMUP_ITERS"] == "200" and opts["SEED"] == "1"
    assert opts["SOLVER.CHECKPOINT_PERIOD"] == "500"  # a quarter: what a run cut off resumes from
    assert dict(zip(*[iter(bt.schedule_opts(400, 3))] * 2))["SOLVER.STEPS"] == "(300, 360)"
    with pytest.raises(ValueError, match="at least 10"):
        bt.schedule_opts(5, 1)


def test_every_entry_config_exists_and_baselines_are_entries():
    for e in bt.ENTRIES:
        assert os.path.isfile(os.path.join(REPO, e.config)), e.config
        assert e.baseline is None or e.baseline in bt.ENTRY_BY_NAME
        assert e.config == bt.CONFIGS[e.name]
    assert {"ifr_ws", "cascade_ifr", "internet_ot", "internet_makeup"} <= set(bt.ENTRY_BY_NAME)
    # Cascade + IFR is paired with the cascade alone, which is paired with Mask R-CNN
    assert bt.ENTRY_BY_NAME["cascade_ifr"].baseline == "cascade_mask_rcnn"
    assert bt.ENTRY_BY_NAME["cascade_mask_rcnn"].baseline == "mask_rcnn"
    assert bt.ROW_ORDER[-2:] == ["rdsnet", "rdsnet_mbrm"] and bt.VARIANT_OF == {"rdsnet_mbrm": "rdsnet"}


def test_ifr_warm_up_is_the_papers_fraction_of_the_schedule():
    assert bt.ENTRY_BY_NAME["ifr"].opts(900) == ["MODEL.IFR.PRETRAIN_STEPS", "500"]
    assert bt.ENTRY_BY_NAME["cascade_ifr"].opts(900) == ["MODEL.IFR.PRETRAIN_STEPS", "500"]
    assert bt.ENTRY_BY_NAME["ifr_ws"].opts(900) == []  # explicit: no warm-up


def test_final_results_and_speed_are_read_from_detectron2_outputs(tmp_path):
    lines = [{"iteration": 1, "total_loss": 2.0},
             {"iteration": 9, "bbox/AP": 10.0, "bbox/AP75": 5.0, "segm/AP": 8.0, "total_loss": 1.0},
             {"iteration": 19, "bbox/AP": 30.0, "bbox/AP75": 20.0, "bbox/APl": float("nan"), "segm/AP": 25.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = bt.final_results(str(tmp_path / "metrics.json"))
    assert res == {"bbox": {"AP": 30.0, "AP75": 20.0, "APl": None}, "segm": {"AP": 25.0}}  # NaN: None in JSON
    assert bt.final_results(str(tmp_path / "missing.json")) is None
    # a run is finished only when the last evaluation is the one after training (logged at MAX_ITER)
    assert bt.final_results(str(tmp_path / "metrics.json"), min_iteration=19) == res
    assert bt.final_results(str(tmp_path / "metrics.json"), min_iteration=20) is None
    (tmp_path / "log.txt").write_text(
        "d2.engine.hooks: Overall training speed: 8 iterations in 0:00:10 (1.2500 s / it)\n"
        "d2.engine.hooks: Overall training speed: 398 iterations in 0:06:10 (0.9300 s / it)\n")
    assert bt.train_speed(str(tmp_path / "log.txt")) == pytest.approx(0.93)
    assert bt.train_time(str(tmp_path / "log.txt")) == pytest.approx(370.0)
    assert bt.train_time(str(tmp_path / "absent.txt")) is None


def test_seed_one_reads_the_single_seed_layout_where_only_it_has_a_checkpoint(tmp_path):
    assert bt.run_dir(str(tmp_path), "iounet", 1) == str(tmp_path / "seed1" / "iounet")
    (tmp_path / "iounet").mkdir()
    (tmp_path / "iounet" / "model_final.pth").write_bytes(b"x")
    assert bt.run_dir(str(tmp_path), "iounet", 1) == str(tmp_path / "iounet")
    assert bt.run_dir(str(tmp_path), "iounet", 2) == str(tmp_path / "seed2" / "iounet")
    (tmp_path / "seed1" / "iounet").mkdir(parents=True)
    (tmp_path / "seed1" / "iounet" / "model_final.pth").write_bytes(b"x")
    assert bt.run_dir(str(tmp_path), "iounet", 1) == str(tmp_path / "seed1" / "iounet")


def test_seed_options():
    assert bt.parse_args(["--seed", "3"]).seeds == [3]
    assert bt.parse_args([]).seeds == [1]
    args = bt.parse_args(["--seeds", "2", "1", "--iters", "300"])
    assert args.seeds == [2, 1] and args.timing_seed == 2
    assert args.results == os.path.join(REPO, "docs", "results", "shapes_300it.json")
    for bad in (["--seed", "1", "--seeds", "2"], ["--seeds", "1", "1"], ["--jobs", "0"], ["--iters", "5"]):
        with pytest.raises((SystemExit, ValueError)):
            bt.parse_args(bad)


def _rec(model, seed, box, mask=None, baseline=None, s_it=1.0, iters=100, train_s=None, load=None, resumed=False):
    bbox = {"AP": box, "AP50": box + 20, "AP75": box + 5, "AP90": box - 20, "APs": box - 1}
    metrics = {"bbox": bbox, **({"segm": {"AP": mask}} if mask is not None else {})}
    train = {"s_per_iter": s_it, "train_s": train_s, **({"resumed": True} if resumed else {})}
    return dict(model=model, seed=seed, iters=iters, title=model.upper(), baseline=baseline, metrics=metrics,
                train=train, load={"mean_1min": load} if load else None)


def _records():
    return [
        *(_rec("mask_rcnn", s, box, mask, s_it=1.0 + s / 10, train_s=1200.0 + 300 * s, load=2.0 + s / 10,
               resumed=s == 3)  # a resumed run's time is that of its second part: left out of the range
          for s, box, mask in ((1, 50.0, 45.0), (2, 52.0, 46.0), (3, 54.0, 47.0))),
        *(_rec("ifr", s, box, mask, "mask_rcnn")
          for s, box, mask in ((1, 53.0, 46.0), (2, 55.0, 47.0), (3, 57.5, 48.0))),
        _rec("fpt_lite", 1, 49.0, 45.0, "mask_rcnn"), _rec("fpt_lite", 2, 53.0, 46.0, "mask_rcnn"),  # seed 3 missing
        *(_rec("internet_l2", s, box, None, "mask_rcnn") for s, box in ((1, 48.0), (2, 49.5), (3, 51.0))),
        *(_rec("fpt_paper", s, box, None, "mask_rcnn") for s, box in ((2, 50.0), (3, 50.0), (4, 60.0))),
        _rec("faster_rcnn", 1, 40.0), _rec("faster_rcnn", 2, 41.0),
        _rec("iounet", 1, 42.0, None, "faster_rcnn"),
        _rec("rdsnet", 1, 12.0, 10.0, "retinanet"),  # its baseline has no record
    ]


def test_mean_std_and_the_verdict_rule():
    s = bt.mean_std([50.0, 52.0, 54.0])
    assert s["mean"] == pytest.approx(52.0) and s["std"] == pytest.approx(2.0) and s["n"] == 3  # n - 1
    assert bt.mean_std([None, 2.0]) == {"mean": 2.0, "std": None, "n": 1}
    assert bt.mean_std([None]) is None and bt.verdict(None) == "–"
    assert bt.verdict(bt.mean_std([3.0])) == "1 seed: no verdict"
    assert bt.verdict(bt.mean_std([1.0, 1.0])) == "gain"  # no spread: any positive mean
    assert bt.verdict(bt.mean_std([0.0, 0.0])) == "level"
    assert bt.verdict(bt.mean_std([2.0, 3.0, 4.0])) == "gain"  # 3 > 2 x 1
    assert bt.verdict(bt.mean_std([1.0, 3.0, 5.0])) == "level"  # 3 < 2 x 2
    assert bt.verdict(bt.mean_std([-1.0, -3.0, -5.0])) == "level"
    assert bt.verdict(bt.mean_std([-2.0, -3.0, -4.0])) == "loss"


def test_summary_over_seeds_with_missing_seeds_and_a_single_seed():
    rows = {r["name"]: r for r in bt.summarize(_records())}
    assert list(rows) == ["mask_rcnn", "faster_rcnn", "iounet", "fpt_lite", "fpt_paper", "ifr", "internet_l2",
                          "rdsnet"]  # the table's order, not the records'
    m = rows["mask_rcnn"]
    assert m["n"] == 3 and m["seeds"] == [1, 2, 3] and m["verdict"] == "–" and m["delta"] == {}
    assert m["stats"]["bbox"]["AP"] == {"mean": pytest.approx(52.0), "std": pytest.approx(2.0), "n": 3}
    assert m["stats"]["segm"]["AP"]["std"] == pytest.approx(1.0) and m["s_per_iter"] == pytest.approx([1.1, 1.3])
    ifr = rows["ifr"]["delta"]
    assert ifr["bbox"]["mean"] == pytest.approx(19 / 6) and ifr["bbox"]["std"] == pytest.approx(0.288675, abs=1e-6)
    assert ifr["segm"] == {"mean": pytest.approx(1.0), "std": pytest.approx(0.0), "n": 3, "seeds": [1, 2, 3]}
    assert rows["ifr"]["verdict"] == "gain"
    # seed 3 missing: the pairs are seeds 1 and 2 (Δ -1, +1)
    fpt = rows["fpt_lite"]
    assert fpt["n"] == 2 and fpt["delta"]["bbox"]["seeds"] == [1, 2] and fpt["verdict"] == "level"
    assert fpt["delta"]["bbox"]["std"] == pytest.approx(2 ** 0.5)
    assert rows["internet_l2"]["verdict"] == "loss" and "segm" not in rows["internet_l2"]["stats"]
    assert rows["internet_l2"]["delta"]["segm"] is None  # no mask AP to pair
    # the baseline lacks seed 4: that seed counts in the row's mean, not in Δ
    paper = rows["fpt_paper"]
    assert paper["stats"]["bbox"]["AP"]["mean"] == pytest.approx(160 / 3) and paper["delta"]["bbox"]["n"] == 2
    assert paper["delta"]["bbox"]["mean"] == pytest.approx(-3.0) and paper["verdict"] == "loss"  # -3 < -2 x 1.41
    assert rows["iounet"]["verdict"] == "1 seed: no verdict" and rows["iounet"]["delta"]["bbox"]["n"] == 1
    assert rows["rdsnet"]["verdict"] == "no baseline run" and rows["rdsnet"]["baseline_title"] == "RetinaNet (FPN)"


def test_markdown_states_the_spread_the_pairs_and_the_rule():
    doc = dict(bt.empty_results(100), records=_records())
    md = bt.markdown(bt.summarize(doc["records"]), doc, "python tools/benchmark_table.py --from-json x.json")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 10 and all(line.count("|") == table[0].count("|") == 16 for line in table)
    assert ("| MASK_RCNN | – | 3 | 52.0 ± 2.0 | 72.0 ± 2.0 | 57.0 ± 2.0 | 32.0 ± 2.0 | 51.0 ± 2.0 | 46.0 ± 1.0 "
            "| – | – | – | 1.10–1.30 | 25–30 min (load 2.1–2.3) | – |") in table
    assert "| IFR | MASK_RCNN | 3 | 55.2 ± 2.3 | " in md and "| +3.2 ± 0.3 | +1.0 ± 0.0 | gain | 1.00 | – | – |" in md
    assert "| +0.0 ± 1.4 | +0.0 ± 0.0 | level |" in md
    assert "| −" not in md and "| -3.0 ± 1.4 (n=2) | – | loss |" in md  # fewer pairs than the row's seeds
    assert "| 42.0 | 62.0 | 47.0 | 22.0 | 41.0 | – | +2.0 | – | 1 seed: no verdict |" in md
    assert "mean Δ > 2 × std(Δ)" in md and "n ≥ 2" in md and "seeds 1, 2, 3, 4" in md
    assert "not measured yet" in md
    missing = md.split("Not in the record yet (no run at this schedule): ")[1].splitlines()[0]
    assert "RetinaNet (FPN)" in missing and "RDSNet + MBRM (same weights)" in missing and "(ot)" in missing
    assert "IoU-Net" not in missing and "Mask R-CNN (FPN)" not in missing.split(", ")


def test_records_merge_and_replace_per_model_and_seed(tmp_path):
    path = str(tmp_path / "results" / "shapes_100it.json")
    bt.record_runs(path, 100, [_rec("ifr", 1, 50.0, 40.0, "mask_rcnn"), _rec("mask_rcnn", 2, 49.0, 40.0)])
    bt.record_runs(path, 100, [_rec("mask_rcnn", 1, 48.0, 40.0)])
    doc = bt.record_runs(path, 100, [_rec("ifr", 1, 51.5, 41.0, "mask_rcnn")])  # recorded again: replaced
    assert [(r["model"], r["seed"]) for r in doc["records"]] == [("mask_rcnn", 1), ("mask_rcnn", 2), ("ifr", 1)]
    assert bt.load_results(path) == doc and doc["records"][2]["metrics"]["bbox"]["AP"] == 51.5
    assert not [f for f in os.listdir(tmp_path / "results") if ".tmp" in f]
    with pytest.raises(ValueError, match="100-iteration"):
        bt.record_runs(path, 200, [_rec("ifr", 2, 1.0, iters=200)])
    with pytest.raises(ValueError, match="of 300 iterations"):
        bt.record_runs(path, 100, [_rec("ifr", 2, 1.0, iters=300)])
    (tmp_path / "bad.json").write_text(json.dumps({"iters": 100, "records": [{"model": "ifr", "seed": "1"}]}))
    with pytest.raises(ValueError, match="record 0 needs"):
        bt.load_results(str(tmp_path / "bad.json"))


def _record_many(path, worker):
    for i in range(20):
        bt.record_runs(path, 100, [_rec(f"m{worker}", i, float(i))])


def test_concurrent_writers_keep_every_record(tmp_path):
    import multiprocessing

    path = str(tmp_path / "r.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(bt.load_results(path)["records"]) == 80
    with bt.file_lock(path + ".lock") as held:
        assert held
        with bt.file_lock(path + ".lock", blocking=False) as again:
            assert again is False  # a second holder (another open file) is refused while the first holds it


def test_inference_parameters_leave_out_what_inference_does_not_run():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Model(nn.Module):  # a shared layer run twice, a training-only critic, a scale held by the model itself
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)  # 20
            self.head = nn.Linear(4, 2)  # 10
            self.critic = nn.Sequential(nn.Linear(4, 100), nn.Linear(100, 1))  # 601, training only
            self.scale = nn.Parameter(torch.ones(1))  # 1

        def forward(self, x):
            x = self.shared(self.shared(x)) * self.scale
            return self.head(x) if not self.training else self.critic(x).sum() + self.head(x).sum()

    model = Model().eval()
    total = sum(p.numel() for p in model.parameters())
    assert total == 632 and bt.inference_parameters(model, [torch.zeros(1, 4)] * 2) == 31
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks are gone afterwards


def test_from_json_writes_table_readme_and_json_without_detectron2(tmp_path):
    path = str(tmp_path / "shapes_100it.json")
    bt.record_runs(path, 100, _records())

    def timing(doc):
        return dict(doc, timing={"mask_rcnn": {"ms_per_img": 158.4, "params_m": 16.2, "pass": "P"},
                                 "ifr": {"ms_per_img": 807.0, "params_m": 15.9, "pass": "P"}},
                    timing_passes={"P": {"seed": 1, "images": 50, "device": "cpu", "load_before": [0.5, 1, 1],
                                         "machine": {"cpu": "Test CPU", "torch_threads": 2}}})

    bt.update_results(path, 100, timing)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bt.START}\nold\n{bt.END}\nend\n")
    out = tmp_path / "t" / "table.md"
    # in a fresh interpreter where detectron2 cannot be imported
    code = ("import sys, runpy; sys.modules['detectron2'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "tools", "benchmark_table.py"),
                           "--from-json", path, "--out", str(out), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    assert "| 1.10–1.30 | 25–30 min (load 2.1–2.3) | 158 |" in md and "| gain | 1.00 | – | 807 |" in md
    assert "one pass in one process" in md and "Test CPU, 2 threads" in md and "median over 50 val images" in md
    text = readme.read_text()
    assert "old" not in text and "| IFR | MASK_RCNN |" in text and text.endswith("end\n")
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    ifr = next(r for r in table["rows"] if r["name"] == "ifr")
    assert ifr["results"]["bbox"]["AP"] == pytest.approx(55.1666, abs=1e-3) and ifr["verdict"] == "gain"
    assert ifr["ms_per_img"] == 807.0 and table["seeds"] == [1, 2, 3, 4]
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        bt.embed(str(readme), md)
    with pytest.raises(SystemExit, match="no results record"):
        bt.main(["--from-json", str(tmp_path / "absent.json")])
    (tmp_path / "table.json").write_text(json.dumps({"rows": []}))  # not a record: a clear error
    with pytest.raises(SystemExit, match="not a results record"):
        bt.main(["--from-json", str(tmp_path / "table.json")])
    bt.update_results(path, 100, lambda doc: dict(doc, records=[]))
    with pytest.raises(SystemExit, match="no records yet"):
        bt.main(["--from-json", path, "--out", str(out)])


def _tiny_opts(tmp_path):
    """tiny_shapes_opts less the schedule, the checkpoint period and the output folder, which the tool sets."""
    tiny = tiny_shapes_opts(tmp_path / "unused")
    tiny = [v for k, v in zip(tiny[::2], tiny[1::2]) for v in (k, v)
            if k not in ("OUTPUT_DIR", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS",
                         "SOLVER.CHECKPOINT_PERIOD")]
    return tiny + ["DATASETS.SHAPES.ROOT", str(tmp_path / "shapes")]


def test_tool_trains_a_method_and_its_baseline_records_them_and_writes_the_table(tmp_path):
    pytest.importorskip("detectron2")  # training and COCO evaluation
    tiny = _tiny_opts(tmp_path)
    out, results = tmp_path / "table.md", tmp_path / "results.json"
    common = ["--iters", "10", "--output-dir", str(tmp_path), "--results", str(results), "--out", str(out)]
    rows = bt.main([*common, "--only", "rdsnet", "--timing-images", "2", "--opts", *tiny])
    assert [r["name"] for r in rows] == ["retinanet", "rdsnet", "rdsnet_mbrm"]
    for r in rows:
        assert r["results"]["bbox"]["AP"] == r["results"]["bbox"]["AP"]  # finite, not NaN
        assert r["n"] == 1 and r["s_per_iter"][0] > 0 and r["ms_per_img"] > 0 and r["params_m"] > 1
        assert 1 < r["params_inference_m"] <= r["params_m"]
    assert "segm" in rows[1]["results"] and "| RDSNet + MBRM (same weights) | RetinaNet (FPN) | 1 |" in out.read_text()
    for name in ("retinanet", "rdsnet"):  # the new layout, finished: checkpoint + the last iteration's evaluation
        run = tmp_path / "10it" / "seed1" / name
        assert (run / "model_final.pth").is_file() and bt.final_results(str(run / "metrics.json"), 10)
    # MBRM (same weights) writes its detections apart: the run's own inference/ keeps RDSNet's, as trained
    own, variant = (sorted((base / "inference").rglob("coco_instances_results.json"))
                    for base in (run, run / "rdsnet_mbrm"))
    assert len(own) == len(variant) == 1 and os.path.getmtime(own[0]) < os.path.getmtime(variant[0])
    doc = bt.load_results(str(results))
    recs = {r["model"]: r for r in doc["records"]}
    assert sorted(recs) == ["rdsnet", "rdsnet_mbrm", "retinanet"] and recs["rdsnet_mbrm"]["weights_of"] == "rdsnet"
    for r in recs.values():
        assert r["code"]["commit"] and r["machine"]["cpu_count"] >= 1 and r["train"]["s_per_iter"] > 0
        assert r["train"]["run_wall_s"] > 0 and r["load"]["last"] and r["seed"] == 1
    assert set(doc["timing"]) == set(recs) and len(doc["timing_passes"]) == 1
    # again: everything is recorded, nothing is trained or scored, the checkpoints stay
    mtime = os.path.getmtime(tmp_path / "10it" / "seed1" / "retinanet" / "model_final.pth")
    again = bt.main([*common, "--only", "rdsnet", "--no-timing", "--opts", *tiny])
    assert [r["results"] for r in again] == [r["results"] for r in rows]
    assert os.path.getmtime(tmp_path / "10it" / "seed1" / "retinanet" / "model_final.pth") == mtime
    # --eval-only scores the checkpoint again and re-records it in place
    before = bt.load_results(str(results))["records"][0]["recorded"]
    rescored = bt.main([*common, "--only", "retinanet", "--eval-only", "--no-timing", "--opts", *tiny])
    assert rescored[0]["results"]["bbox"]["AP"] == pytest.approx(rows[0]["results"]["bbox"]["AP"], abs=1e-6)
    assert len(bt.load_results(str(results))["records"]) == 3 and before
    rec = next(r for r in bt.load_results(str(results))["records"] if r["model"] == "retinanet")
    assert rec["scored_again"]["at"] and "commit" in rec["scored_again"]["code"]  # who scored it, apart from who trained it
    assert "scored_again" not in recs["retinanet"]  # a run scored right after its training has no such field


def test_a_run_cut_off_resumes_from_its_last_checkpoint(tmp_path):
    pytest.importorskip("detectron2")  # training and COCO evaluation
    tiny = _tiny_opts(tmp_path)
    entry, out_dir = bt.ENTRY_BY_NAME["retinanet"], tmp_path / "12it" / "seed1" / "retinanet"
    assert not bt.can_resume(str(out_dir))
    # the state a session that ends leaves: the run of 12 iterations stopped after its checkpoint at iteration 6
    first = bt.run_opts(entry, str(out_dir), 12, 1, tiny) + ["SOLVER.MAX_ITER", "6"]
    subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
                    os.path.join(REPO, entry.config), *first], cwd=REPO, check=True, capture_output=True)
    (out_dir / "model_final.pth").unlink()
    (out_dir / "last_checkpoint").write_text("model_0000005.pth")
    assert bt.can_resume(str(out_dir)) and (out_dir / "model_0000005.pth").is_file()
    results = tmp_path / "results.json"
    rows = bt.main(["--iters", "12", "--output-dir", str(tmp_path), "--results", str(results), "--only",
                    "retinanet", "--no-timing", "--out", str(tmp_path / "t.md"), "--opts", *tiny])
    assert rows[0]["n"] == 1 and not bt.can_resume(str(out_dir))
    log = (out_dir / "log.txt").read_text()
    assert "model_0000005.pth" in log and "Starting training from iteration 6" in log  # continued, not from 0
    iters = [json.loads(line).get("iteration") for line in (out_dir / "metrics.json").read_text().splitlines()]
    assert iters[0] == 5 and 11 in iters  # the first part ended at iteration 5, the resumed one at 11
    assert bt.final_results(str(out_dir / "metrics.json"), 12)
    assert sorted(p.name for p in out_dir.glob("model_*.pth")) == ["model_final.pth"]  # quarter checkpoints gone
    rec = bt.load_results(str(results))["records"][0]
    assert rec["train"]["resumed"] is True and rec["train"]["s_per_iter"] > 0


@pytest.mark.slow
def test_two_jobs_train_two_seeds_side_by_side_and_both_are_recorded(tmp_path):
    pytest.importorskip("detectron2")  # training and COCO evaluation
    tiny = _tiny_opts(tmp_path)
    results = tmp_path / "results.json"
    rows = bt.main(["--iters", "10", "--seeds", "1", "2", "--only", "retinanet", "--jobs", "2", "--num-threads", "1",
                    "--output-dir", str(tmp_path), "--results", str(results), "--out", str(tmp_path / "t.md"),
                    "--timing-images", "1", "--opts", *tiny])
    assert [(r["name"], r["seeds"]) for r in rows] == [("retinanet", [1, 2])]
    doc = bt.load_results(str(results))
    assert [(r["model"], r["seed"]) for r in doc["records"]] == [("retinanet", 1), ("retinanet", 2)]
    for r in doc["records"]:  # each trained by its own worker, with one thread, in its own folder
        assert r["machine"]["omp_num_threads"] == 1 and r["run_dir"].endswith(f"seed{r['seed']}/retinanet")
    assert doc["timing"]["retinanet"]["ms_per_img"] > 0 and " ± " in (tmp_path / "t.md").read_text()


def test_pairing_follows_the_entry_not_the_baseline_a_record_was_written_with():
    def rec(model, seed, ap, baseline=None):
        return dict(model=model, seed=seed, iters=100, baseline=baseline, metrics={"bbox": {"AP": ap}})

    records = [rec("mask_rcnn", 1, 50.0), rec("cascade_mask_rcnn", 1, 60.0, "mask_rcnn"),
               rec("cascade_ifr", 1, 61.0, "mask_rcnn")]  # recorded before the cascade baseline existed
    rows = {r["name"]: r for r in bt.summarize(records)}
    assert rows["cascade_ifr"]["baseline"] == "cascade_mask_rcnn"
    assert rows["cascade_ifr"]["delta"]["bbox"]["mean"] == pytest.approx(1.0)
    assert rows["cascade_mask_rcnn"]["delta"]["bbox"]["mean"] == pytest.approx(10.0)
    rows = {r["name"]: r for r in bt.summarize(records[:1] + records[2:])}
    assert rows["cascade_ifr"]["verdict"] == "no baseline run"
