"""tools/ifr_test_budget.py: IFR's test-time solve scored at several (solver, budget) settings on shapes_tune, the
cheapest level setting chosen, then scored on shapes_val next to the paper's setting and Mask R-CNN."""
import json
import math

import pytest

from d2_refine.utils.testing import tiny_shapes_opts
from helpers import load_tool

tb = load_tool("ifr_test_budget")


def test_choose_takes_the_cheapest_setting_within_the_margin_of_the_best():
    rows = [dict(solver="broyden", budget=15, segm=30.0, ms_per_img=800.0),
            dict(solver="broyden", budget=8, segm=29.8, ms_per_img=450.0),
            dict(solver="anderson", budget=4, segm=29.6, ms_per_img=200.0),
            dict(solver="anderson", budget=8, segm=29.75, ms_per_img=420.0)]
    chosen, best = tb.choose(rows, 0.3)
    assert best == 30.0 and (chosen["solver"], chosen["budget"]) == ("anderson", 8)  # 29.6 is 0.4 below
    assert (tb.choose(rows, 0.5)[0]["solver"], tb.choose(rows, 0.5)[0]["budget"]) == ("anderson", 4)
    assert tb.choose(rows, 0.0)[0]["budget"] == 15


def _tiny(tmp_path):
    tiny = tiny_shapes_opts(tmp_path / "unused", image_size=64, num_train=2, num_val=2)
    keep = [v for k, v in zip(tiny[::2], tiny[1::2]) for v in (k, v) if k not in ("OUTPUT_DIR",)]
    return keep + ["DATASETS.SHAPES.ROOT", str(tmp_path / "shapes"), "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
                   "TEST.DETECTIONS_PER_IMAGE", "5"]


def _untrained(config, path, opts):
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_refine.engine import Trainer, setup_cfg

    model = Trainer.build_model(setup_cfg(config, opts))
    DetectionCheckpointer(model, save_dir=str(path.parent)).save(path.stem)
    return str(path)


def test_scores_every_setting_on_tune_and_the_choice_on_val(tmp_path):
    pytest.importorskip("detectron2")
    pytest.importorskip("torchdeq")
    opts = _tiny(tmp_path)
    ifr = _untrained(tb.IFR_CONFIG, tmp_path / "ifr.pth", opts)
    base = _untrained(tb.BASELINE_CONFIG, tmp_path / "mask_rcnn.pth", opts)
    out = tmp_path / "budget.json"
    doc = tb.main(["--weights", ifr, "--baseline-weights", base, "--budgets", "2", "5", "--tune-images", "3",
                   "--val-images", "2", "--json", str(out), "--output-dir", str(tmp_path / "eval"), "--opts", *opts])
    assert [(r["solver"], r["budget"]) for r in doc["tune"]] == [("broyden", 2), ("broyden", 5), ("anderson", 2),
                                                                 ("anderson", 5)]
    for r in doc["tune"]:
        assert r["images"] == 3 and r["ms_per_img"] > 0 and math.isfinite(r["segm"])
        if r["solve"]["solves"]:
            assert 1 <= r["solve"]["f_evals_mean"] <= r["budget"] + 1  # Broyden: one at z = 0, then one per step
    chosen = (doc["chosen"]["solver"], doc["chosen"]["budget"])
    assert chosen == tuple(tb.choose(doc["tune"], 0.3)[0][k] for k in ("solver", "budget"))
    val = [(r["model"], r.get("solver"), r.get("budget")) for r in doc["val"]]
    assert val[0] == ("ifr", *chosen) and val[-1] == ("mask_rcnn", None, None)
    assert ("ifr", "broyden", 15) in val and all(r["images"] == 2 for r in doc["val"])
    assert set(doc["ratio_vs_mask_rcnn"]) == {f"{s} {b}" for m, s, b in val if m == "ifr"}
    assert doc["command"].startswith("python tools/ifr_test_budget.py --weights ") and "--budgets 2 5" in doc["command"]
    assert json.loads(out.read_text())["chosen"] == doc["chosen"]
    assert len(doc["code"]["commit"]) == 40  # the code that scored it
