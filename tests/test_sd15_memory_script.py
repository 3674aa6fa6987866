"""scripts/measure_sd15_memory.py: its code path on the tiny preset on a CPU, and its refusal without a GPU.

The numbers themselves need a CUDA GPU (`python scripts/measure_sd15_memory.py`); here every row runs on the tiny
networks in seconds, so a broken call into course_lib.sd shows up before anyone spends GPU time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import scriptrun  # tests/scriptrun.py: the scripts run in this process
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "measure_sd15_memory.py"
ROWS = ("weights only", "generation", "VAE decode, batch 2, sliced", "VAE decode, batch 2, at once",
        "LoRA step", "gradient checkpointing", "no checkpointing", "LoRA-DreamBooth step with prior preservation",
        "HyperDreamBooth rank-relaxed fast fine-tuning",
        "textual inversion step", "full DreamBooth, float32 weights + fp16 autocast, AdamW;",
        "full DreamBooth, bf16 weights (stochastic rounding), 8-bit AdamW, checkpointing",
        "VAE slicing, attention one", "VAE decode, batch 2, sliced, tiles of", "QLoRA step")
FIELDS = {"name", "status", "seconds", "peak_gib", "reserved_gib", "fits", "categories_gib"}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return scriptrun.run_script(SCRIPT, *args)


def test_tiny_preset_on_cpu_runs_every_row(tmp_path):
    out = tmp_path / "memory.json"
    run = run_script("--preset", "tiny", "--device", "cpu", "--steps", "2", "--json", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    for row in ROWS:
        assert any(row in line for line in table), f"no table row mentions {row!r}:\n{run.stdout}"
    assert "within 8 GiB" in run.stdout and "not measured" in run.stdout

    report = json.loads(out.read_text())
    assert {"machine", "torch", "gpu", "preset", "size", "steps", "parameters", "rows"} <= set(report)
    assert (report["preset"], report["size"], report["steps"], report["gpu"]) == ("tiny", 64, 2, None)
    assert set(report["parameters"]) == {"unet", "vae", "text_encoder"}
    rows = report["rows"]
    assert len(rows) == 17
    names = " / ".join(r["name"] for r in rows)
    for row in ROWS:
        assert row in names
    for r in rows:
        assert set(r) == FIELDS
        assert r["status"] == "ok" and r["seconds"] >= 0
        assert r["peak_gib"] is None and r["reserved_gib"] is None and r["fits"] is None   # a CPU measures nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_and_says_what_is_needed():
    run = run_script("--steps", "1")
    assert run.returncode != 0
    assert "CUDA" in run.stderr and "--preset tiny --device cpu" in run.stderr


def test_sd15_on_cpu_and_bad_sizes_are_refused():
    run = run_script("--preset", "sd15", "--device", "cpu")
    assert run.returncode != 0 and "--preset tiny" in run.stderr
    run = run_script("--preset", "tiny", "--device", "cpu", "--size", "40")
    assert run.returncode != 0 and "multiple of 16" in run.stderr


def test_tiny_preset_accounted_for_a_t4_runs_every_row_with_a_breakdown(tmp_path):
    out = tmp_path / "accounted.json"
    run = run_script("--preset", "tiny", "--account", "T4", "--steps", "2", "--json", str(out),
                     "--only", "weights only,no checkpointing,QLoRA")     # a LoRA step and the NF4 one (for time)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "accounted as on the T4" in run.stdout
    report = json.loads(out.read_text())
    assert report["accounted"] == "T4" and report["dtype"] == "torch.float16" and len(report["rows"]) == 3
    for r in report["rows"]:
        assert r["status"] == "ok" and r["peak_gib"] > 0, r
        parts = r["categories_gib"]
        assert abs(sum(parts.values()) - r["peak_gib"]) < 1e-9 and parts["weights"] > 0
    weights = report["rows"][0]["categories_gib"]["weights"] * 2 ** 30
    assert weights == 2 * sum(report["parameters"].values())     # float16: two bytes a parameter
