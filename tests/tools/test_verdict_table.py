"""tools/verdict_table.py: the verdict table and the papers' claims, written from the two records into a README."""
from d2_refine.benchmark import record
from helpers import benchmark_record, benchmark_records, load_tool, table_lines

vt = load_tool("verdict_table")


def test_both_tables_go_between_the_markers(tmp_path):
    scratch, finetune = str(tmp_path / "scratch.json"), str(tmp_path / "finetune.json")
    record.record_runs(scratch, 100, benchmark_records())
    record.record_runs(finetune, 50, [benchmark_record("mask_rcnn", s, 60.0 + s, 55.0, iters=50) for s in (1, 2)]
                       + [benchmark_record("ifr", s, 61.0, 57.0, "mask_rcnn", iters=50) for s in (1, 2)])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + vt.START + "\nOLD\n" + vt.END + "\n\n## Install\n")
    md = vt.main(["--scratch", scratch, "--finetune", finetune, "--readme", str(readme)])
    text = readme.read_text()
    assert "OLD" not in text and text.endswith(vt.END + "\n\n## Install\n") and md in text
    assert "python tools/verdict_table.py --scratch" in md and "from the pretrained trunk 50 iterations" in md
    # IFR pretrained: Δ box 0, −1; Δ mask +2, +2
    assert "level: -0.5 ± 0.7 / +2.0 ± 0.0 (2 seeds)" in md
    assert "| reproduced: +2.0 ± 0.0 (2 seeds)" in md.split("paper's claim")[1]
    assert "**From the pretrained trunk** — reproduced: IFR mask AP." in md
    # a record that does not exist: its column reads "not run", its sentence "nothing recorded yet"
    md = vt.main(["--scratch", scratch, "--finetune", str(tmp_path / "absent.json")])
    assert "**From the pretrained trunk** — nothing recorded yet." in md


def test_a_method_readme_gets_its_rows_in_both_regimes(tmp_path):
    import json

    scratch, finetune = str(tmp_path / "scratch.json"), str(tmp_path / "finetune.json")
    record.record_runs(scratch, 100, benchmark_records())
    doc = json.load(open(scratch))
    doc["timing"] = {"mask_rcnn": {"ms_per_img": 50.0, "pass": "p1"}, "ifr": {"ms_per_img": 81.0, "pass": "p1"}}
    json.dump(doc, open(scratch, "w"))
    record.record_runs(finetune, 50, [benchmark_record("mask_rcnn", s, 60.0 + s, 55.0, iters=50) for s in (1, 2)]
                       + [benchmark_record("ifr", s, 61.0, 57.0, "mask_rcnn", iters=50) for s in (1, 2)])
    readme = tmp_path / "README.md"
    readme.write_text("# IFR\n\n## Results\n\n" + vt.START + "\nOLD\n" + vt.END + "\n\nmore\n")
    md = vt.main(["--scratch", scratch, "--finetune", finetune, "--only", "ifr", "ifr_ws", "cascade_ifr",
                  "--readme", str(readme)])
    text = readme.read_text()
    assert "OLD" not in text and md in text and text.endswith(vt.END + "\n\nmore\n")
    assert "python tools/verdict_table.py --scratch" in md and "--only ifr ifr_ws cascade_ifr" in md
    assert "from scratch 100 iterations, from the pretrained trunk 50 iterations" in md
    rows = table_lines(md).splitlines()[2:]
    # from scratch: the baseline, IFR (3 paired seeds: Δ box +3.0, +3.0, +3.5), weight sharing and the cascade
    # pair not run; from the pretrained trunk: the baseline and IFR, the other three not run
    assert rows == [
        "| MASK_RCNN | from scratch | 3 | 52.0 ± 2.0 | 46.0 ± 1.0 | – | – | – | 50 |",
        "| IFR | from scratch | 3 | 55.2 ± 2.3 | 47.0 ± 1.0 | +3.2 ± 0.3 | +1.0 ± 0.0 | gain | 81 |",
        "| Mask R-CNN + IFR (weight sharing, K = 4) | from scratch | – | – | – | – | – | not run yet | – |",
        "| Cascade Mask R-CNN (FPN) | from scratch | – | – | – | – | – | not run yet | – |",
        "| Cascade Mask R-CNN + IFR (implicit) | from scratch | – | – | – | – | – | not run yet | – |",
        "| MASK_RCNN | pretrained trunk | 2 | 61.5 ± 0.7 | 55.0 ± 0.0 | – | – | – | – |",
        "| IFR | pretrained trunk | 2 | 61.0 ± 0.0 | 57.0 ± 0.0 | -0.5 ± 0.7 | +2.0 ± 0.0 | level | – |",
        "| Mask R-CNN + IFR (weight sharing, K = 4) | pretrained trunk | – | – | – | – | – | not run yet | – |",
        "| Cascade Mask R-CNN (FPN) | pretrained trunk | – | – | – | – | – | not run yet | – |",
        "| Cascade Mask R-CNN + IFR (implicit) | pretrained trunk | – | – | – | – | – | not run yet | – |",
    ]
    assert "–: not timed yet (pretrained trunk)" in md


def test_only_takes_entries_not_variants(capsys):
    # a variant (evaluated with its entry's weights) is shown with its entry: asking for it alone is a usage error
    import pytest

    with pytest.raises(SystemExit):
        vt.main(["--only", "rdsnet_mbrm"])
    assert "invalid choice: 'rdsnet_mbrm'" in capsys.readouterr().err


def test_a_method_readme_names_where_each_regime_was_timed(tmp_path):
    """The two regimes' timing passes may differ (two CPU threads from scratch, one from the pretrained trunk): the
    caption says so, so that 76 and 190 ms/img for the same baseline are not read as one comparison."""
    import json

    paths = {}
    for regime, iters, threads, device, gpu in (("scratch", 100, 2, "cpu", None), ("finetune", 50, 1, "cpu", None)):
        path = paths[regime] = str(tmp_path / f"{regime}.json")
        record.record_runs(path, iters, [benchmark_record("mask_rcnn", s, 60.0, 55.0, iters=iters) for s in (1, 2)])
        doc = json.load(open(path))
        doc["timing"] = {"mask_rcnn": {"ms_per_img": 50.0 * threads, "pass": "p"}}
        doc["timing_passes"] = {"p": {"device": device, "machine": {"torch_threads": threads, "gpu": gpu}}}
        json.dump(doc, open(path, "w"))
    md = vt.main(["--scratch", paths["scratch"], "--finetune", paths["finetune"], "--only", "ifr"])
    assert "on 2 CPU threads (from scratch), 1 CPU thread (pretrained trunk); compare rows of one regime" in md
    doc = json.load(open(paths["finetune"]))
    doc["timing_passes"]["p"].update(device="cuda", machine={"torch_threads": 16, "gpu": "NVIDIA H100"})
    json.dump(doc, open(paths["finetune"], "w"))
    md = vt.main(["--scratch", paths["scratch"], "--finetune", paths["finetune"], "--only", "ifr"])
    assert "on 2 CPU threads (from scratch), NVIDIA H100 (pretrained trunk)" in md


def test_a_method_readme_names_the_rows_timed_in_a_pass_of_their_own(tmp_path):
    """Rows of one regime timed in different passes (a pair trained after the others) compare less well with the
    rest: the caption names them; with one pass per regime it says "one timing pass"."""
    import json

    path = str(tmp_path / "finetune.json")
    record.record_runs(path, 50, [benchmark_record(m, s, 60.0, 55.0, b, iters=50) for s in (1, 2)
                                  for m, b in (("mask_rcnn", None), ("ifr", "mask_rcnn"))])
    doc = json.load(open(path))
    doc["timing"] = {"mask_rcnn": {"ms_per_img": 100.0, "pass": "p1"}, "ifr": {"ms_per_img": 200.0, "pass": "p1"}}
    doc["timing_passes"] = {"p1": {"device": "cpu", "machine": {"torch_threads": 1}}}
    json.dump(doc, open(path, "w"))
    md = vt.main(["--scratch", str(tmp_path / "absent.json"), "--finetune", path, "--only", "ifr"])
    assert "of one timing pass in one process" in md and "a pass of their own" not in md
    doc["timing"]["ifr"]["pass"] = "p2"
    doc["timing_passes"]["p2"] = doc["timing_passes"]["p1"]
    doc["timing"]["mask_rcnn_extra"] = {"ms_per_img": 1.0, "pass": "p1"}  # a row outside the table: not counted
    json.dump(doc, open(path, "w"))
    md = vt.main(["--scratch", str(tmp_path / "absent.json"), "--finetune", path, "--only", "ifr"])
    assert "of a timing pass in one process" in md
    assert "; Mask R-CNN + IFR (implicit) (pretrained trunk): timed in a pass of its own" in md
