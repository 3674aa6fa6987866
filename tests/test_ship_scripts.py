"""The scripts that train and measure the shipped tiny SD 3, LCM-LoRA and ControlNet, the full LCM student and the
tiny SD 3's reflow: their quick runs write the
model, its card and its record; a finished model is never replaced without --replace; --measure-only measures the
file as it is. Run in-process (each script's main) on a few images, to keep the suite fast."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(tmp_path: Path) -> list[str]:
    return ["--quick", "--no-progress", "--device", "cpu", "--out-dir", str(tmp_path), "--run-dir",
            str(tmp_path / "run"), "--record", str(tmp_path / "record.json")]


def test_train_controlnet_quick_ships_8_bit_weights_that_load_and_refuses_to_replace(tmp_path):
    module = script("train_controlnet")
    module.main(flags(tmp_path))
    record = json.loads((tmp_path / "record.json").read_text())
    assert [(r["scale"], r["conditional_only"], r.get("guidance")) for r in record["rows"]] == [
        (0.0, False, None), (0.5, False, None), (1.0, False, None), (2.0, False, None), (0.5, True, None),
        (1.0, True, None), (2.0, True, None), (1.0, False, [4.0, 8.0])]
    assert 0 <= record["ceiling"]["follows"] <= 1 and record["eight_bit"]["max_pixel_difference"] < 0.1
    card = (tmp_path / "controlnet_edges.md").read_text()
    assert "8 bits a weight" in card and "| real emoji through the VAE (ceiling) |" in card
    from course_lib.pipeline import TextToImage
    net, info = module.load_shipped_controlnet(tmp_path / "controlnet_edges.safetensors", TextToImage.from_shipped())
    assert info["steps"] == 3 and info["control"] == "edges" and not any(p.requires_grad for p in net.parameters())
    assert (tmp_path / "controlnet_edges.safetensors").stat().st_size < 2.6e6        # ~1 byte a weight, not 2
    with pytest.raises(SystemExit, match="not replaced silently"):
        module.main(flags(tmp_path))


def test_train_lcm_lora_quick_records_the_targets_at_equal_evaluations(tmp_path):
    module = script("train_lcm_lora")
    module.main(flags(tmp_path))
    record = json.loads((tmp_path / "record.json").read_text())
    student = {r["evaluations"]: r for r in record["rows"] if r["model"] == "student"}
    teacher = [r for r in record["rows"] if r["model"] == "teacher"]
    assert sorted(student) == [1, 2, 4, 8] and all(r["evaluations"] in (1, 2 * r["steps"]) for r in teacher)
    best = min(r["fid"] for r in teacher)
    for v in record["verdicts"]:
        assert v["teacher_best_fid"] == best and v["met"] == (student[v["evaluations"]]["fid"] / best <= v["target"])
    assert record["model"]["rank"] == 8 and "LCM-LoRA" in (tmp_path / "lcm_lora_tiny_sd.md").read_text()
    with pytest.raises(SystemExit, match="not replaced silently"):
        module.main(flags(tmp_path))


def test_train_tiny_sd3_quick_trains_an_mmdit_and_measure_only_keeps_it(tmp_path):
    module = script("train_tiny_sd3")
    module.main(flags(tmp_path))
    path = tmp_path / "tiny_sd3_emoji.safetensors"
    from course_lib.mmdit import MMDiT
    from course_lib.unet_file import load_model
    model, _, info = load_model(path)
    assert isinstance(model, MMDiT) and info["prediction"] == "flow"
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="not replaced silently"):
        module.main(flags(tmp_path))
    module.main(flags(tmp_path) + ["--measure-only"])
    assert path.read_bytes() == before
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["model"]["steps"] == 3 and {"tiny_sd3", "tiny_sd", "guidance_sweep"} <= set(record)
    assert torch.isfinite(torch.tensor([r["fid"] for r in record["tiny_sd3"]])).all()


def test_train_lcm_full_student_quick_writes_a_unet_file_measured_like_the_adapter(tmp_path):
    module = script("train_lcm_lora")
    module.main(flags(tmp_path) + ["--student", "full", "--lr-decay", "cosine"])
    from course_lib.unet import UNet
    from course_lib.unet_file import load_model
    model, _, info = load_model(tmp_path / "lcm_tiny_sd.safetensors")
    assert isinstance(model, UNet) and info["student"] == "full" and info["lcm"]["target_ema"] == 0.95
    assert info["lr"] == 1e-4 and info["trainable"] == sum(p.numel() for p in model.parameters())
    assert info["lr_decay"] == "cosine" and "at lr 0.0001 decaying by a cosine to 0" in \
        (tmp_path / "lcm_tiny_sd.md").read_text()
    record = json.loads((tmp_path / "record.json").read_text())
    assert sorted(r["evaluations"] for r in record["rows"] if r["model"] == "student") == [1, 2, 4, 8]
    assert "latent consistency model" in (tmp_path / "lcm_tiny_sd.md").read_text()


def test_reflow_quick_makes_pairs_once_trains_and_compares_at_equal_evaluations(tmp_path):
    module = script("reflow_tiny_sd3")
    module.main(flags(tmp_path))
    record = json.loads((tmp_path / "record.json").read_text())
    rows = record["rows"]
    assert all(r["evaluations"] == r["steps"] * (1 if r["guidance"] == 1 else 2) for r in rows)
    assert sorted(r["evaluations"] for r in rows if r["model"] == "reflow") == [1, 2, 4, 8]
    for v in record["verdicts"]:
        at = [r["fid"] for r in rows if r["evaluations"] == v["evaluations"]]
        assert min(at) == min(v["fid"].values())
    assert {"teacher_guided", "teacher_unguided", "reflow"} <= set(record["straightness"])
    assert record["model"]["pairs"]["pairs"] == 8 and record["model"]["train_config"]["caption_dropout"] == 0
    assert (tmp_path / "run" / "pairs.safetensors").is_file()     # made once, read by a rerun
    with pytest.raises(SystemExit, match="not replaced silently"):
        module.main(flags(tmp_path))
