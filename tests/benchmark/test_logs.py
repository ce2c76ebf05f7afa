"""d2_refine.benchmark.logs: the readers of detectron2's metrics.json and log.txt."""
import json

import pytest

from d2_refine.benchmark import logs


def test_final_results_and_speed_are_read_from_detectron2_outputs(tmp_path):
    lines = [{"iteration": 1, "total_loss": 2.0},
             {"iteration": 9, "bbox/AP": 10.0, "bbox/AP75": 5.0, "segm/AP": 8.0, "total_loss": 1.0},
             {"iteration": 19, "bbox/AP": 30.0, "bbox/AP75": 20.0, "bbox/APl": float("nan"), "segm/AP": 25.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = logs.final_results(str(tmp_path / "metrics.json"))
    assert res == {"bbox": {"AP": 30.0, "AP75": 20.0, "APl": None}, "segm": {"AP": 25.0}}  # NaN: None in JSON
    assert logs.final_results(str(tmp_path / "missing.json")) is None
    # a run is finished only when the last evaluation is the one after training (logged at MAX_ITER)
    assert logs.final_results(str(tmp_path / "metrics.json"), min_iteration=19) == res
    assert logs.final_results(str(tmp_path / "metrics.json"), min_iteration=20) is None
    (tmp_path / "log.txt").write_text(
        "d2.engine.hooks: Overall training speed: 8 iterations in 0:00:10 (1.2500 s / it)\n"
        "d2.engine.hooks: Overall training speed: 398 iterations in 0:06:10 (0.9300 s / it)\n")
    assert logs.train_speed(str(tmp_path / "log.txt")) == pytest.approx(0.93)
    assert logs.train_time(str(tmp_path / "log.txt")) == pytest.approx(370.0)
    assert logs.train_time(str(tmp_path / "absent.txt")) is None
