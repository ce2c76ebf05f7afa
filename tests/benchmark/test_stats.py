"""d2_refine.benchmark.stats: mean ± std over seeds, the paired Δ and the verdict."""

import pytest

from d2_refine.benchmark import stats
from helpers import benchmark_records


def test_mean_std_and_the_verdict_rule():
    s = stats.mean_std([50.0, 52.0, 54.0])
    assert s["mean"] == pytest.approx(52.0) and s["std"] == pytest.approx(2.0) and s["n"] == 3  # n - 1
    assert stats.mean_std([None, 2.0]) == {"mean": 2.0, "std": None, "n": 1}
    assert stats.mean_std([None]) is None and stats.verdict(None) == "–"
    assert stats.verdict(stats.mean_std([3.0])) == "1 seed: no verdict"
    assert stats.verdict(stats.mean_std([1.0, 1.0])) == "gain"  # no spread: any positive mean
    assert stats.verdict(stats.mean_std([0.0, 0.0])) == "level"
    assert stats.verdict(stats.mean_std([2.0, 3.0, 4.0])) == "gain"  # 3 > 2 x 1
    assert stats.verdict(stats.mean_std([1.0, 3.0, 5.0])) == "level"  # 3 < 2 x 2
    assert stats.verdict(stats.mean_std([-1.0, -3.0, -5.0])) == "level"
    assert stats.verdict(stats.mean_std([-2.0, -3.0, -4.0])) == "loss"


def test_summary_over_seeds_with_missing_seeds_and_a_single_seed():
    rows = {r["name"]: r for r in stats.summarize(benchmark_records())}
    assert list(rows) == ["mask_rcnn", "faster_rcnn", "iounet", "fpt_lite", "fpt_paper", "ifr", "internet_l2",
                          "rdsnet"]  # the table's order, not the records'
    m = rows["mask_rcnn"]
    assert m["n"] == 3 and m["seeds"] == [1, 2, 3] and m["verdict"] == "–" and m["delta"] == {}
    assert m["stats"]["bbox"]["AP"] == {"mean": pytest.approx(52.0), "std": pytest.approx(2.0), "n": 3}
    # seed 3 was resumed: its s/it (1.3) covers the part after the resume, left out of the range as its time is
    assert m["stats"]["segm"]["AP"]["std"] == pytest.approx(1.0) and m["s_per_iter"] == pytest.approx([1.1, 1.2])
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


def test_pairing_follows_the_entry_not_the_baseline_a_record_was_written_with():
    def rec(model, seed, ap, baseline=None):
        return dict(model=model, seed=seed, iters=100, baseline=baseline, metrics={"bbox": {"AP": ap}})

    records = [rec("mask_rcnn", 1, 50.0), rec("cascade_mask_rcnn", 1, 60.0, "mask_rcnn"),
               rec("cascade_ifr", 1, 61.0, "mask_rcnn")]  # recorded before the cascade baseline existed
    rows = {r["name"]: r for r in stats.summarize(records)}
    assert rows["cascade_ifr"]["baseline"] == "cascade_mask_rcnn"
    assert rows["cascade_ifr"]["delta"]["bbox"]["mean"] == pytest.approx(1.0)
    assert rows["cascade_mask_rcnn"]["delta"]["bbox"]["mean"] == pytest.approx(10.0)
    rows = {r["name"]: r for r in stats.summarize(records[:1] + records[2:])}
    assert rows["cascade_ifr"]["verdict"] == "no baseline run"


def test_paired_delta_of_any_metric_over_the_seeds_both_have():
    def rec(seed, **metrics):
        return dict(model="m", seed=seed, metrics={"bbox": metrics})

    runs = {1: rec(1, AP=50.0, AP90=30.0), 2: rec(2, AP=52.0, AP90=float("nan")), 3: rec(3, AP=54.0, AP90=34.0)}
    base = {1: rec(1, AP=49.0, AP90=25.0), 2: rec(2, AP=50.0, AP90=26.0)}  # no seed 3
    assert stats.paired_delta(runs, base, "bbox") == {"mean": pytest.approx(1.5), "std": pytest.approx(0.5 ** 0.5),
                                                      "n": 2, "seeds": [1, 2]}
    # seed 2's AP90 is not finite: only seed 1 pairs
    assert stats.paired_delta(runs, base, "bbox", "AP90") == {"mean": 5.0, "std": None, "n": 1, "seeds": [1]}
    assert stats.paired_delta(runs, base, "segm") is None and stats.paired_delta(runs, {}, "bbox") is None
