"""The course on a GPU in one run: every notebook in quick mode, the CUDA tests, and the peak-memory scripts.

    python scripts/gpu_check.py                     # on a CUDA GPU: everything, within --budget seconds
    python scripts/gpu_check.py --device cpu --notebooks notebooks/01_noise_addition.ipynb --sd-preset tiny
                                                    # the same code path on a CPU, in seconds (nothing measured)

Four steps, each a separate process with its own time limit inside one overall budget (default 540 s, inside a
10-minute device call), so a step that fails or runs out of time is recorded and the next still runs:

    notebooks   each notebook in quick mode (scripts/run_notebooks.py --quick): the GPU branches of every
                notebook run once, catching device and dtype bugs; seconds and pass / fail per notebook
    tests       the test files with CUDA-only tests (--tests), run by pytest on the GPU; its summary line
    memory      scripts/measure_memory.py: peak GPU memory of the full-mode steps of notebooks 04-13, 15 and 18 (18: sd15)
    sd15        scripts/measure_sd15_memory.py: SD 1.5 at 512 x 512 with SD-shaped random weights

Everything goes into one file named after the GPU (default results/gpu_check_<gpu>.json): the GPU's name, torch
and CUDA versions, and per step its command, status (ok, failed, timed out, skipped for the budget), seconds, the
tail of its output and what it measured (the memory scripts' rows). What a step cannot yet measure is not
invented: the hypernetwork's forward pass at SD 1.5's size is not in the memory scripts, and the file says so
under "not_covered".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("notebooks", "tests", "memory", "sd15")
CUDA_TESTS = ("tests/test_memory.py", "tests/test_sampling.py", "tests/test_train.py", "tests/test_settings.py")
NOT_COVERED = ["notebooks 01-03's memory (they train nothing; 03 prints the peak of its timed steps itself, "
               "in the notebooks step's quick run only)",
               "the HyperDreamBooth hypernetwork's own forward pass at SD 1.5's size (the course has none that size; "
               "measure_sd15_memory.py covers generation, the LoRA step, LoRA-DreamBooth's batch of two, "
               "HyperDreamBooth's rank-relaxed fast fine-tuning and a textual inversion step)"]


def gpu_facts(device: str) -> dict:
    """The machine's GPU name, torch and CUDA versions (name 'cpu' where there is no GPU)."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None}


def slug(name: str) -> str:
    """A file-name form of a GPU's name: 'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def run_step(command: list[str], timeout: float, env: dict) -> dict:
    """Run one command; its status, seconds and the last 2,000 characters of its output."""
    if timeout < 5:
        return {"command": " ".join(command), "status": "skipped: the budget was spent", "seconds": 0.0, "tail": ""}
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, output = ("ok" if done.returncode == 0 else f"failed (exit {done.returncode})"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as stop:
        status = f"timed out after {timeout:.0f} s"
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (stop.stdout, stop.stderr))
    return {"command": " ".join(command), "status": status, "seconds": round(time.monotonic() - start, 1),
            "tail": output[-2000:]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the code path only)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps together (default 540)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"which steps, comma-separated (default all: {', '.join(STEPS)})")
    ap.add_argument("--notebooks", nargs="*", type=Path, default=None, help="default: every notebooks/*.ipynb")
    ap.add_argument("--tests", nargs="*", default=list(CUDA_TESTS), help="the test files of the tests step")
    ap.add_argument("--sd-preset", default="sd15", choices=("sd15", "tiny"), help="sizes of the sd15 step")
    ap.add_argument("--out", type=Path, default=None, help="default results/gpu_check_<gpu>.json")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; valid are {', '.join(STEPS)}")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device must be cuda, cuda:N or cpu; got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA GPU on this machine; to run the code path on a CPU (nothing is measured) use --device cpu "
                 "with --sd-preset tiny")
    if args.device == "cpu" and "sd15" in steps and args.sd_preset != "tiny":
        ap.error("on a CPU the sd15 step runs only with --sd-preset tiny")

    facts = gpu_facts(args.device)
    out = args.out or ROOT / "results" / f"gpu_check_{slug(facts['gpu'])}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    deadline = time.monotonic() + args.budget
    left = lambda: deadline - time.monotonic()
    result = {**facts, "command": " ".join(["python", "scripts/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
              "budget_s": args.budget, "steps": {}, "not_covered": NOT_COVERED}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        if "notebooks" in steps:
            notebooks = args.notebooks if args.notebooks is not None else sorted((ROOT / "notebooks").glob("*.ipynb"))
            record = Path(tmp) / "times.json"
            rows = []
            for nb in notebooks:
                # at most half of what is left for one notebook, so one hang cannot take the whole budget
                r = run_step([py, "scripts/run_notebooks.py", "--quick", "--record", str(record), str(nb)],
                             min(left(), max(60.0, left() / 2)), env)
                times = json.loads(record.read_text()) if record.exists() else {}
                rows.append({"notebook": Path(nb).name, "status": r["status"], "wall_seconds": r["seconds"],
                             "cells_seconds": times.get(Path(nb).name, {}).get("quick", {}).get("seconds"),
                             **({} if r["status"] == "ok" else {"tail": r["tail"]})})
            result["steps"]["notebooks"] = {"status": "ok" if all(x["status"] == "ok" for x in rows) else "failed",
                                            "rows": rows}
        if "tests" in steps:
            r = run_step([py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args.tests], left(), env)
            summary = [line for line in r["tail"].splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
            result["steps"]["tests"] = {**r, "summary": summary[-1] if summary else None}
        if "memory" in steps:
            file = Path(tmp) / "memory.json"
            # on a CPU: one row's code path at --tiny sizes (tests/test_measure_memory_script.py runs the others)
            cpu = ["--tiny", "--only", "05"] if args.device == "cpu" else []
            r = run_step([py, "scripts/measure_memory.py", "--device", args.device, *cpu, "--json", str(file)],
                         left(), env)
            result["steps"]["memory"] = {**r, "rows": json.loads(file.read_text())["rows"] if file.exists() else None}
        if "sd15" in steps:
            file = Path(tmp) / "sd15.json"
            command = [py, "scripts/measure_sd15_memory.py", "--preset", args.sd_preset, "--device", args.device,
                       "--json", str(file)] + (["--steps", "2"] if args.sd_preset == "tiny" else [])
            r = run_step(command, left(), env)
            result["steps"]["sd15"] = {**r, "record": json.loads(file.read_text()) if file.exists() else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, step in result["steps"].items():
        print(f"{name:10s} {step['status']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
