"""The memory tables of docs/results.md are what scripts/memory_report.py prints from the results files."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import memory_report  # noqa: E402


def test_readme_tables_match_the_results_files():
    readme = (ROOT / "docs" / "results.md").read_text()
    assert memory_report.fill(readme) == readme, "run: python scripts/memory_report.py --readme"


def test_every_accounted_sd15_row_ran():
    for line in memory_report.sd15_table()[2:]:
        assert "failed" not in line, line
