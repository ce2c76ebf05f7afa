"""d2_refine.benchmark.report: the per-model table and the two-regime verdict table."""
import re

from d2_refine.benchmark import record, report, stats
from helpers import benchmark_records, table_lines


def test_markdown_states_the_spread_the_pairs_and_the_rule():
    doc = dict(record.empty_results(100), records=benchmark_records())
    md = report.markdown(stats.summarize(doc["records"]), doc, "python tools/benchmark_table.py --from-json x.json")
    md = table_lines(md) + "\n" + md  # the cells without tabulate's padding, then the text
    table = table_lines(md).splitlines()[: len(table_lines(md).splitlines()) // 2]
    assert len(table) == 10 and all(line.count("|") == table[0].count("|") == 16 for line in table)
    assert ("| MASK_RCNN | – | 3 | 52.0 ± 2.0 | 72.0 ± 2.0 | 57.0 ± 2.0 | 32.0 ± 2.0 | 51.0 ± 2.0 | 46.0 ± 1.0 "
            "| – | – | – | 1.10–1.20 | 25–30 min (load 2.1–2.3) | – |") in table
    assert "| IFR | MASK_RCNN | 3 | 55.2 ± 2.3 | " in md and "| +3.2 ± 0.3 | +1.0 ± 0.0 | gain | 1.00 | – | – |" in md
    assert "| +0.0 ± 1.4 | +0.0 ± 0.0 | level |" in md
    assert "| −" not in md and "| -3.0 ± 1.4 (n=2) | – | loss |" in md  # fewer pairs than the row's seeds
    assert "| 42.0 | 62.0 | 47.0 | 22.0 | 41.0 | – | +2.0 | – | 1 seed: no verdict |" in md
    assert "mean Δ > 2 × std(Δ)" in md and "n ≥ 2" in md and "seeds 1, 2, 3, 4" in md
    assert "not measured yet" in md
    missing = md.split("Not in the record yet (no run at this schedule): ")[1].splitlines()[0]
    assert "RetinaNet (FPN)" in missing and "RDSNet + MBRM (same weights)" in missing and "(ot)" in missing
    assert "IoU-Net" not in missing and "Mask R-CNN (FPN)" not in missing.split(", ")


def test_verdict_table_puts_both_regimes_and_the_paper_side_by_side():
    scratch = stats.summarize(benchmark_records())
    finetune = stats.summarize([r for r in benchmark_records() if r["model"] in ("mask_rcnn", "ifr")][:4])
    md = report.verdict_markdown(scratch, finetune, "python tools/verdict_table.py", {"scratch": "a.json"})
    rows = {re.sub(r"\[(.*)\]\(projects/\w+\)", r"\1", cells[0]): cells[1:]
            for line in md.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["Mask R-CNN + IFR (implicit)"][1] == "gain: +3.2 ± 0.3 / +1.0 ± 0.0 (3 seeds)"
    # one paired seed in the finetune record
    assert rows["Mask R-CNN + IFR (implicit)"][2] == "no verdict: +3.0 / +1.0 (1 seed)"
    assert "COCO val2017" in rows["Mask R-CNN + IFR (implicit)"][3]
    assert rows["Mask R-CNN + InterNet (l2)"][2] == "not run"  # a finetune model without records
    assert rows["Mask R-CNN + FPT `fpt_paper`"][2] == "not in this regime"
    assert rows["RDSNet"][1] == "not run"  # its baseline has no record: no Δ to show
    assert "[Mask R-CNN + IFR (implicit)](projects/IFR)" in md  # each method links its README
    assert "Mask R-CNN (FPN)" not in rows  # baselines have no row of their own
    assert "`shapes`, schedule as recorded;" in md  # no schedule given
    md = report.verdict_markdown(scratch, finetune, "c", {"scratch": "a.json"}, {"scratch": 2000, "finetune": 1000})
    assert "`shapes`, from scratch 2,000 iterations, from the pretrained trunk 1,000 iterations;" in md
