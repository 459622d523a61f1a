"""The README's evidence section is what the committed results say: written by mpp.experiments.evidence, and a
change to a results file, or an edit of the section by hand, fails here until the section is written again."""

import json
import shutil
from pathlib import Path

from mpp.experiments.evidence import EVIDENCE_END, EVIDENCE_START, RESULTS, render, replace_section

README = Path(__file__).parents[1] / "README.md"


def section_of(text: str) -> str:
    return text[text.index(EVIDENCE_START) : text.index(EVIDENCE_END) + len(EVIDENCE_END)]


def test_the_readme_section_is_written_from_the_results_files():
    assert section_of(README.read_text()) == render(), "run: python -m mpp.experiments.evidence --write README.md"


def test_a_changed_result_changes_the_section(tmp_path):
    """The section follows the files: the primary interval edited in a copy of the results shows in the text."""
    for f in RESULTS.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    grey = json.loads((tmp_path / "gap_grey.json").read_text())
    grey["primary"]["per_seed_t"].update(mean=0.123, low=0.111, high=0.135)
    (tmp_path / "gap_grey.json").write_text(json.dumps(grey))
    changed = render(tmp_path)
    assert "+0.123 [+0.111, +0.135]" in changed and "+0.123 [+0.111, +0.135]" not in render()
    assert section_of(replace_section(README.read_text(), changed)) == changed
