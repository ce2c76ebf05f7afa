"""Every record under docs/results/ names the command and the commit that wrote it (recovered ones say so)."""
import glob
import json
import os
import re

import pytest

from helpers import ROOT

FILES = sorted(glob.glob(os.path.join(ROOT, "docs", "results", "*.json")))


def _records(doc):
    """(where, record) for each record of a results file: its list items, its "records" / "runs" / recipes' runs,
    or the file itself where it is one record."""
    if isinstance(doc, list):
        return [(f"[{i}]", r) for i, r in enumerate(doc)]
    if isinstance(doc.get("records"), list):
        return [(f"records[{i}]", r) for i, r in enumerate(doc["records"])]
    if isinstance(doc.get("runs"), list):
        return [(f"runs[{i}]", r) for i, r in enumerate(doc["runs"])]
    if isinstance(doc.get("recipes"), dict):
        return [(f"{name} runs[{i}]", r) for name, recipe in doc["recipes"].items()
                for i, r in enumerate(recipe["runs"])]
    return [("(file)", doc)]


def _commit(r):
    code = r.get("code")
    return (code or {}).get("commit") if isinstance(code, dict) else r.get("commit")


def test_there_are_records():
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_each_record_names_its_command_and_commit(path):
    with open(path) as f:
        doc = json.load(f)
    file_level = doc if isinstance(doc, dict) else {}
    for where, r in _records(doc):
        command = r.get("command") or file_level.get("command")
        assert isinstance(command, str) and command.strip(), f"{os.path.basename(path)} {where}: no command"
        commit = _commit(r) or _commit(file_level)
        assert isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{7,40}", commit), \
            f"{os.path.basename(path)} {where}: no commit"
        for p in (r.get("provenance"), file_level.get("provenance")):
            assert p is None or p.startswith("recovered from git history"), p
