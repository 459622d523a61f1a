"""The docs cannot rot: every Python block of the README and of docs/ runs against the code, in order, page by page,
and the MkDocs site builds in strict mode (no broken link, anchor or API reference).

A block that cannot run offline says so on the line before its fence, with the reason:
<!-- not run: it downloads from the Hub -->
The placeholder `runs/<date-time>` (the folder a run writes) stands for a finished tiny run made here.
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpp.commands import COMMANDS

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")
RUN_PLACEHOLDER = "runs/<date-time>"


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line, code, why it is not run or None) of each ```python block, in page order."""
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        blocks.append((line, m.group(1), reason.group(1) if reason else None))
    return blocks


def test_blocks_are_found_and_the_marker_is_read():
    """The parser itself: a marked block is skipped with its reason, an unmarked one is run, a bash block is not
    Python."""
    page = "text\n<!-- not run: needs the Hub -->\n```python\nhub()\n```\n\n```python\nx = 1\n```\n```bash\nls\n```\n"
    assert python_blocks(page) == [(3, "hub()\n", "needs the Hub"), (7, "x = 1\n", None)]


def test_every_page_with_python_has_blocks_that_run():
    """Pages whose code the suite runs: a new page is picked up, and few blocks are excused."""
    counted = {p.relative_to(ROOT).as_posix(): python_blocks(p.read_text()) for p in PAGES}
    run = sum(1 for blocks in counted.values() for *_, reason in blocks if reason is None)
    excused = [(page, line) for page, blocks in counted.items() for line, _, reason in blocks if reason]
    assert {"README.md", "docs/library.md", "docs/downstream.md"} <= {p for p, b in counted.items() if b}
    assert run >= 8 and len(excused) <= 2, (run, excused)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny pretraining run, for the pages' `runs/<date-time>`."""
    import mpp

    out = tmp_path_factory.mktemp("docs-run") / "run"
    mpp.pretrain(dataset="mnist5k", model="test_vit", max_steps=2, batch_size=8, output_dir=str(out), progress=False)
    return out


PAGES_WITH_CODE = [p for p in PAGES if any(reason is None for *_, reason in python_blocks(p.read_text()))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_python_blocks_of_a_page_run(page, finished_run, tmp_path, monkeypatch):
    blocks = [(line, code) for line, code, reason in python_blocks(page.read_text()) if reason is None]
    monkeypatch.chdir(tmp_path)  # what a block writes (out/, runs/notebook) lands here
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        code = code.replace(RUN_PLACEHOLDER, str(finished_run))
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as e:  # name the block, not only the line inside it
            raise AssertionError(f"{page.relative_to(ROOT)}, the block at line {line}: {type(e).__name__}: {e}") from e


def test_the_site_builds_strictly(tmp_path):
    """mkdocs build --strict: a broken link, a missing anchor, a page left out of the nav or an API reference to
    a name that does not exist fails the build. Not with -q: it hides the warnings that strict mode counts."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "objective" / "index.html").read_text().count("from_pretrained") > 0
    # the Flags page is written from the commands' parsers: every flag of every command is on it
    flags_page = (tmp_path / "site" / "flags" / "index.html").read_text()
    for command in COMMANDS.values():
        parser = importlib.import_module(command.module).build_parser()
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                for flag in action.option_strings:
                    assert f"<code>{flag}</code>" in flags_page, (command.module, flag)
