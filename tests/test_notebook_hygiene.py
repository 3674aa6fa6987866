"""What a learner sees before running anything: every committed notebook carries the outputs of a real run,
in order and without errors, stays small, and has the course's shape (title, what you will learn, the Colab
set-up cell stating its needs, a summary, exercises with a check cell)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 2_000_000


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def text(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_come_from_one_run_in_order(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts} are not 1, 2, 3, ...: run it top to bottom in a fresh kernel "
        f"(python scripts/run_notebooks.py {path.relative_to(path.parent.parent)})")
    assert any(c.get("outputs") for c in code), f"{path.name} has no stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_stored_errors(path):
    for i, cell in enumerate(cells(path)):
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name}, cell {i}: stored error {out.get('ename')}"
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                assert "Traceback" not in "".join(out.get("text", "")), f"{path.name}, cell {i}: traceback on stderr"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_small_and_without_widget_state(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.2f} MB (limit 2 MB)"
    assert "widgets" not in json.loads(path.read_text()).get("metadata", {}), f"{path.name} stores widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_course_shape(path):
    all_cells = cells(path)
    number = path.name[:2]
    first = text(all_cells[0])
    assert all_cells[0]["cell_type"] == "markdown" and re.match(rf"# {number} · \S", first), \
        f"{path.name}: the first cell must be the title '# {number} · ...'"
    assert "**You will learn**" in first, f"{path.name}: the first cell must list what the learner will learn"
    setup = next(c for c in all_cells if c["cell_type"] == "code")
    assert "google.colab" in text(setup) and "# Needs:" in text(setup), \
        f"{path.name}: the first code cell must be the Colab set-up with a '# Needs:' line"
    headings = [line for c in all_cells if c["cell_type"] == "markdown" for line in text(c).splitlines()
                if line.startswith("#")]
    assert any(re.match(r"##+ .*Summary", h) for h in headings), f"{path.name}: no '## Summary' heading"
    assert any(re.match(r"##+ .*Exercise", h) for h in headings), f"{path.name}: no exercises heading"
    check = [c for c in all_cells if c["cell_type"] == "code" and text(c).lstrip().startswith("# Check cell")]
    assert check, f"{path.name}: no '# Check cell' for the exercises"
