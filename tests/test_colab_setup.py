"""Colab readiness: each notebook's set-up cell, run as Colab would run it, installs the course and makes it importable.

Colab is stood in for by a `google.colab` module on the path. The cell then clones the course (here from this
checkout, via COURSE_REPO) into COURSE_DIR and pip-installs it editable with --no-deps. That install must not touch
the test's own environment, so it runs in a throwaway virtual environment that sees the test environment's packages
read-only (a .pth file pointing at its site-packages) and gets its own editable install of the clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def setup_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def code_lines(source: str) -> list[str]:
    """The cell without its comments: what it runs."""
    return [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_every_set_up_cell_runs_the_same_code():
    reference = code_lines(setup_cell(NOTEBOOKS[0]))
    assert any("google.colab" in line for line in reference)
    for path in NOTEBOOKS[1:]:
        assert code_lines(setup_cell(path)) == reference, f"{path.name}: its set-up cell differs from {NOTEBOOKS[0].name}'s"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_set_up_cell_states_its_needs(path):
    needs = next((line for line in setup_cell(path).splitlines() if line.startswith("# Needs:")), "")
    assert "GPU" in needs, f"{path.name}: the Needs line must say what GPU it needs (or that it needs none)"
    assert "full mode" in needs and "quick mode" in needs, f"{path.name}: the Needs line must give both modes' times"
    assert "__" not in needs, f"{path.name}: an unfilled placeholder in {needs!r}"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to clone the checkout")
def test_the_set_up_cell_installs_the_course_as_on_colab(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    # a throwaway environment that sees this one's packages but installs into itself
    env_dir = tmp_path / "colab-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "test-env.pth").write_text(ours + "\n")        # pip and everything else, read-only
    stub = tmp_path / "stub" / "google" / "colab"
    stub.mkdir(parents=True)
    (stub.parent / "__init__.py").write_text("")
    (stub / "__init__.py").write_text('"""Stand-in for Colab\'s module: its presence is what the set-up cell checks."""\n')
    where = tmp_path / "content" / "course"
    cell = setup_cell(NOTEBOOKS[0])
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(stub.parent.parent)!r})\n"
        "import google.colab\n"
        + cell + "\n"
        "import importlib, course_lib\n"
        "from course_lib.pipeline import TextToImage\n"
        "from course_lib import lora, dreambooth, hyperdreambooth\n"
        "print('COURSE_LIB', course_lib.__file__)\n"
    )
    env = dict(os.environ, COURSE_REPO=str(ROOT), COURSE_DIR=str(where), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(python), "-c", probe], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert (where / "course_lib" / "__init__.py").exists(), "the cell did not clone the course into COURSE_DIR"
    imported = run.stdout.split("COURSE_LIB", 1)[1].strip()
    assert Path(imported).resolve().is_relative_to(where.resolve()), \
        f"course_lib came from {imported}, not from the clone in {where}"
    # the test's own environment is untouched: course_lib still resolves to this checkout
    import course_lib
    assert Path(course_lib.__file__).resolve().is_relative_to(ROOT)
    mine = subprocess.run([sys.executable, "-c", "import course_lib; print(course_lib.__file__)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert Path(mine).resolve().is_relative_to(ROOT.resolve()), mine
