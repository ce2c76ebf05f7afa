"""tools/verdict_table.py: the verdict table and the papers' claims, written from the two records into a README."""
from d2_refine.benchmark import record
from helpers import benchmark_record, benchmark_records, load_tool

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
