"""Notebook 12's comparison of personalisation methods over more held-out subjects, for the README.

    python scripts/bench_personalisation.py                  # all 29 held-out subjects (minutes per subject on a CPU)
    python scripts/bench_personalisation.py --subjects 4     # the first 4, as notebook 12 on a CPU

Every method (DreamBooth, LoRA-DreamBooth, LiDB, the hypernetwork alone and with fast fine-tuning, textual
inversion) gets one image per subject (the default tone) and is asked for the five other tones; see
course_lib.benchmark.compare_personalisation. File: what a method adds to the base model, as float16
safetensors. Prints the table and writes it to results/personalisation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import dreambooth as db  # noqa: E402
from course_lib import hyperdreambooth as hd  # noqa: E402
from course_lib.benchmark import (PERSONALISATION_METHODS, RECORD_PATH, compare_personalisation,  # noqa: E402
                                  shipped_identity, summarise)
from course_lib.checkpoint import shipped, write_text_atomic  # noqa: E402
from course_lib.pipeline import TextToImage  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402


def table(summary: dict, numbers: dict) -> str:
    lines = [f"{'method':>32} {'numbers trained':>16} {'file (KB)':>10} {'time (s)':>9} {'subject fidelity':>17} "
             f"{'CLIP score':>11} {'tone accuracy':>14}"]
    for m in PERSONALISATION_METHODS:
        r = summary[m]
        lines.append(f"{m:>32} {numbers[m]:>16,} {r['bytes'] / 1000:>10,.1f} {r['seconds']:>9.2f} "
                     f"{r['subject']:>17.3f} {r['prompt']:>11.3f} {r['tone']:>14.2f}")
    for m in ("base model, class prompt", "real images"):
        r = summary[m]
        lines.append(f"{m:>32} {'':>16} {'':>10} {'':>9} {r['subject']:>17.3f} {r['prompt']:>11.3f} "
                     f"{r['tone']:>14.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=29)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RECORD_PATH))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TextToImage.from_shipped(device=args.device)
    hyper, cfg, seed, _ = hd.load_hypernetwork(shipped("hyperdreambooth"), device=args.device)
    subjects = db.emoji_subjects("heldout")[:args.subjects]
    records, numbers, _ = compare_personalisation(base, hyper, cfg, seed, subjects, seeds=args.seeds,
                                                  report=lambda m: print(m, flush=True))
    summary = summarise(records)
    text = table(summary, numbers)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps({"command": " ".join(["python", "scripts/bench_personalisation.py"] + sys.argv[1:]),
                                       "machine": describe_machine(), "subjects": [s.name for s in subjects],
                                       "models": shipped_identity(), "numbers": numbers, "summary": summary,
                                       "records": records, "table": text}, indent=1) + "\n")


if __name__ == "__main__":
    main()
