"""tools/benchmark_table.py: the schedule, the parsing of detectron2's outputs, the table, and one tiny real run."""
import json
import os

import pytest

from d2_refine.utils.testing import tiny_shapes_opts
from helpers import load_tool

bt = load_tool("benchmark_table")
REPO = bt.REPO


def test_schedule_scales_the_default_one():
    opts = dict(zip(*[iter(bt.schedule_opts(2000, 1))] * 2))
    assert opts["SOLVER.MAX_ITER"] == "2000" and opts["SOLVER.STEPS"] == "(1500, 1800)"
    assert opts["SOLVER.WARMUP_ITERS"] == "200" and opts["SEED"] == "1"
    assert dict(zip(*[iter(bt.schedule_opts(400, 3))] * 2))["SOLVER.STEPS"] == "(300, 360)"
    with pytest.raises(ValueError, match="at least 10"):
        bt.schedule_opts(5, 1)


def test_every_entry_config_exists_and_baselines_are_entries():
    for e in bt.ENTRIES:
        assert os.path.isfile(os.path.join(REPO, e.config)), e.config
        assert e.baseline is None or e.baseline in bt.ENTRY_BY_NAME


def test_ifr_warm_up_is_the_papers_fraction_of_the_schedule():
    assert bt.ENTRY_BY_NAME["ifr"].opts(900) == ["MODEL.IFR.PRETRAIN_STEPS", "500"]


def test_final_results_and_speed_are_read_from_detectron2_outputs(tmp_path):
    lines = [{"iteration": 1, "total_loss": 2.0},
             {"iteration": 9, "bbox/AP": 10.0, "bbox/AP75": 5.0, "segm/AP": 8.0, "total_loss": 1.0},
             {"iteration": 19, "bbox/AP": 30.0, "bbox/AP75": 20.0, "segm/AP": 25.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = bt.final_results(str(tmp_path / "metrics.json"))
    assert res == {"bbox": {"AP": 30.0, "AP75": 20.0}, "segm": {"AP": 25.0}}
    assert bt.final_results(str(tmp_path / "missing.json")) is None
    (tmp_path / "log.txt").write_text(
        "d2.engine.hooks: Overall training speed: 8 iterations in 0:00:10 (1.2500 s / it)\n"
        "d2.engine.hooks: Overall training speed: 398 iterations in 0:06:10 (0.9300 s / it)\n")
    assert bt.train_speed(str(tmp_path / "log.txt")) == pytest.approx(0.93)


def test_markdown_rows_and_delta_to_the_baseline(tmp_path):
    rows = [dict(name="faster_rcnn", title="Faster", baseline=None, s_per_iter=1.0, ms_per_img=50.0, params_m=12.3,
                 results={"bbox": {"AP": 40.0, "AP50": 60.0, "AP75": 42.0, "APs": 20.0}}),
            dict(name="iounet", title="IoU-Net", baseline="faster_rcnn", s_per_iter=1.5, ms_per_img=70.0,
                 params_m=14.0, results={"bbox": {"AP": 41.5, "AP50": 59.0, "AP75": 45.0, "APs": 21.0}})]
    md = bt.markdown(rows, 400, 1, "python tools/benchmark_table.py --iters 400")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| IoU-Net | Faster | 41.5 | 59.0 | 45.0 | 21.0 | – | +1.5 | 1.50 | 70 | 14.0 |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bt.START}\nold\n{bt.END}\nend\n")
    bt.embed(str(readme), md)
    text = readme.read_text()
    assert "old" not in text and "| IoU-Net |" in text and text.startswith("intro") and text.endswith("end\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        bt.embed(str(readme), md)


def test_tool_trains_a_method_and_its_baseline_and_writes_the_table(tmp_path):
    pytest.importorskip("detectron2")  # training and COCO evaluation
    tiny = tiny_shapes_opts(tmp_path / "unused")
    tiny = [v for k, v in zip(tiny[::2], tiny[1::2]) for v in (k, v)
            if k not in ("OUTPUT_DIR", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS")]
    tiny += ["DATASETS.SHAPES.ROOT", str(tmp_path / "shapes")]
    out = tmp_path / "table.md"
    rows = bt.main(["--iters", "10", "--only", "rdsnet", "--output-dir", str(tmp_path), "--timing-images", "2",
                    "--out", str(out), "--opts", *tiny])
    assert [r["name"] for r in rows] == ["retinanet", "rdsnet", "rdsnet_mbrm"]
    for r in rows:
        assert r["results"]["bbox"]["AP"] == r["results"]["bbox"]["AP"]  # finite, not NaN
        assert r["s_per_iter"] > 0 and r["ms_per_img"] > 0 and r["params_m"] > 1
    assert "segm" in rows[1]["results"] and "| RDSNet + MBRM (same weights) | RetinaNet (FPN) |" in out.read_text()
    # a second run scores the existing checkpoints without training them again
    again = bt.main(["--iters", "10", "--only", "retinanet", "--output-dir", str(tmp_path), "--timing-images", "1",
                     "--eval-only", "--out", str(out), "--opts", *tiny])
    assert again[0]["results"]["bbox"]["AP"] == pytest.approx(rows[0]["results"]["bbox"]["AP"], abs=1e-6)
