"""scripts/measure_memory.py: every row's code path at batch 2 on a CPU (--tiny), and its refusals.

The figures need a CUDA GPU (`python scripts/measure_memory.py`, run by scripts/gpu_check.py); here each row's
course_lib call runs at the smallest sizes, so a broken call shows up before anyone spends GPU time on it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import scriptrun  # tests/scriptrun.py: the scripts run in this process
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "measure_memory.py"


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return scriptrun.run_script(SCRIPT, *args)


def test_tiny_rows_of_notebooks_10_to_17_run_on_cpu(tmp_path):
    out = tmp_path / "memory.json"
    run = run_script("--device", "cpu", "--tiny", "--only", "10,11,12,13,14,15,16,17", "--json", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["failed"] == []
    names = [r["name"] for r in report["rows"]]
    assert {n[:2] for n in names} == {"10", "11", "12", "13", "14", "15", "16", "17"}
    for expected in ("10 LoRA step", "10 lora.fine_tune", "11 DreamBooth full", "11 DreamBooth LoRA",
                     "12 LiDB fit", "12 hypernetwork training", "12 hypernetwork + fast fine-tuning",
                     "12 textual inversion", "13 rectified-flow training step", "13 Euler sampling",
                     "14 MMDiT training step", "15 img2img", "15 inpainting", "15 DDIM inversion",
                     "16 LCM-LoRA distillation", "17 ControlNet training"):
        assert any(n.startswith(expected) for n in names), f"no row {expected!r} in {names}"
    assert all(r["peak_gib"] is None and r["fits"] is None for r in report["rows"])   # a CPU measures nothing
    assert all(r["precision"] == "fp32" for r in report["rows"])                    # a CPU runs fp32 only


def test_only_selects_rows_and_cpu_needs_tiny(tmp_path):
    out = tmp_path / "m.json"
    run = run_script("--device", "cpu", "--tiny", "--only", "5", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["05 sampling (shipped DDPM), fp32"]
    run = run_script("--device", "cpu")
    assert run.returncode != 0 and "--tiny" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_how_to_run_the_code_path():
    run = run_script()
    assert run.returncode != 0 and "--device cpu --tiny" in run.stderr
