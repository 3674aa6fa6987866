"""The training scripts never continue a run with settings other than its own: changed flags are refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from scriptrun import run_script

ROOT = Path(__file__).resolve().parents[1]


def _ddpm(tmp_path, *flags):
    return run_script("train_ddpm.py", "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--max-minutes",
                      "0.0001", "--threads", "1", "--device", "cpu", "--run-dir", str(tmp_path), "--out-dir",
                      str(tmp_path), *flags)


def test_train_ddpm_refuses_to_resume_with_other_flags(tmp_path):
    first = _ddpm(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "not finished" in first.stdout and (tmp_path / "ddpm_emoji32.train.safetensors").exists()
    changed = _ddpm(tmp_path, "--prediction", "v", "--zero-terminal-snr", "--lr", "1.0")
    assert changed.returncode != 0
    assert "prediction: checkpoint 'epsilon', now 'v'" in changed.stderr
    assert "zero_terminal_snr: checkpoint False, now True" in changed.stderr
    again = _ddpm(tmp_path)                              # the same flags: it resumes
    assert again.returncode == 0 and "resumed at step" in again.stdout, again.stderr[-2000:]


def test_train_ddpm_trains_a_flow_model_and_its_card_has_the_curve_measured_while_training(tmp_path):
    out = run_script("train_ddpm.py", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--threads", "1",
                     "--device", "cpu", "--run-dir", str(tmp_path), "--out-dir", str(tmp_path), "--objective", "flow",
                     "--timestep-sampling", "logit_normal", "--curve-every", "2", "--curve-n", "16",
                     "--eval-samples", "16", "--eval-steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    card = (tmp_path / "ddpm_emoji32.md").read_text()
    assert "| objective | rectified flow: velocity prediction, logit_normal times |" in card
    rows = [line for line in card.splitlines() if line.startswith(("| 2 |", "| 4 |"))]
    assert len(rows) == 2 and "## Quality while training" in card                   # one point every 2 steps
    curve = json.loads((tmp_path / "ddpm_emoji32.curve.json").read_text())
    assert [p["step"] for p in curve] == [2, 4] and all(p["fid"] > p["floor_fid"] > 0 for p in curve)

    # a second run started from it, with a cosine decay: the card counts both runs, and the start's weights are
    # copied into the run folder, so replacing the file it started from leaves the card's earlier point measurable
    more = tmp_path / "more"
    out = run_script("train_ddpm.py", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--threads", "1",
                     "--device", "cpu", "--run-dir", str(more), "--out-dir", str(more), "--objective", "flow",
                     "--timestep-sampling", "logit_normal", "--lr-decay", "cosine", "--eval-samples", "16",
                     "--eval-steps", "2", "--init-from", str(tmp_path / "ddpm_emoji32.safetensors"))
    assert out.returncode == 0, out.stderr[-2000:]
    card = (more / "ddpm_emoji32.md").read_text()
    assert "(warm-up 200, cosine decay to 0)" in card and "; in all 6 steps," in card
    start = (more / "start_ddpm_emoji32.safetensors").read_bytes()
    assert start == (tmp_path / "ddpm_emoji32.safetensors").read_bytes()
    assert [line.split(" |")[0] for line in card.splitlines() if line.startswith(("| 4 |", "| 6 |"))] == ["| 4", "| 6"]


def test_train_tiny_sd_quick_vae_with_perceptual_and_adversarial_terms_logs_its_curve(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "train_tiny_sd.py"), "--quick", "--stage", "vae", "--no-progress",
           "--perceptual-weight", "1", "--adversarial-weight", "0.5", "--eval-every", "2", "--vae-warmup", "2",
           "--threads", "1", "--device", "cpu", "--out-dir", str(tmp_path), "--run-dir", str(tmp_path)]
    out = run_script(*cmd[1:])
    assert out.returncode == 0, out.stderr[-2000:]
    curve = json.loads((tmp_path / "vae_emoji32.curve.json").read_text())
    assert [p["step"] for p in curve] == [1, 2] and all({"heldout_psnr", "sharpness"} <= set(p) for p in curve)
    from course_lib.vae import load_vae
    _, _, info = load_vae(tmp_path / "vae_emoji32.safetensors")
    assert info["loss_terms"]["adversarial_weight"] == 0.5 and info["curve"] == curve and info["sharpness"] > 0
    # then its decoder alone (SD's ft-MSE): the encoder and the latent scale stay; terms or a missing start refused
    dec = cmd[:cmd.index("--perceptual-weight")] + ["--vae-part", "decoder", "--vae-decay", "cosine", "--vae-warmup",
                                                      "1", "--threads", "1", "--device", "cpu"]
    base = [str(tmp_path / "dec"), "--run-dir", str(tmp_path / "dec")]
    out = run_script(*dec[1:], "--init-from", str(tmp_path), "--out-dir", *base)
    assert out.returncode == 0, out.stderr[-2000:]
    first, scale, _ = load_vae(tmp_path / "vae_emoji32.safetensors")
    tuned, tuned_scale, tuned_info = load_vae(tmp_path / "dec" / "vae_emoji32.safetensors")
    assert tuned_scale == scale and tuned_info["part"] == "decoder" and tuned_info["decay"] == "cosine"
    assert torch.equal(first.encoder.conv_in.weight, tuned.encoder.conv_in.weight)
    assert not torch.equal(first.decoder.conv_out.weight, tuned.decoder.conv_out.weight)
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_tiny_sd
    for extra, message in [([], "pass --init-from"), (["--init-from", str(tmp_path), "--perceptual-weight", "1"],
                                                      "for the squared-error VAE training")]:
        with pytest.raises(SystemExit, match=message):                # refused before any training, in-process
            train_tiny_sd.main(dec[2:] + extra + ["--out-dir"] + base)


def test_study_recipes_quick_runs_a_vae_recipe_with_both_terms_and_writes_nothing(tmp_path):
    out = run_script("study_recipes.py", "--quick", "--recipes", "perceptual 0.05+gan", "--adversarial-start", "1",
                     cwd=tmp_path)                       # squared error alone is the VAE's own loss, tested in test_vae
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| perceptual 0.05+gan |" in out.stdout and "perceptual distance" in out.stdout
    assert "wrote" not in out.stdout


def test_study_recipes_tiny_sd_quick_measures_each_recipe_against_the_matched_floor(tmp_path):
    out_file = tmp_path / "recipes.json"
    out = run_script("study_recipes.py", "--base", "tiny_sd", "--quick", "--recipes", "shipped", "--out", str(out_file),
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out_file.read_text())
    record = json.loads(out_file.read_text())
    [row] = record["rows"]
    last = row["curve"][-1]
    assert row["recipe"] == "shipped" and row["steps"] > 0 and last["fid"] > 0 and last["matched_floor"] > 0
    assert "| shipped |" in out.stdout and f"{last['fid'] / last['matched_floor']:.2f}x" in out.stdout
    # a second run with the same settings adds its rows to the record (written by the same function)
    sys.path.insert(0, str(ROOT / "scripts"))
    import study_recipes
    second = {**record, "rows": [{**row, "recipe": "sd_tiny"}], "command": "second"}
    study_recipes.write_record(str(out_file), second, ("base", "minutes", "n", "seed", "threads"))
    merged = json.loads(out_file.read_text())
    assert [r["recipe"] for r in merged["rows"]] == ["shipped", "sd_tiny"] and merged["command"].endswith("; second")
    bad = run_script("study_recipes.py", "--base", "tiny_sd", "--quick", "--recipes", "adam", cwd=tmp_path)
    assert bad.returncode != 0 and "valid are shipped" in bad.stderr


def test_model_cards_give_cpu_hours_and_a_curve_from_the_record():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_tiny_sd as t
    info = {"train_seconds": 5400.0, "initialised_from": {"train_seconds": 1800.0, "steps": 100}}
    assert t.cpu_hours(info)[0].startswith("| CPU-hours | 2.00 (this run and the runs it started from")
    # a run started from a run that was itself started from another: the whole chain's CPU time is counted
    middle = {"train_seconds": 1800.0, "steps": 100, "initialised_from": {"train_seconds": 900.0, "earlier_seconds": 900}}
    middle["initialised_from"]["steps"] = 50
    assert t.before_summary(middle) == {"steps": 100, "train_seconds": 1800.0, "earlier_seconds": 1800.0,
                                        "earlier_steps": 50}
    assert t.steps_before({"initialised_from": t.before_summary(middle)}) == 150
    assert t.cpu_hours({"train_seconds": 3600.0, "initialised_from": t.before_summary(middle)})[0].startswith(
        "| CPU-hours | 2.00 (")
    assert t.cpu_hours({"train_seconds": 3600.0}) == ["| CPU-hours | 1.00 |"]
    curve = [{"step": s, "seconds": 36.0 * s, "psnr": 20 + s / 100} for s in (1, 100, 200, 300)]
    lines = t.curve_lines(curve, {"psnr": "PSNR"}, offset=100)
    rows = [line for line in lines if line.startswith("| 1") or line.startswith("| 3") or line.startswith("| 4")]
    assert rows == ["| 101 | 0.01 | 20.010 |", "| 300 | 2.00 | 22.000 |", "| 400 | 3.00 | 23.000 |"]
    assert t.curve_lines([], {"psnr": "PSNR"}) == []
