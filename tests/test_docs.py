"""The docs match the repository: every relative link in the README and docs/ points at a file and a heading
that exist, and docs/architecture.md names every module of the package.

The README and the docs link into each other by GitHub heading anchors (`docs/r3-synergy-history.md#...`);
when a section moves or a heading is reworded, a link breaks silently on GitHub.  This reads the markdown as
GitHub does: fenced code is not markdown, and a heading's anchor is its text lower-cased, with punctuation
other than '-' and '_' dropped and spaces turned into '-', a repeated heading getting '-1', '-2', ...
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (fenced code skipped)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", markdown).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(path: Path) -> list[str]:
    """The links of one markdown file that point inside the repository (not http:, https:, mailto:)."""
    links = [match.group(1) for match in _LINK.finditer(_FENCE.sub("", path.read_text(encoding="utf-8")))]
    return [link for link in links if not re.match(r"^[a-zA-Z][a-zA-Z+.-]*:", link)]


def broken_links(path: Path) -> list[str]:
    """Relative links of one markdown file whose file or heading anchor does not exist."""
    broken = []
    for link in relative_links(path):
        target_part, _, anchor = link.partition("#")
        target = (path.parent / target_part).resolve() if target_part else path
        if not target.exists():
            broken.append(f"{link} (no file {target_part})")
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link} (no heading with anchor #{anchor} in {target.name})")
    return broken


def test_heading_anchors_follow_githubs_rules():
    markdown = "\n".join([
        "# r3-rl",
        "## Reproducing a run's numbers (`environment.json`)",
        "### Memory: plan a run before launching it (`r3-rl plan`)",
        "## Sessions 24-29 (2026-12-04 and 2026-12-05), newest first",
        "## Notes",
        "## Notes",
        "```bash",
        "# not a heading",
        "```",
        "#not a heading either",
    ])
    assert heading_anchors(markdown) == {
        "r3-rl",
        "reproducing-a-runs-numbers-environmentjson",
        "memory-plan-a-run-before-launching-it-r3-rl-plan",
        "sessions-24-29-2026-12-04-and-2026-12-05-newest-first",
        "notes",
        "notes-1",
    }


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md) [ok](other.md#a-part) [ok](#page) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](other.md#b-part) [bad local](#nowhere)\n"
        "```\n[in code](nothing.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md (no file missing.md)",
        "other.md#b-part (no heading with anchor #b-part in other.md)",
        "#nowhere (no heading with anchor #nowhere in page.md)",
    ]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("r3_rl/**/README.md"))]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_project_docs_have_no_broken_links(path):
    assert broken_links(path) == []


def test_the_readme_is_read_for_links():
    # The README links into its own sections and into docs/ dozens of times; a parser that found none would
    # pass the check above vacuously.
    links = relative_links(ROOT / "README.md")
    assert len(links) >= 20
    assert any(link.startswith("docs/") and "#" in link for link in links)
    assert any(link.startswith("#") for link in links)


def test_architecture_names_every_module():
    """docs/architecture.md is the map of the code: a module it does not name is one the next engineer cannot
    find from it (until session 33 it missed the Janus engine and prompt modules, the GenEval detectors,
    `run_dir` and the doctor's `devices`).  A module counts as named by its path, its file name or its name in
    backticks (the tables list a package's modules by name)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [p for folder in ("r3_rl", "rewards", "eval") for p in sorted((ROOT / folder).rglob("*.py"))
               if p.name != "__init__.py"]
    assert len(modules) > 100
    missing = [str(p.relative_to(ROOT)) for p in modules
               if str(p.relative_to(ROOT)) not in text and p.name not in text and f"`{p.stem}`" not in text
               and f"`{p.stem}." not in text]
    assert missing == [], f"docs/architecture.md does not name: {missing}"
