"""Account the activations of SD 1.5's LoRA step for the budget planner (course_lib.budget), on fake tensors.

    python scripts/budget_cache.py            # every size x checkpointing x attention kernel x batch 1 and 2
    python scripts/budget_cache.py --gpu T4   # (default) the GPU whose workspaces are counted

No GPU needed: each configuration is run under course_lib.memory.accounting (seconds to a minute each on a CPU).
Resumable: configurations already in results/budget_activations.json are kept; the file is rewritten atomically
after each one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib import budget  # noqa: E402
from course_lib.checkpoint import write_text_atomic  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="T4", choices=["T4", "H100"])
    parser.add_argument("--out", default=str(budget.CACHE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    if record and record.get("gpu") != args.gpu:
        raise SystemExit(f"{out} holds runs for the {record.get('gpu')}; use another --out for the {args.gpu}")
    record.update({"gpu": args.gpu, "preset": "sd15", "job": "LoRA rank 4, float16 base, AdamW, two steps",
                   "command": " ".join(["python", "scripts/budget_cache.py"] + sys.argv[1:]),
                   "machine": describe_machine(), "torch": torch.__version__})
    runs = record.setdefault("runs", {})
    for size in budget.SIZES:
        for checkpointing in (True, False):
            for attention in budget.ATTENTION:
                for batch in (1, 2):
                    key = budget.cache_key(size, checkpointing, attention, batch)
                    if key in runs:
                        continue
                    start = time.perf_counter()
                    runs[key] = budget.account_activations(size, checkpointing, attention, args.gpu, batch=batch)
                    runs[key]["seconds"] = round(time.perf_counter() - start, 1)
                    write_text_atomic(out, json.dumps(record, indent=1))
                    print(f"{key}: peak {runs[key]['peak'] / 2 ** 30:.3f} GiB, activations "
                          f"{runs[key]['activations'] / 2 ** 30:.3f} GiB ({runs[key]['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
