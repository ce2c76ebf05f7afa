"""d2_refine.benchmark.record: merge, replace and lock the results record."""
import json
import os

import pytest

from d2_refine.benchmark import record
from helpers import benchmark_record


def test_records_merge_and_replace_per_model_and_seed(tmp_path):
    path = str(tmp_path / "results" / "shapes_100it.json")
    record.record_runs(path, 100, [benchmark_record("ifr", 1, 50.0, 40.0, "mask_rcnn"),
                                   benchmark_record("mask_rcnn", 2, 49.0, 40.0)])
    record.record_runs(path, 100, [benchmark_record("mask_rcnn", 1, 48.0, 40.0)])
    # recorded again: replaced
    doc = record.record_runs(path, 100, [benchmark_record("ifr", 1, 51.5, 41.0, "mask_rcnn")])
    assert [(r["model"], r["seed"]) for r in doc["records"]] == [("mask_rcnn", 1), ("mask_rcnn", 2), ("ifr", 1)]
    assert record.load_results(path) == doc and doc["records"][2]["metrics"]["bbox"]["AP"] == 51.5
    assert not [f for f in os.listdir(tmp_path / "results") if ".tmp" in f]
    with pytest.raises(ValueError, match="100-iteration"):
        record.record_runs(path, 200, [benchmark_record("ifr", 2, 1.0, iters=200)])
    with pytest.raises(ValueError, match="of 300 iterations"):
        record.record_runs(path, 100, [benchmark_record("ifr", 2, 1.0, iters=300)])
    (tmp_path / "bad.json").write_text(json.dumps({"iters": 100, "records": [{"model": "ifr", "seed": "1"}]}))
    with pytest.raises(ValueError, match="record 0 needs"):
        record.load_results(str(tmp_path / "bad.json"))


def _record_many(path, worker):
    for i in range(20):
        record.record_runs(path, 100, [benchmark_record(f"m{worker}", i, float(i))])


def test_concurrent_writers_keep_every_record(tmp_path):
    import multiprocessing

    path = str(tmp_path / "r.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(record.load_results(path)["records"]) == 80
    with record.file_lock(path + ".lock") as held:
        assert held
        with record.file_lock(path + ".lock", blocking=False) as again:
            assert again is False  # a second holder (another open file) is refused while the first holds it


def test_git_commit_calls_dirty_only_a_change_of_the_code(tmp_path, monkeypatch):
    """A rewritten record, table or README leaves the code as committed (a campaign writes each finished run into a
    committed record, so every run after the first would otherwise read as dirty); a changed source file does not."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    files = {"pkg/code.py": "x = 1\n", "docs/results/run.json": "{}\n", "docs/results/run.md": "a\n",
             "pkg/README.md": "b\n"}
    for name, text in files.items():
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(record, "REPO", str(tmp_path))
    code = record.git_commit()
    assert len(code["commit"]) == 40 and code["dirty"] is False
    for name in ("docs/results/run.json", "docs/results/run.md", "pkg/README.md"):
        (tmp_path / name).write_text("rewritten\n")
    (tmp_path / "pkg" / "untracked.py").write_text("y = 2\n")
    assert record.git_commit()["dirty"] is False
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert record.git_commit()["dirty"] is True
