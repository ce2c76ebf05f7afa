"""tools/regime_breakdown.py: the paired Δ per IoU threshold and object size in both regimes, and the baselines'
spread, written from the two records alone (made-up ones here)."""
import pytest

from d2_refine.benchmark import record
from helpers import benchmark_record, benchmark_records, load_tool, table_lines

rb = load_tool("regime_breakdown")


def _records(tmp_path):
    scratch, finetune = str(tmp_path / "scratch.json"), str(tmp_path / "finetune.json")
    record.record_runs(scratch, 100, benchmark_records())
    record.record_runs(finetune, 50, [benchmark_record("mask_rcnn", 1, 60.0, 55.0, iters=50),
                                      benchmark_record("mask_rcnn", 2, 62.0, 56.0, iters=50),
                                      benchmark_record("ifr", 1, 61.0, 57.0, "mask_rcnn", iters=50),
                                      benchmark_record("ifr", 2, 62.0, 56.0, "mask_rcnn", iters=50)])
    return scratch, finetune


def test_both_regimes_per_metric_and_the_baselines_spread(tmp_path):
    scratch, finetune = _records(tmp_path)
    doc = tmp_path / "regimes.md"
    doc.write_text("# Regimes\n\nbefore\n\n" + rb.START + "\nOLD TABLE\n" + rb.END + "\n\nafter\n")
    md = rb.main(["--scratch", scratch, "--finetune", finetune, "--metrics", "AP", "AP90", "APs",
                  "--embed", str(doc)])
    lines = table_lines(md)
    # IFR from scratch: Δ box AP +3.0, +3.0, +3.5 (made-up AP90 and APs follow AP)
    assert "| Mask R-CNN + IFR (implicit) | from scratch | 3 | +3.2 ± 0.3 | +3.2 ± 0.3 | +3.2 ± 0.3 |" in lines
    # pretrained trunk: +1.0, 0.0 box; mask +2.0, 0.0
    assert "| Mask R-CNN + IFR (implicit) | pretrained trunk | 2 | +0.5 ± 0.7 | +0.5 ± 0.7 | +0.5 ± 0.7 |" in lines
    # mask: only AP is recorded
    assert "| Mask R-CNN + IFR (implicit) | pretrained trunk | 2 | +1.0 ± 1.4 | – | – |" in lines
    # a seed the baseline lacks does not pair; one seed: the mean alone
    assert "| Mask R-CNN + FPT `fpt_paper` | from scratch | 2 | -3.0 ± 1.4 | -3.0 ± 1.4 | -3.0 ± 1.4 |" in lines
    assert "| IoU-Net (IoU-NMS + refinement) | from scratch | 1 | +2.0 | +2.0 | +2.0 |" in lines
    assert not any(line.startswith("| RDSNet") for line in lines)  # its baseline has no record
    assert "| Mask R-CNN (FPN) | pretrained trunk | 2 | 61.0 ± 1.4 | 60.0 – 62.0 |" in lines
    assert "| Mask R-CNN (FPN) | from scratch | 3 | 52.0 ± 2.0 | 50.0 – 54.0 |" in lines
    text = doc.read_text()
    assert "OLD TABLE" not in text and text.startswith("# Regimes\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "python tools/regime_breakdown.py --scratch" in text


def test_a_missing_record_leaves_its_regime_out(tmp_path):
    scratch, _ = _records(tmp_path)
    md = rb.main(["--scratch", scratch, "--finetune", str(tmp_path / "absent.json")])
    assert "pretrained trunk" not in md and "from scratch" in md
    unmarked = tmp_path / "regimes.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(SystemExit, match="regimes.md has no"):
        rb.main(["--scratch", scratch, "--embed", str(unmarked)])
