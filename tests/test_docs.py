"""The Markdown files name files that exist: every repository path they quote, every relative link, and the
heading a link's #anchor names in another Markdown file."""
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP = {"output", "build", "datasets", "venv"}


def _ours(path):
    """A file of the repository: not in a build, data or output folder, nor in a hidden one (.git, a venv, the
    git-ignored .device / .whl folders that carry other projects' packages to a GPU machine, docs/GPU.md)."""
    parts = path.relative_to(ROOT).parts
    return not SKIP.intersection(parts) and not any(part.startswith(".") for part in parts)


DOCS = sorted(p for p in ROOT.rglob("*.md") if _ours(p))
# a path under one of the repository's top-level folders, as commands and prose quote it
TOP = "configs|tools|benchmarks|docs|projects|d2_refine|csrc|tests"
PATH = re.compile(rf"(?<![\w/.:-])((?:{TOP})/[\w./<>{{}}*-]*[\w>}}*])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TEMPLATE = re.compile(r"[<>{}*\[\]]")  # a pattern or placeholder, not one file
ANCHORED = re.compile(r"\]\(([^)#\s]*)#([^)\s]+)\)")


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _headings(path):
    """The headings of a Markdown file, outside code blocks (read once per file)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return tuple(re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M))


def _external(target):
    return re.match(r"[a-z]+:", target) is not None  # https:, mailto:, ...


def _missing(doc, text):
    named = PATH.findall(text) + [t for t in LINK.findall(text) if not _external(t)]
    missing = [t for t in named
               if not TEMPLATE.search(t) and not (ROOT / t).exists() and not (doc.parent / t).exists()]
    for target, anchor in ANCHORED.findall(text):
        path = doc if not target else doc.parent / target
        if not _external(target) and path.suffix == ".md" and path.exists() \
                and anchor not in {_slug(h) for h in _headings(path)}:
            missing.append(f"{target}#{anchor}")
    return missing


# a section cited by its file and title, as comments and prose do: `docs/results/rdsnet.md, "One-stage recipe"`
CITED = re.compile(r'(?:\[[^\]]*\]\()?([\w./-]+\.md)\)?,\s*"([^"]+)"')
SOURCES = sorted(p for p in ROOT.rglob("*") if p.suffix in (".md", ".yaml", ".py") and p.is_file() and _ours(p)
                 and p != pathlib.Path(__file__).resolve())


def _stale_citations(source, text):
    """The ``file.md, "Section"`` citations whose file does not exist or has no heading containing the title."""
    stale = []
    for target, section in CITED.findall(text):
        path = next((p for p in (ROOT / target, source.parent / target) if p.exists()), None)
        if path is None or not any(section.lower() in h.lower() for h in _headings(path)):
            stale.append(f'{target}, "{section}"')
    return stale


def test_cited_sections_exist():
    """A comment or a doc that sends the reader to a section of a Markdown file names one that is there."""
    stale = {str(p.relative_to(ROOT)): s for p in SOURCES if (s := _stale_citations(p, p.read_text()))}
    assert not stale, f"sections cited that their file does not have: {stale}"
    readme = ROOT / "README.md"
    assert _stale_citations(readme, 'see (docs/results/rdsnet.md, "One-stage recipe") and '
                                    '[this](docs/results/shapes.md), "What reproduces"') == []
    assert _stale_citations(readme, '(projects/RDSNet/README.md, "One-stage recipe"), (nowhere.md, "X")') == [
        'projects/RDSNet/README.md, "One-stage recipe"', 'nowhere.md, "X"']


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
            "and [a sibling](../README.md); see https://example.org/tools/x.py and configs/FPT/Base-FPT-*.yaml. "
            "[Here](#a-heading), [gone](#no-such-heading).\n\n## A heading\n")
    doc.write_text(text)
    assert PATH.findall(text) == ["tools/no_such_tool.py", "docs/nowhere.md", "docs/GPU.md",
                                  "configs/FPT/Base-FPT-*.yaml"]
    assert _missing(doc, text) == ["tools/no_such_tool.py", "docs/nowhere.md", "docs/nowhere.md", "../README.md",
                                   "#no-such-heading"]
    assert _slug("Why a regime moves a verdict, or does not") == "why-a-regime-moves-a-verdict-or-does-not"
    assert _slug("`shapes`: default schedule (2,000 iterations)") == "shapes-default-schedule-2000-iterations"
