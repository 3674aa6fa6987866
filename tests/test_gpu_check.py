"""scripts/gpu_check.py: its four steps on a CPU with tiny stand-ins (a one-cell notebook, a one-test file, the
tiny SD-shaped model), the budget, and its refusals. The figures themselves need a lent GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stand_ins(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(1 + 1)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    broken = nbformat.v4.new_notebook()
    broken.cells = [nbformat.v4.new_code_cell("raise RuntimeError('a GPU branch that breaks')")]
    broken.metadata["kernelspec"] = nb.metadata["kernelspec"]
    nbformat.write(nb, tmp_path / "one.ipynb")
    nbformat.write(broken, tmp_path / "broken.ipynb")
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    return tmp_path


def test_every_step_runs_and_one_file_records_them(stand_ins):
    out = stand_ins / "check.json"
    result = load_script().main(["--device", "cpu", "--sd-preset", "tiny", "--out", str(out),
                                 "--notebooks", str(stand_ins / "one.ipynb"), str(stand_ins / "broken.ipynb"),
                                 "--tests", str(stand_ins / "test_one.py")])
    assert json.loads(out.read_text()) == result
    assert result["gpu"] == "cpu" and result["torch"] == torch.__version__
    steps = result["steps"]
    assert set(steps) == {"notebooks", "tests", "memory", "sd15"}
    one, broken = steps["notebooks"]["rows"]
    assert one["status"] == "ok" and one["cells_seconds"] is not None
    assert broken["status"].startswith("failed") and "a GPU branch that breaks" in broken["tail"]
    assert steps["notebooks"]["status"] == "failed"                  # one broken notebook fails the step
    assert steps["tests"]["status"] == "ok" and steps["tests"]["summary"].startswith("1 passed")
    memory_rows = steps["memory"]["rows"]
    assert steps["memory"]["status"] == "ok" and memory_rows                      # the code path ran (--tiny)
    assert all(r["peak_gib"] is None for r in memory_rows)                          # no CUDA: nothing measured
    sd15 = steps["sd15"]["record"]
    assert steps["sd15"]["status"] == "ok" and sd15["preset"] == "tiny" and sd15["rows"]
    assert result["not_covered"]                                    # what the memory scripts do not measure yet


def test_a_spent_budget_skips_the_steps_and_says_so(stand_ins):
    result = load_script().main(["--device", "cpu", "--budget", "1", "--steps", "tests,memory",
                                 "--tests", str(stand_ins / "test_one.py"), "--out", str(stand_ins / "c.json")])
    assert {s["status"] for s in result["steps"].values()} == {"skipped: the budget was spent"}


def test_names_and_refusals():
    script = load_script()
    assert script.slug("NVIDIA H200") == "nvidia_h200" and script.slug("Tesla T4 (16 GB)") == "tesla_t4_16_gb"
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--steps", "notebooks,train"])
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--steps", "sd15"])              # full-size SD 1.5 on a CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_it_refuses_cuda_and_names_the_cpu_path(capsys):
    with pytest.raises(SystemExit):
        load_script().main([])
    assert "--device cpu" in capsys.readouterr().err
