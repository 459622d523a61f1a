"""The evidence in the docs is what the committed results say: the full section in docs/evidence.md and the
headline in the README, both written by mpp.experiments.evidence; a change to a results file, or an edit of a
section by hand, fails here until the sections are written again."""

import json
import shutil
from pathlib import Path

import pytest

from mpp.experiments.evidence import (
    EVIDENCE_END,
    EVIDENCE_START,
    HEADLINE_END,
    HEADLINE_START,
    RESULTS,
    render,
    render_headline,
    rewrite,
)

ROOT = Path(__file__).parents[1]
WRITE = "run: python -m mpp.experiments.evidence --write README.md docs/evidence.md"


def section_of(text: str, start: str = EVIDENCE_START, end: str = EVIDENCE_END) -> str:
    return text[text.index(start) : text.index(end) + len(end)]


def test_the_docs_section_is_written_from_the_results_files():
    assert section_of((ROOT / "docs" / "evidence.md").read_text()) == render(), WRITE


def test_the_readme_headline_is_written_from_the_results_files():
    assert section_of((ROOT / "README.md").read_text(), HEADLINE_START, HEADLINE_END) == render_headline(), WRITE


@pytest.fixture
def changed_results(tmp_path):
    """A copy of the results with the primary interval edited."""
    for f in RESULTS.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    grey = json.loads((tmp_path / "gap_grey.json").read_text())
    grey["primary"]["per_seed_t"].update(mean=0.123, low=0.111, high=0.135)
    (tmp_path / "gap_grey.json").write_text(json.dumps(grey))
    return tmp_path


def test_a_changed_result_changes_both_sections(changed_results):
    """The sections follow the files: the edited interval shows in the text of each."""
    for render_section in (render, render_headline):
        changed = render_section(changed_results)
        assert "+0.123 [+0.111, +0.135]" in changed and "+0.123 [+0.111, +0.135]" not in render_section()


def test_rewrite_replaces_each_section_a_file_holds(changed_results, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        f"before\n{HEADLINE_START}\nold\n{HEADLINE_END}\nmiddle\n{EVIDENCE_START}\nold\n{EVIDENCE_END}\nafter\n"
    )
    assert rewrite(page, changed_results) == 2
    text = page.read_text()
    assert text.startswith("before\n") and "\nmiddle\n" in text and text.endswith("\nafter\n") and "old" not in text
    assert section_of(text) == render(changed_results)
    assert section_of(text, HEADLINE_START, HEADLINE_END) == render_headline(changed_results)
