"""tools/plots.py: every figure is written from small synthetic JSONs; a missing JSON skips its figure with a
message naming the command that writes it."""
import json
import os

import pytest

pytest.importorskip("matplotlib")

from helpers import load_tool  # noqa: E402

plots = load_tool("plots")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def _table(tmp_path, iters=40):
    def row(name, title, baseline, aps):
        return dict(name=name, title=title, baseline=baseline,
                    results={"bbox": dict(AP=sum(aps.values()) / len(aps), APs=1.0, **aps), "segm": {"AP": 1.0}})

    base = {"AP50": 30.0, "AP75": 12.0, "AP60": 25.0, "AP90": 1.0, "AP70": 18.0, "AP80": 8.0}
    ours = {k: v + 2 for k, v in base.items()}
    rows = [row("faster_rcnn", "Faster R-CNN (FPN)", None, base), row("iounet", "IoU-Net", "faster_rcnn", ours),
            row("mask_rcnn", "Mask R-CNN (FPN)", None, {"AP50": 20.0, "AP75": 5.0})]
    return _write(tmp_path / "benchmark_table" / f"{iters}it" / "table.json", dict(iters=iters, seed=1, rows=rows))


def _ifr_memory(tmp_path):
    rows = [dict(case=f"explicit K={k}", mode="explicit", solver=None, depth=k, base_ms=10.0, ms=5.0 * k,
                 ratio=k / 2, peak_mib=20.0 + 7 * k, saved_mib=15.0 * k, peak_rel=1.0) for k in (1, 2, 4)]
    rows += [dict(case=f"implicit {s} T={t}", mode="implicit", solver=s, depth=t, base_ms=10.0, ms=3.0 * t,
                  ratio=0.3 * t, peak_mib=30.0 + (3 * t if s == "broyden" else 0), saved_mib=34.6, peak_rel=1.0)
             for s in ("fixed_point", "broyden") for t in (5, 10)]
    return _write(tmp_path / "ifr_memory.json", dict(torch="2.x", device="cpu (test)", threads=1, num_rois=8,
                                                     channels=16, d=16 * 196, rows=rows))


def _ops(tmp_path):
    rows = [dict(case="prroi_pool fwd+bwd vs roi_align(sampling_ratio=0), 512 RoIs, 256x200x304", base_ms=50.0,
                 ours_ms=5.0, ratio=0.1),
            dict(case="iou_guided_nms vs batched_nms, 5000 boxes, 1 class", base_ms=4.0, ours_ms=5.0, ratio=1.25)]
    return _write(tmp_path / "ops.json", dict(device="CPU, 1 threads", torch="2.x", rows=rows))


def _results(tmp_path, iters=2000):
    def rec(model, seed, box, mask, baseline=None):
        metrics = {"bbox": {"AP": box, "AP50": box + 10}, **({"segm": {"AP": mask}} if mask is not None else {})}
        return dict(model=model, seed=seed, iters=iters, title=model.replace("_", " "), baseline=baseline,
                    metrics=metrics, train={"s_per_iter": 1.0})

    records = [rec("mask_rcnn", s, 50.0 + s, 45.0 + s) for s in (1, 2, 3)]
    records += [rec("ifr", s, 53.0 + s + d, 46.0 + s, "mask_rcnn") for s, d in ((1, 0.0), (2, 1.0), (3, 2.0))]
    records += [rec("faster_rcnn", 1, 40.0, None), rec("iounet", 1, 42.5, None, "faster_rcnn")]
    records += [rec("rdsnet", 1, 12.0, 10.0, "retinanet")]  # no baseline run: not drawn
    return _write(tmp_path / "docs" / "results" / f"shapes_{iters}it.json",
                  dict(schema=1, dataset="shapes", iters=iters, records=records, timing={}, timing_passes={}))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def test_every_figure_written_from_synthetic_json(tmp_path):
    out = tmp_path / "figures"
    written = plots.main(["--table-json", _table(tmp_path), "--ifr-memory-json", _ifr_memory(tmp_path),
                          "--ops-json", _ops(tmp_path), "--results-json", _results(tmp_path), "--out-dir", str(out)])
    assert sorted(written) == sorted(plots.FIGURES)
    for fig, path in written.items():
        assert path == str(out / f"{fig}.png") and _is_png(path)


def test_missing_json_skips_that_figure_with_a_message(tmp_path, capsys):
    out = tmp_path / "figures"
    written = plots.main(["--table-json", str(tmp_path / "absent.json"), "--ifr-memory-json", _ifr_memory(tmp_path),
                          "--ops-json", str(tmp_path / "absent_ops.json"), "--out-dir", str(out),
                          "--results-json", str(tmp_path / "absent_results.json")])
    assert list(written) == ["ifr_memory"] and _is_png(written["ifr_memory"])
    err = capsys.readouterr().err
    assert "skipped ap_vs_iou.png" in err and "tools/benchmark_table.py" in err
    assert "skipped ops_ratios.png" in err and "benchmarks/ops.py --json" in err
    assert not (out / "ops_ratios.png").exists()
    assert "skipped delta_vs_baseline.png" in err and "--seeds 1 2 3" in err


def test_default_table_is_the_longest_schedule_and_thresholds_sort(tmp_path):
    _table(tmp_path, iters=40)
    longest = _table(tmp_path, iters=400)
    assert plots.default_table_json(str(tmp_path / "benchmark_table")) == longest
    assert plots.default_table_json(str(tmp_path / "nothing")) is None
    bbox = json.load(open(longest))["rows"][0]["results"]["bbox"]
    assert plots.iou_thresholds(bbox) == [50, 60, 70, 75, 80, 90]  # AP, APs are not thresholds


def test_unknown_method_or_missing_baseline_is_an_error(tmp_path):
    table = json.load(open(_table(tmp_path)))
    with pytest.raises(ValueError, match="'rdsnet' is not a row"):
        plots.plot_ap_vs_iou(table, str(tmp_path / "x.png"), methods=["rdsnet"])
    table["rows"] = [r for r in table["rows"] if r["name"] != "faster_rcnn"]
    with pytest.raises(ValueError, match="baseline 'faster_rcnn'"):
        plots.plot_ap_vs_iou(table, str(tmp_path / "x.png"))


def test_delta_figure_draws_each_method_against_its_baseline_with_the_spread(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at what was drawn
    path = _results(tmp_path)
    assert plots.default_results_json(str(tmp_path / "docs" / "results")) == path
    assert plots.default_results_json(str(tmp_path / "nothing")) is None
    written = plots.main(["--only", "delta", "--out-dir", str(tmp_path / "figs"), "--results-json", path])
    assert written == {"delta_vs_baseline": str(tmp_path / "figs" / "delta_vs_baseline.png")}
    assert _is_png(written["delta_vs_baseline"])
    ax = figures[-1].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["iounet\nvs faster rcnn", "ifr\nvs mask rcnn"]  # the table's order, top to bottom
    # error bars: x = mean Δ, half-width = std over seeds (IFR box: Δ 3, 4, 5 -> 4 ± 1; mask: 1, 1, 1 -> 1 ± 0)
    drawn = {}
    for c in ax.containers:
        segments = c.lines[2][0].get_segments()
        # (centre, half-width) of each error bar, flattened: pytest.approx compares flat sequences only
        drawn[c.get_label()] = [v for seg in segments
                                for v in (float(seg[0][0] + seg[1][0]) / 2, float(seg[1][0] - seg[0][0]) / 2)]
    assert drawn["Δ box AP"] == pytest.approx([2.5, 0.0, 4.0, 1.0])  # IoU-Net: one seed, Δ 2.5
    assert drawn["Δ mask AP"] == pytest.approx([1.0, 0.0])  # IoU-Net has no masks
    texts = [t.get_text() for t in ax.texts]
    assert "gain (n=3)" in texts and "1 seed: no verdict (n=1)" in texts  # 4 > 2 x 1
    assert any(line.get_xdata()[0] == 0.0 for line in ax.lines)  # the zero line
    assert "iterations" in ax.get_title() and "std" in ax.get_xlabel()


def test_delta_figure_needs_a_method_with_a_baseline_run(tmp_path):
    data = json.load(open(_results(tmp_path)))
    data["records"] = [r for r in data["records"] if r["model"] in ("ifr", "rdsnet")]
    with pytest.raises(ValueError, match="no method with a baseline run"):
        plots.plot_delta(data, str(tmp_path / "x.png"))


def test_delta_figure_with_one_method_keeps_its_label_beside_its_marker(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    data = json.load(open(_results(tmp_path)))
    data["records"] = [r for r in data["records"] if r["model"] in ("iounet", "faster_rcnn")]
    plots.plot_delta(data, str(tmp_path / "one.png"))
    ax = figures[-1].axes[0]
    lo, hi = ax.get_ylim()
    assert list(ax.get_yticks()) == [0] and lo <= -0.5 and hi >= 0.5  # the row's band, its marker at +0.13 inside
