"""The course on a GPU in one prepared call: memory measured, the shipped stack trained, every notebook's GPU path run.

    python scripts/gpu_check.py --out-dir $OUT        # on a CUDA GPU: everything, within --budget seconds
    python scripts/gpu_check.py --device cpu --tiny --out-dir /tmp/g    # the same code path on a CPU (nothing measured)

Five steps in this order, each a separate process with its own time limit inside one overall budget (default 530 s,
inside a 10-minute device call), so a step that fails or runs out of time is recorded and the next still runs:

    memory      scripts/measure_memory.py: peak GPU memory of the full-mode steps of notebooks 04-17, in fp32 and
                under the autocast a T4 gets (fp16) and bf16; each row beside what the accounting without a GPU
                (course_lib.memory, results/memory_accounted_h100*.json) gives for it, and their ratio
    sd15        scripts/measure_sd15_memory.py: SD 1.5 at 512 x 512 with SD-shaped random weights, the same way
    train       scripts/gpu_train.py: the shipped stack trained on from its weights for its share of the budget,
                bundled into two files beside the record (stack_a.tar, stack_b.tar)
    notebooks   every notebook in quick mode by scripts/run_notebooks_plain.py (no Jupyter there: the cells in a plain
                IPython shell, from wheels carried in .whl/): the GPU branches run once; seconds, pass / fail
    tests       the test files with CUDA-only tests (--tests), run by pytest on the GPU; its summary line

Everything goes into one file (--out-dir/gpu_check.json, or --out): the GPU's name, torch and CUDA versions, and per
step its command, status (ok, failed, timed out, skipped for the budget), seconds, the tail of its output and what it
measured. What a step cannot measure is not invented: it is listed under "not_covered".

The device call, prepared (the wheels: IPython and ipywidgets with what they import, pure Python, about 2.3 MB):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out-dir $OUT
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
STEPS = ("memory", "sd15", "train", "notebooks", "tests")            # the order they run in
CAPS = {"memory": 90, "sd15": 75, "train": 200, "notebooks": 240, "tests": 60}   # each step's most seconds
CUDA_TESTS = ("tests/test_memory.py", "tests/test_sampling.py", "tests/test_train.py", "tests/test_settings.py")
ACCOUNTED = {"memory": ("results/memory_accounted_h100.json", "results/memory_accounted_h100_05_15.json",
                        "results/memory_accounted_h100_14.json"),
             "sd15": ("results/memory_sd15_accounted_h100.json",)}
NOT_COVERED = ["notebooks 01-03's memory (they train nothing; 03 prints the peak of its timed steps itself, "
               "in the notebooks step's quick run only), and notebook 19's own LoRA runs with 8-bit AdamW (not in "
               "measure_memory.py yet)",
               "the accounted figures of notebooks 16 and 17's rows (the accounting on fake tensors fails in torch's "
               "MemTracker: a KeyError in its post-backward hook); their measured peaks stand alone",
               "the HyperDreamBooth hypernetwork's own forward pass at SD 1.5's size (the course has none that size; "
               "measure_sd15_memory.py covers generation, the LoRA step, LoRA-DreamBooth's batch of two, "
               "HyperDreamBooth's rank-relaxed fast fine-tuning and a textual inversion step)"]


def beside_accounted(rows: list[dict] | None, files: tuple[str, ...]) -> list[dict] | None:
    """Each measured row with the accounted peak of the row of the same name (results/ files) and measured over
    accounted: how far the accounting without a GPU is from the GPU."""
    if rows is None:
        return None
    accounted = {}
    for name in files:
        path = ROOT / name
        if path.exists():
            accounted.update({r["name"]: r.get("peak_gib") for r in json.loads(path.read_text())["rows"]})
    out = []
    for row in rows:
        a, m = accounted.get(row.get("name")), row.get("peak_gib")
        out.append({**row, "accounted_gib": a, "measured_over_accounted": m / a if a and m is not None else None})
    return out


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


def step_env() -> dict:
    """The environment of every step's process: the course importable, a carried wheels' folder (PYTHONPATH) first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the code path only, with --tiny)")
    ap.add_argument("--budget", type=float, default=530, help="seconds for all steps together (default 530)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"which steps, comma-separated (default all: {', '.join(STEPS)})")
    ap.add_argument("--notebooks", nargs="*", type=Path, default=None, help="default: every notebooks/*.ipynb")
    ap.add_argument("--tests", nargs="*", default=list(CUDA_TESTS), help="the test files of the tests step")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes everywhere: the code path on a CPU, in minutes")
    ap.add_argument("--out-dir", type=Path, default=None, help="where gpu_check.json and the train step's bundles go "
                                                               "(default results/, the record named after the GPU)")
    ap.add_argument("--out", type=Path, default=None, help="the record's own path (overrides --out-dir's)")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; valid are {', '.join(STEPS)}")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device must be cuda, cuda:N or cpu; got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA GPU on this machine; to run the code path on a CPU (nothing is measured) use --device cpu "
                 "with --tiny")
    if args.device == "cpu" and not args.tiny and set(steps) & {"sd15", "train", "memory"}:
        ap.error("on a CPU the memory, sd15 and train steps run only with --tiny")

    facts = gpu_facts(args.device)
    out = args.out or (args.out_dir / "gpu_check.json" if args.out_dir else
                       ROOT / "results" / f"gpu_check_{slug(facts['gpu'])}.json")
    train_dir = args.out_dir or out.parent
    env = step_env()
    deadline = time.monotonic() + args.budget
    left = lambda step: min(deadline - time.monotonic(), CAPS[step])
    result = {**facts, "command": " ".join(["python", "scripts/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
              "budget_s": args.budget, "steps": {}, "not_covered": NOT_COVERED}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        if "memory" in steps:
            file = Path(tmp) / "memory.json"
            # on a CPU: one row's code path at --tiny sizes (tests/test_measure_memory_script.py runs the others)
            cpu = ["--tiny", "--only", "05"] if args.device == "cpu" else []
            r = run_step([py, "scripts/measure_memory.py", "--device", args.device, *cpu, "--json", str(file)],
                         left("memory"), env)
            rows = json.loads(file.read_text())["rows"] if file.exists() else None
            result["steps"]["memory"] = {**r, "rows": beside_accounted(rows, ACCOUNTED["memory"])}
        if "sd15" in steps:
            file = Path(tmp) / "sd15.json"
            command = [py, "scripts/measure_sd15_memory.py", "--preset", "tiny" if args.tiny else "sd15",
                       "--device", args.device, "--json", str(file)] + (["--steps", "2"] if args.tiny else [])
            r = run_step(command, left("sd15"), env)
            record = json.loads(file.read_text()) if file.exists() else None
            if record:
                record["rows"] = beside_accounted(record.get("rows"), ACCOUNTED["sd15"])
            result["steps"]["sd15"] = {**r, "record": record}
        if "train" in steps:
            budget = left("train")
            command = [py, "scripts/gpu_train.py", "--device", args.device, "--out", str(train_dir),
                       "--budget", f"{max(0.0, budget - 20):.0f}"] + (["--tiny"] if args.tiny else [])
            r = run_step(command, budget, env)
            file = train_dir / "gpu_train.json"
            result["steps"]["train"] = {**r, "record": json.loads(file.read_text()) if file.exists() else None}
        if "notebooks" in steps:
            notebooks = args.notebooks if args.notebooks is not None else sorted((ROOT / "notebooks").glob("*.ipynb"))
            rows = []
            for nb in notebooks:
                # at most half of what is left for one notebook, so one hang cannot take the whole budget
                budget = left("notebooks") if nb == notebooks[-1] else min(left("notebooks"),
                                                                          max(60.0, left("notebooks") / 2))
                file = Path(tmp) / "notebook.json"
                r = run_step([py, "scripts/run_notebooks_plain.py", "--timeout", f"{max(budget - 5, 1):.0f}",
                              "--json", str(file), str(nb)], budget, env)
                row = json.loads(file.read_text())[0] if file.exists() else {"notebook": Path(nb).name,
                                                                              "status": r["status"], "tail": r["tail"]}
                file.unlink(missing_ok=True)
                rows.append(row)
            result["steps"]["notebooks"] = {"status": "ok" if all(x["status"] == "ok" for x in rows) else "failed",
                                            "rows": rows}
        if "tests" in steps:
            r = run_step([py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
                          *args.tests], left("tests"), env)
            summary = [line for line in r["tail"].splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
            result["steps"]["tests"] = {**r, "summary": summary[-1] if summary else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, step in result["steps"].items():
        print(f"{name:10s} {step['status']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
