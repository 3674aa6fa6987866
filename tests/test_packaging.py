"""environment.yml (the conda route) asks for what pyproject.toml asks for, with the same version bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}          # where conda-forge's name differs from PyPI's


def requirement(spec: str) -> tuple[str, str]:
    """'regex>=2024.11.6' -> ('regex', '>=2024.11.6'); comments and spaces dropped."""
    name, bounds = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", spec.split("#")[0]).groups()
    return name.lower(), bounds.replace(" ", "")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [requirement(s) for s in project["dependencies"]]
    for extra in ("notebooks", "test"):
        wanted += [requirement(s) for s in project["optional-dependencies"][extra]]
    lines = [line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
             if line.strip().startswith("- ") and line.strip() not in ("- pip", "- pip:")]
    listed = dict(requirement(line) for line in lines)
    for name, bounds in wanted:
        conda = CONDA_NAMES.get(name, name)
        assert conda in listed, f"environment.yml lacks {conda} (pyproject.toml asks for {name}{bounds})"
        assert listed[conda] == bounds, (f"environment.yml asks for {conda}{listed[conda]}, pyproject.toml for "
                                         f"{name}{bounds}; keep them the same")
