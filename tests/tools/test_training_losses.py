"""tools/training_losses.py: a method's training losses against its baseline's, same seed, from metrics.json alone."""
import json

import pytest

from helpers import load_tool

tl = load_tool("training_losses")


def _run(folder, losses_at):
    """A run folder whose metrics.json logs ``losses_at(iteration)`` every 20 iterations, then an evaluation."""
    folder.mkdir(parents=True)
    lines = [dict(iteration=i, total_loss=sum(losses_at(i).values()), **losses_at(i)) for i in range(19, 1000, 20)]
    lines.append({"iteration": 999, "bbox/AP": 50.0})
    (folder / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json (cut off)\n")


def test_means_per_window_paired_by_seed(tmp_path):
    for seed, mask in ((1, 0.1), (2, 0.3)):
        _run(tmp_path / f"seed{seed}" / "mask_rcnn", lambda i: {"loss_cls": 0.5, "loss_mask": 0.2})
        # IFR: the mask loss lower than the baseline's on seed 1, higher on seed 2, and only after iteration 500
        _run(tmp_path / f"seed{seed}" / "ifr",
             lambda i, m=mask: {"loss_cls": 0.5, "loss_mask": 0.2 if i < 500 else m, "loss_extra": 9.0})
    out = tmp_path / "losses.json"
    rows = tl.main([str(tmp_path), "--models", "ifr", "--seeds", "1", "2", "--windows", "0:500", "500:1000",
                    "--json", str(out)])
    by = {(r["seed"], tuple(r["window"]), r["loss"]): r for r in rows}
    assert {r["loss"] for r in rows} == {"loss_cls", "loss_mask"}  # shared losses only
    assert by[1, (0, 500), "loss_mask"]["rel"] == pytest.approx(0.0)
    assert by[1, (500, 1000), "loss_mask"]["method"] == pytest.approx(0.1)
    assert by[1, (500, 1000), "loss_mask"]["rel"] == pytest.approx(-0.5)
    assert by[2, (500, 1000), "loss_mask"]["rel"] == pytest.approx(0.5)
    summary = {(tuple(s["window"]), s["loss"]): s for s in tl.summary(rows)}
    assert summary[(500, 1000), "loss_mask"]["lower"] == 1 and summary[(0, 500), "loss_cls"]["lower"] == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python tools/training_losses.py ") and "--windows 0:500 500:1000" in \
        doc["command"]
    assert "commit" in doc["code"] and len(doc["rows"]) == len(rows)


def test_a_loss_switched_off_in_either_run_is_left_out(tmp_path, capsys):
    """InterNet's make-up-only ablation logs loss_intertwiner = 0 at every iteration (loss weight 0): against l2 it
    was a row of -100 %. A loss that is 0 over a window in one run is left out of that window only."""
    _run(tmp_path / "seed1" / "internet_l2", lambda i: {"loss_cls": 0.5, "loss_intertwiner": 0.01})
    _run(tmp_path / "seed1" / "internet_makeup", lambda i: {"loss_cls": 0.4, "loss_intertwiner": 0.0})
    _run(tmp_path / "seed1" / "mask_rcnn", lambda i: {"loss_cls": 0.5 if i < 500 else 0.0})
    rows = tl.main([str(tmp_path), "--models", "internet_makeup", "--against", "internet_l2", "mask_rcnn",
                    "--windows", "0:500", "500:1000"])
    assert {(r["baseline"], tuple(r["window"]), r["loss"]) for r in rows} == {
        ("internet_l2", (0, 500), "loss_cls"), ("internet_l2", (500, 1000), "loss_cls"),
        ("mask_rcnn", (0, 500), "loss_cls")}
    assert "loss_intertwiner" not in capsys.readouterr().out


def test_clear_errors(tmp_path):
    _run(tmp_path / "seed1" / "mask_rcnn", lambda i: {"loss_cls": 0.5})
    with pytest.raises(SystemExit, match="ifr/metrics.json: no training losses"):
        tl.main([str(tmp_path), "--models", "ifr"])
    _run(tmp_path / "seed1" / "ifr", lambda i: {"loss_cls": 0.4})
    with pytest.raises(SystemExit, match="no logged iteration in 2000:3000"):
        tl.main([str(tmp_path), "--models", "ifr", "--windows", "2000:3000"])
    for bad in (["--windows", "5"], ["--windows", "9:3"], ["--models", "mask_rcnn"]):  # a baseline has none
        with pytest.raises(SystemExit):
            tl.parse_args([str(tmp_path), "--models", "ifr", *bad] if bad[0] == "--windows" else [str(tmp_path), *bad])


def test_against_other_models_and_missing_runs_from_a_reference(tmp_path, capsys):
    first = tmp_path / "first"
    for name, cls in (("mask_rcnn", 0.5), ("internet_l2", 0.4)):
        _run(first / "seed1" / name, lambda i, c=cls: {"loss_cls": c, "loss_mask": 0.2})
    reference = tmp_path / "reference.json"
    tl.main([str(first), "--models", "internet_l2", "--windows", "0:500", "500:1000", "--json", str(reference)])
    # a later machine: the ablation's own run, its baseline's and the full method's folders gone
    later = tmp_path / "later"
    _run(later / "seed1" / "internet_makeup", lambda i: {"loss_cls": 0.45, "loss_mask": 0.2})
    rows = tl.main([str(later), "--models", "internet_makeup", "--against", "mask_rcnn", "internet_l2",
                    "--windows", "0:500", "500:1000", "--reference", str(reference)])
    by = {(r["baseline"], tuple(r["window"]), r["loss"]): r for r in rows}
    assert len(rows) == 8 and all(r["source"] == ["run", "reference"] for r in rows)
    assert by["mask_rcnn", (500, 1000), "loss_cls"]["rel"] == pytest.approx(-0.1)
    assert by["internet_l2", (500, 1000), "loss_cls"]["rel"] == pytest.approx(0.125)
    assert {(s["baseline"], s["lower"]) for s in tl.summary(rows) if s["loss"] == "loss_cls"} == \
        {("mask_rcnn", 1), ("internet_l2", 0)}
    assert "internet_makeup vs internet_l2, iterations 500-999, loss_cls" in capsys.readouterr().out
    # a run folder that exists wins over the reference
    _run(later / "seed1" / "mask_rcnn", lambda i: {"loss_cls": 0.9, "loss_mask": 0.2})
    (row,) = [r for r in tl.main([str(later), "--models", "internet_makeup", "--windows", "0:500",
                                  "--reference", str(reference)]) if r["loss"] == "loss_cls"]
    assert row["base"] == pytest.approx(0.9) and row["source"] == ["run", "run"]
    # the reference lacks the window, or the seed: the error says so
    with pytest.raises(SystemExit, match="the reference has none of this run over these windows"):
        tl.main([str(later), "--models", "internet_makeup", "--against", "internet_l2", "--windows", "100:200",
                 "--reference", str(reference)])
    with pytest.raises(SystemExit, match="seed2/internet_makeup/metrics.json: no training losses"):
        tl.main([str(later), "--models", "internet_makeup", "--seeds", "2", "--reference", str(reference)])
    with pytest.raises(SystemExit, match="the method itself"):
        tl.main([str(later), "--models", "internet_makeup", "--against", "internet_makeup"])
