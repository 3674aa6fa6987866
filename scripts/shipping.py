"""What the scripts that train, measure and ship a model share (train_tiny_sd3.py, train_lcm_lora.py,
train_controlnet.py): their common flags, the rule that a finished model is not replaced silently, and writing the
record and the card."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import checkpoint as ckpt  # noqa: E402


def add_arguments(p: argparse.ArgumentParser, *, steps: int, run_dir: str, record: str | None,
                  record_help: str | None = None) -> None:
    """The flags every shipping script takes, with its own defaults for the steps, run folder and record."""
    p.add_argument("--steps", type=int, default=steps, help="total training steps (--max-minutes may stop first)")
    p.add_argument("--max-minutes", type=float, default=None, help="this run's training time; run again to go on")
    p.add_argument("--measure-only", action="store_true", help="measure the existing file; no training")
    p.add_argument("--replace", action="store_true", help="train on and replace an existing model file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=398, help="held-out captions measured (the first n)")
    p.add_argument("--train-images", type=int, default=None, help="the first k training emoji (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "checkpoints"))
    p.add_argument("--run-dir", default=run_dir)
    p.add_argument("--record", default=record, help=record_help)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the code path")


def refuse_to_replace(out: Path, replace: bool) -> None:
    """Stop before training when the model file exists and --replace was not given."""
    if out.exists() and not replace:
        raise SystemExit(f"{out} exists: a finished model is not replaced silently. Pass --replace to train on and "
                         f"replace it, or --measure-only to measure it again.")


def write_record_and_card(record_path: Path, card_path: Path, record: dict, card: str) -> None:
    ckpt.write_text_atomic(record_path, json.dumps(record, indent=1))
    ckpt.write_text_atomic(card_path, card)
    print(f"wrote {record_path} and the card {card_path}", flush=True)
