"""tools/tune_record.py: a finished run evaluated on shapes_tune becomes a record with its command, options,
commit and final results; unfinished runs and runs scored on another split are left out."""
import json
import shlex

from helpers import load_tool

tune_record = load_tool("tune_record")

ARGS = ("Command line arguments: Namespace(config_file='configs/Baselines/mask_rcnn_R_18_FPN_shapes_pretrained.yaml', "
        "resume=True, eval_only=False, num_gpus=1, opts=['DATASETS.TEST', \"('shapes_tune',)\", 'SOLVER.BASE_LR', "
        "'0.01', 'SEED', '2'])\n")


def _run(folder, split="shapes_tune", finished=True):
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("[12/05 06:19:22] detectron2 INFO: " + ARGS +
                                    "Overall training speed: 998 iterations in 0:25:00 (1.5030 s / it)\n")
    (folder / "config.yaml").write_text(f"DATASETS:\n  TEST:\n  - {split}\n  TRAIN:\n  - shapes_train\n")
    lines = [{"iteration": 999, "total_loss": 1.2}]
    if finished:
        lines.append({"iteration": 999, "bbox/AP": 16.3, "bbox/AP50": 25.5, "segm/AP": 15.4})
    (folder / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(folder)


def test_runs_become_records_and_the_others_are_left_out(tmp_path, capsys):
    runs = [_run(tmp_path / "a"), _run(tmp_path / "b", finished=False), _run(tmp_path / "c", split="shapes_val")]
    out = tmp_path / "record.json"
    doc = tune_record.main(runs + ["--commit", "abc1234", "--out", str(out), "--note", "lr"])
    assert json.loads(out.read_text()) == doc and doc["split"] == "shapes_tune" and doc["note"] == "lr"
    assert doc["command"].startswith("python tools/tune_record.py ")
    (rec,) = doc["records"]
    assert rec["run"] == "a" and rec["commit"] == "abc1234" and rec["s_per_it"] == 1.503
    assert rec["results"] == {"bbox": {"AP": 16.3, "AP50": 25.5}, "segm": {"AP": 15.4}}
    assert rec["opts"][-2:] == ["SEED", "2"]
    assert shlex.split(rec["command"]) == [  # the shell gives train_net.py the options it was trained with
        "python", "train_net.py", "--config-file", "configs/Baselines/mask_rcnn_R_18_FPN_shapes_pretrained.yaml",
        "--resume", "DATASETS.TEST", "('shapes_tune',)", "SOLVER.BASE_LR", "0.01", "SEED", "2"]
    printed = capsys.readouterr().out
    assert "b: not finished" in printed and "not on shapes_tune alone" in printed
