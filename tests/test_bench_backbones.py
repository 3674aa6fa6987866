"""scripts/bench_backbones.py: the U-Net against the MMDiT (and DiT) at equal training FLOPs.

The full bench trains four models for about 40 minutes of one CPU thread; here its --quick mode runs the same code
on a few images with a budget of a few GFLOPs (about 20 s), and the pieces with rules in them (the steps a budget
buys, the verdict, the refusal of an unknown model) are checked on their own.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import scriptrun  # tests/scriptrun.py: the scripts run in this process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_backbones.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_backbones", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    return scriptrun.run_script(SCRIPT, *args)


def test_quick_run_trains_both_backbones_to_the_same_flop_budget_and_rerun_skips_them(tmp_path):
    out = tmp_path / "backbones.json"
    run = run_script("--quick", "--models", "sd_tiny,mmdit_tiny", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    models, settings = record["models"], record["settings"]
    assert list(models) == ["sd_tiny", "mmdit_tiny"]
    assert [m["family"] for m in models.values()] == ["U-Net", "MMDiT"]
    budget = settings["budget_tflop"] * 1e12
    for m in models.values():
        assert abs(m["steps"] * m["train_flops_per_step"] - budget) <= m["train_flops_per_step"]
        assert m["train_flops"] == m["steps"] * m["train_flops_per_step"]
        assert [r["sample_steps"] for r in m["rows"]] == settings["sample_steps"]
        assert all(r["fid"] > 0 and 0 <= r["judge_top1"] <= 1 and r["seconds_per_image"] > 0 for r in m["rows"])
        assert m["params"] > 0 and m["forward_gflop_per_image"] > 0 and m["train_seconds"] > 0
        assert m["seed_check"]["sample_steps"] == max(settings["sample_steps"])
    # the cheaper model takes more steps for the same budget
    assert models["mmdit_tiny"]["train_flops_per_step"] < models["sd_tiny"]["train_flops_per_step"]
    assert models["mmdit_tiny"]["steps"] > models["sd_tiny"]["steps"]
    ref = record["references"]
    assert ref["n"] == settings["n"] and ref["matched_floor"]["fid"] > 0 and ref["vae_ceiling"]["fid"] > 0
    assert 0 <= ref["real_heldout"]["judge_top1"] <= 1
    assert record["noise_threshold"] >= 0 and record["machine"] and record["torch"]
    assert "--quick" in record["command"]
    assert "verdict: largest model of each family" in run.stdout
    assert sum(line.startswith("verdict:") for line in run.stdout.splitlines()) == len(record["verdict"])

    again = run_script("--quick", "--models", "sd_tiny,mmdit_tiny", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("measured by an earlier run with these settings") == 2
    assert json.loads(out.read_text())["models"] == models


def test_steps_for_budget_spends_the_budget_to_within_half_a_step():
    bench = load_script()
    for flops in (1.7e9, 7.94e9, 29.76e9, 3.3e12):
        steps = bench.steps_for_budget(15, flops)
        assert abs(steps * flops - 15e12) <= flops / 2
    assert bench.steps_for_budget(15, 7.5e9) == 2000
    assert bench.steps_for_budget(15, 1.5e9) == 10 * bench.steps_for_budget(15, 15e9)   # cheaper: more steps
    assert bench.steps_for_budget(0.001, 1e12) == 1                                    # never zero steps
    with pytest.raises(ValueError, match="positive"):
        bench.steps_for_budget(0, 1e9)


def test_an_unknown_model_is_refused_naming_the_valid_ones(capsys):
    bench = load_script()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--models", "sd_tiny,unet_huge"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'unet_huge'" in err and all(name in err for name in bench.MODELS)
    assert bench.parse_models("sd_tiny, mmdit_tiny,sd_tiny") == ["sd_tiny", "mmdit_tiny"]


def fake_model(family: str, gflop: float, fid: float, seed_difference: float = 0.1) -> dict:
    return {"family": family, "forward_gflop_per_image": gflop, "rows": [{"sample_steps": 20, "fid": fid}],
            "seed_check": {"sample_steps": 20, "difference": seed_difference}}


def test_the_verdict_names_a_winner_only_beyond_the_noise_and_reads_the_trend_with_size():
    bench = load_script()
    models = {"sd_tiny": fake_model("U-Net", 0.04, 30.0), "sd_small": fake_model("U-Net", 0.16, 25.0),
              "mmdit_tiny": fake_model("MMDiT", 0.01, 28.0), "mmdit_small": fake_model("MMDiT", 0.07, 24.5)}
    lines = bench.verdict(models, noise=1.0)
    assert lines[0].startswith("rule: FID at 20 Euler steps")
    assert any("largest model of each family" in s and "within the noise" in s for s in lines)     # 24.5 vs 25.0
    assert any(s.startswith("U-Net: quality improves with size") for s in lines)
    assert any(s.startswith("MMDiT: quality improves with size") and "finding" in s and "holds" in s for s in lines)
    lines = bench.verdict(models, noise=0.2)
    assert any("largest model of each family: MMDiT (mmdit_small" in s and "better than U-Net by 0.50" in s
               for s in lines)
    models["mmdit_small"]["rows"][0]["fid"] = 28.5
    lines = bench.verdict(models, noise=1.0)
    assert any(s.startswith("MMDiT: quality no clear trend") and "not resolved" in s for s in lines)
    assert any("best model of each family" in s for s in lines)    # mmdit_tiny is now the MMDiTs' best
