"""scripts/gpu_check.py: its five steps on a CPU with tiny stand-ins (a one-cell notebook, a one-test file, the
tiny SD-shaped model, the stack at quick sizes), the budget, and its refusals. The figures need a lent GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
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
    # sd15 and train have their own tests (test_sd15_memory_script.py, below): left out here for the suite's time
    result = load_script().main(["--device", "cpu", "--tiny", "--out", str(out), "--steps", "memory,notebooks,tests",
                                 "--notebooks", str(stand_ins / "one.ipynb"), str(stand_ins / "broken.ipynb"),
                                 "--tests", str(stand_ins / "test_one.py")])
    assert json.loads(out.read_text()) == result
    assert result["gpu"] == "cpu" and result["torch"] == torch.__version__
    steps = result["steps"]
    assert list(steps) == ["memory", "notebooks", "tests"]                          # the order they ran in
    one, broken = steps["notebooks"]["rows"]                          # run without Jupyter: no kernel on the GPU
    assert one["status"] == "ok" and one["seconds"] is not None and one["cells_run"] == 1
    assert broken["status"] == "failed at code cell 0" and "a GPU branch that breaks" in broken["tail"]
    assert steps["notebooks"]["status"] == "failed"                  # one broken notebook fails the step
    assert steps["tests"]["status"] == "ok" and steps["tests"]["summary"].startswith("1 passed")
    memory_rows = steps["memory"]["rows"]
    assert steps["memory"]["status"] == "ok" and memory_rows                      # the code path ran (--tiny)
    assert all(r["peak_gib"] is None and r["measured_over_accounted"] is None for r in memory_rows)  # no CUDA
    assert memory_rows[0]["accounted_gib"] > 0                        # the accounted figure of the same row, beside it
    assert result["not_covered"]                                    # what the memory scripts do not measure yet


def test_beside_accounted_pairs_rows_by_name_and_gives_the_ratio(tmp_path):
    script = load_script()
    (tmp_path / "acc.json").write_text(json.dumps({"rows": [{"name": "a", "peak_gib": 2.0}]}))
    script.ROOT = tmp_path
    rows = script.beside_accounted([{"name": "a", "peak_gib": 3.0}, {"name": "b", "peak_gib": 1.0}], ("acc.json",))
    assert rows[0]["accounted_gib"] == 2.0 and rows[0]["measured_over_accounted"] == 1.5
    assert rows[1]["accounted_gib"] is None and rows[1]["measured_over_accounted"] is None
    assert script.beside_accounted(None, ("acc.json",)) is None


def test_the_train_step_trains_the_stack_and_bundles_it_in_two_files(tmp_path):
    """scripts/gpu_train.py --tiny: each model's own script on from the shipped weights (quick sizes), two tar files
    under 16 MiB, the record. The VAE's decoder-only run is tested in test_train_scripts.py (left out here for time)."""
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "scripts" / "gpu_train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    record = train.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--budget", "400", "--only", "t2i,pixel_v"])
    assert {m: r["status"] for m, r in record["models"].items()} == {"t2i": "ok", "pixel_v": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_train.json", "stack_a.tar", "stack_b.tar"]
    import tarfile
    with tarfile.open(tmp_path / "stack_a.tar") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "a", filter="data")
    assert {"tiny_sd_emoji.safetensors", "tiny_sd_results.json", "tiny_sd_emoji.md"} <= set(names)
    assert not {"clip_emoji.safetensors", "vae_emoji32.safetensors"} & set(names)   # copies the stages read
    assert record["files"]["ddpm_emoji32_v"]["train_steps"] == 2 and record["not_covered"]
    assert all(b["bytes"] < 16 * 2**20 for b in record["bundles"].values())
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--out", str(tmp_path)])               # a CPU runs the code path only
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--only", "clip"])


def test_a_spent_budget_skips_the_steps_and_says_so(stand_ins):
    result = load_script().main(["--device", "cpu", "--tiny", "--budget", "1", "--steps", "tests,memory",
                                 "--tests", str(stand_ins / "test_one.py"), "--out", str(stand_ins / "c.json")])
    assert {s["status"] for s in result["steps"].values()} == {"skipped: the budget was spent"}


def test_names_and_refusals():
    script = load_script()
    assert script.slug("NVIDIA H200") == "nvidia_h200" and script.slug("Tesla T4 (16 GB)") == "tesla_t4_16_gb"
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--steps", "notebooks,train"])
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--steps", "sd15"])              # full-size SD 1.5 on a CPU
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--steps", "train"])             # training the stack on a CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_it_refuses_cuda_and_names_the_cpu_path(capsys):
    with pytest.raises(SystemExit):
        load_script().main([])
    assert "--device cpu" in capsys.readouterr().err


def test_the_plain_runner_falls_back_to_exec_without_ipython(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("run_plain", ROOT / "scripts" / "run_notebooks_plain.py")
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    monkeypatch.setitem(sys.modules, "IPython.core.interactiveshell", None)     # import fails: no IPython there
    run, how = plain._executor()
    assert how == "exec"
    assert run("x = 21 * 2") is None and run("display(x)") is None and "42" in capsys.readouterr().out
    error = run("raise ValueError('a cell that breaks')")
    assert isinstance(error, ValueError) and "breaks" in str(error)
    with pytest.raises(SystemExit):
        plain.main(["no_such_notebook.ipynb"])
