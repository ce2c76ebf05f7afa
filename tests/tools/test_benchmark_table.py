"""tools/benchmark_table.py, the command line over d2_refine.benchmark: its options (seeds, regimes), the table
from the JSON alone (without detectron2), and tiny real runs: train, record, resume, two jobs at a time."""
import json
import math
import os
import subprocess
import sys

import pytest

from d2_refine.benchmark import entries, logs, record, report, runs
from d2_refine.utils.testing import tiny_shapes_opts
from helpers import ROOT, benchmark_records, load_tool, table_lines

bt = load_tool("benchmark_table")


def test_seed_options():
    assert bt.parse_args(["--seed", "3"]).seeds == [3]
    assert bt.parse_args([]).seeds == [1]
    args = bt.parse_args(["--seeds", "2", "1", "--iters", "300"])
    assert args.seeds == [2, 1] and args.timing_seed == 2
    assert args.results == os.path.join(ROOT, "docs", "results", "shapes_300it.json")
    tuned = bt.parse_args(["--regime", "finetune"])
    assert tuned.results == os.path.join(ROOT, "docs", "results", "shapes_finetune.json")
    assert bt.parse_args([]).regime == "scratch"
    for bad in (["--regime", "finetune", "--only", "fpt_paper"], ["--seed", "1", "--seeds", "2"],
                ["--seeds", "1", "1"], ["--jobs", "0"], ["--iters", "5"]):
        with pytest.raises((SystemExit, ValueError)):
            bt.parse_args(bad)




def test_from_json_writes_table_readme_and_json_without_detectron2(tmp_path):
    path = str(tmp_path / "shapes_100it.json")
    record.record_runs(path, 100, benchmark_records())

    def timing(doc):
        return dict(doc, timing={"mask_rcnn": {"ms_per_img": 158.4, "params_m": 16.2, "pass": "P"},
                                 "ifr": {"ms_per_img": 807.0, "params_m": 15.9, "pass": "P"}},
                    timing_passes={"P": {"seed": 1, "images": 50, "device": "cpu", "load_before": [0.5, 1, 1],
                                         "machine": {"cpu": "Test CPU", "torch_threads": 2}}})

    record.update_results(path, 100, timing)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bt.START}\nold\n{bt.END}\nend\n")
    out = tmp_path / "t" / "table.md"
    # in a fresh interpreter where detectron2 cannot be imported
    code = ("import sys, runpy; sys.modules['detectron2'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tools", "benchmark_table.py"),
                           "--from-json", path, "--out", str(out), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = table_lines(out.read_text()) + out.read_text()
    assert "| 1.10–1.20 | 25–30 min (load 2.1–2.3) | 158 |" in md and "| gain | 1.00 | – | 807 |" in md
    assert "one pass in one process" in md and "Test CPU, 2 threads" in md and "median over 50 val images" in md
    text = table_lines(readme.read_text()) + readme.read_text()
    assert "old" not in text and "| IFR | MASK_RCNN |" in text and text.endswith("end\n")
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    ifr = next(r for r in table["rows"] if r["name"] == "ifr")
    assert ifr["results"]["bbox"]["AP"] == pytest.approx(55.1666, abs=1e-3) and ifr["verdict"] == "gain"
    assert ifr["ms_per_img"] == 807.0 and table["seeds"] == [1, 2, 3, 4]
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        report.embed(str(readme), md, bt.START, bt.END)
    with pytest.raises(SystemExit, match="no results record"):
        bt.main(["--from-json", str(tmp_path / "absent.json")])
    (tmp_path / "table.json").write_text(json.dumps({"rows": []}))  # not a record: a clear error
    with pytest.raises(SystemExit, match="not a results record"):
        bt.main(["--from-json", str(tmp_path / "table.json")])
    record.update_results(path, 100, lambda doc: dict(doc, records=[]))
    with pytest.raises(SystemExit, match="no records yet"):
        bt.main(["--from-json", path, "--out", str(out)])


def test_each_regime_writes_between_its_own_markers(tmp_path):
    """One file holds both regimes' tables (docs/results/shapes.md): --regime finetune leaves the scratch one."""
    path = str(tmp_path / "shapes_finetune.json")
    record.record_runs(path, 100, benchmark_records())
    start, end = bt.markers("finetune")
    assert (start, end) == ("<!-- benchmark_table_finetune:start -->", "<!-- benchmark_table_finetune:end -->")
    doc = tmp_path / "shapes.md"
    doc.write_text(f"{bt.START}\nscratch table\n{bt.END}\nwords\n{start}\nold\n{end}\n")
    bt.main(["--from-json", path, "--regime", "finetune", "--out", str(tmp_path / "t.md"), "--readme", str(doc)])
    text = doc.read_text()
    assert text.startswith(f"{bt.START}\nscratch table\n{bt.END}\nwords\n{start}\n") and "old" not in text
    assert "from the pretrained R-18 trunk" in text and "--regime finetune" in text and text.endswith(f"{end}\n")


def _tiny_opts(tmp_path):
    """tiny_shapes_opts less the schedule, the checkpoint period and the output folder, which the tool sets."""
    tiny = tiny_shapes_opts(tmp_path / "unused")
    tiny = [v for k, v in zip(tiny[::2], tiny[1::2]) for v in (k, v)
            if k not in ("OUTPUT_DIR", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS",
                         "SOLVER.CHECKPOINT_PERIOD")]
    return tiny + ["DATASETS.SHAPES.ROOT", str(tmp_path / "shapes")]


@pytest.mark.slow  # trains and scores real runs
def test_tool_trains_a_method_and_its_baseline_records_them_and_writes_the_table(tmp_path):
    pytest.importorskip("detectron2")  # training and COCO evaluation
    tiny = _tiny_opts(tmp_path)
    out, results = tmp_path / "table.md", tmp_path / "results.json"
    common = ["--iters", "10", "--output-dir", str(tmp_path), "--results", str(results), "--out", str(out)]
    rows = bt.main([*common, "--only", "rdsnet", "--timing-images", "2", "--opts", *tiny])
    assert [r["name"] for r in rows] == ["retinanet", "rdsnet", "rdsnet_mbrm"]
    for r in rows:
        assert math.isfinite(r["results"]["bbox"]["AP"]) and r["results"]["bbox"]["AP"] >= 0  # not NaN
        assert r["n"] == 1 and r["s_per_iter"][0] > 0 and r["ms_per_img"] > 0 and r["params_m"] > 1
        assert 1 < r["params_inference_m"] <= r["params_m"]
    assert ("segm" in rows[1]["results"]
            and "| RDSNet + MBRM (same weights) | RetinaNet (FPN) | 1 |" in table_lines(out.read_text()))
    for name in ("retinanet", "rdsnet"):  # the new layout, finished: checkpoint + the last iteration's evaluation
        run = tmp_path / "10it" / "seed1" / name
        assert (run / "model_final.pth").is_file() and logs.final_results(str(run / "metrics.json"), 10)
    # MBRM (same weights) writes its detections apart: the run's own inference/ keeps RDSNet's, as trained
    own, variant = (sorted((base / "inference").rglob("coco_instances_results.json"))
                    for base in (run, run / "rdsnet_mbrm"))
    assert len(own) == len(variant) == 1 and os.path.getmtime(own[0]) < os.path.getmtime(variant[0])
    doc = record.load_results(str(results))
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
    before = record.load_results(str(results))["records"][0]["recorded"]
    rescored = bt.main([*common, "--only", "retinanet", "--eval-only", "--no-timing", "--opts", *tiny])
    assert rescored[0]["results"]["bbox"]["AP"] == pytest.approx(rows[0]["results"]["bbox"]["AP"], abs=1e-6)
    assert len(record.load_results(str(results))["records"]) == 3 and before
    rec = next(r for r in record.load_results(str(results))["records"] if r["model"] == "retinanet")
    # who scored it, apart from who trained it
    assert rec["scored_again"]["at"] and "commit" in rec["scored_again"]["code"]
    assert "scored_again" not in recs["retinanet"]  # a run scored right after its training has no such field


@pytest.mark.slow  # trains and scores real runs
def test_a_run_cut_off_resumes_from_its_last_checkpoint(tmp_path):
    pytest.importorskip("detectron2")  # training and COCO evaluation
    tiny = _tiny_opts(tmp_path)
    entry, out_dir = entries.ENTRY_BY_NAME["retinanet"], tmp_path / "12it" / "seed1" / "retinanet"
    assert not runs.can_resume(str(out_dir))
    # the state a session that ends leaves: the run of 12 iterations stopped after its checkpoint at iteration 6
    first = entries.run_opts(entry, str(out_dir), 12, 1, tiny) + ["SOLVER.MAX_ITER", "6"]
    subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file",
                    os.path.join(ROOT, entry.config), *first], cwd=ROOT, check=True, capture_output=True)
    (out_dir / "model_final.pth").unlink()
    (out_dir / "last_checkpoint").write_text("model_0000005.pth")
    assert runs.can_resume(str(out_dir)) and (out_dir / "model_0000005.pth").is_file()
    results = tmp_path / "results.json"
    rows = bt.main(["--iters", "12", "--output-dir", str(tmp_path), "--results", str(results), "--only",
                    "retinanet", "--no-timing", "--out", str(tmp_path / "t.md"), "--opts", *tiny])
    assert rows[0]["n"] == 1 and not runs.can_resume(str(out_dir))
    log = (out_dir / "log.txt").read_text()
    assert "model_0000005.pth" in log and "Starting training from iteration 6" in log  # continued, not from 0
    iters = [json.loads(line).get("iteration") for line in (out_dir / "metrics.json").read_text().splitlines()]
    assert iters[0] == 5 and 11 in iters  # the first part ended at iteration 5, the resumed one at 11
    assert logs.final_results(str(out_dir / "metrics.json"), 12)
    assert sorted(p.name for p in out_dir.glob("model_*.pth")) == ["model_final.pth"]  # checkpoints gone
    rec = record.load_results(str(results))["records"][0]
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
    doc = record.load_results(str(results))
    assert [(r["model"], r["seed"]) for r in doc["records"]] == [("retinanet", 1), ("retinanet", 2)]
    for r in doc["records"]:  # each trained by its own worker, with one thread, in its own folder
        assert r["machine"]["omp_num_threads"] == 1 and r["run_dir"].endswith(f"seed{r['seed']}/retinanet")
    assert doc["timing"]["retinanet"]["ms_per_img"] > 0 and " ± " in (tmp_path / "t.md").read_text()
