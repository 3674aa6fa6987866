"""scripts/train_clip_judge.py: its code path in quick mode (a few steps, a small evaluation), and its refusals.

The shipped judge itself comes from a full run (`python scripts/train_clip_judge.py`, minutes on a CPU); here the
same code trains three steps, saves, reloads, scores real and generated images with both CLIPs and writes a card.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import scriptrun  # tests/scriptrun.py: the scripts run in this process

from course_lib.clip import load_clip

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_clip_judge.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return scriptrun.run_script(SCRIPT, *args)


def test_quick_run_trains_saves_and_writes_a_card_with_both_judges(tmp_path):
    run = run_script("--quick", "--out-dir", str(tmp_path), "--run-dir", str(tmp_path / "runs"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    clip, tokenizer, info = load_clip(tmp_path / "clip_judge.safetensors")
    assert info["seed"] == 1 and info["steps"] == 3
    conditioning, cond_tokenizer, _ = load_clip(ROOT / "checkpoints" / "clip_emoji.safetensors")
    assert tokenizer.to_json() == cond_tokenizer.to_json()          # the same tokens, read by different weights
    assert any(not a.equal(b) for a, b in zip(clip.state_dict().values(), conditioning.state_dict().values()))
    card = (tmp_path / "clip_judge.md").read_text()
    assert "| real held-out emoji |" in card and "| the tiny SD's images for the same captions |" in card
    for who in ("judge", "conditioning"):
        for what in ("real", "generated"):
            assert f"{who:12s} on {what:9s}: top-1" in run.stdout


def test_the_conditioning_clips_seed_and_bad_sizes_are_refused():
    run = run_script("--seed", "0")
    assert run.returncode != 0 and "clip_emoji's own seed" in run.stderr
    run = run_script("--n-eval", "1")
    assert run.returncode != 0 and "--n-eval must be from 2 to 398" in run.stderr
