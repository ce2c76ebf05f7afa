"""The Markdown files name files that exist: every repository path they quote and every relative link."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP = {".git", "output", "build", "datasets", ".venv", "venv"}
DOCS = sorted(p for p in ROOT.rglob("*.md")
              if not SKIP.intersection(p.relative_to(ROOT).parts) and not p.name.startswith("."))
# a path under one of the repository's top-level folders, as commands and prose quote it
TOP = "configs|tools|benchmarks|docs|projects|d2_refine|csrc|tests"
PATH = re.compile(rf"(?<![\w/.:-])((?:{TOP})/[\w./<>{{}}*-]*[\w>}}*])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TEMPLATE = re.compile(r"[<>{}*\[\]]")  # a pattern or placeholder, not one file


def _missing(doc, text):
    named = PATH.findall(text) + [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    return [t for t in named
            if not TEMPLATE.search(t) and not (ROOT / t).exists() and not (doc.parent / t).exists()]


def test_there_are_docs():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/GPU.md", "projects/IoUNet/README.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_and_links_exist(doc):
    missing = _missing(doc, doc.read_text())
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {sorted(set(missing))}"


def test_the_check_sees_a_missing_file(tmp_path):
    doc = tmp_path / "README.md"
    text = ("Run `python tools/no_such_tool.py`, then read [this](docs/nowhere.md), [GPU](docs/GPU.md#the-check) "
            "and [a sibling](../README.md); see https://example.org/tools/x.py and configs/FPT/Base-FPT-*.yaml.\n")
    assert PATH.findall(text) == ["tools/no_such_tool.py", "docs/nowhere.md", "docs/GPU.md",
                                  "configs/FPT/Base-FPT-*.yaml"]
    assert _missing(doc, text) == ["tools/no_such_tool.py", "docs/nowhere.md", "docs/nowhere.md", "../README.md"]
