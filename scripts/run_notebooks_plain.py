"""Run notebooks' code cells top to bottom without Jupyter: for a machine that has no kernel (the GPU machine).

    python scripts/run_notebooks_plain.py notebooks/05_sampling.ipynb          # quick mode, as the suite runs it
    python scripts/run_notebooks_plain.py --json times.json notebooks/*.ipynb  # and a record of each notebook

scripts/run_notebooks.py needs a Jupyter kernel (nbclient, ipykernel). The GPU machine has none, and carrying one
(pyzmq, tornado, jupyter_client, ...) does not fit beside the repository. This runs the same cells in the same order
in a plain Python process per notebook, its working folder the notebook's own, COURSE_QUICK=1 unless --full:
    - in an IPython shell when IPython is importable (carried as wheels: scripts/gpu_check.py): display() and the
      widgets behave as in a kernel without a front end (ipywidgets' interact draws its picture once);
    - else with exec, display() printing what it is given; a cell that needs IPython or ipywidgets then fails by
      name, and the record says so.
Matplotlib draws to Agg; figures are closed after each cell. Nothing is written to the notebooks. Per notebook the
record holds the status (ok, failed at cell k, timed out), seconds, cells run, and the failure's traceback tail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_cells(path: Path) -> list[str]:
    """The sources of a notebook's code cells, in order (read as JSON: nbformat may be absent)."""
    nb = json.loads(Path(path).read_text())
    if "cells" not in nb:
        raise ValueError(f"{path} is not a notebook of nbformat 4 (no 'cells')")
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c.get("cell_type") == "code"]


def _executor():
    """(run(source) -> exception or None, name): IPython's shell where there is one, else exec."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        namespace = {"__name__": "__main__", "display": lambda *objs, **kw: print(*objs)}

        def run_exec(source: str):
            try:
                exec(compile(source, "<cell>", "exec"), namespace)
            except Exception as error:                        # noqa: BLE001  the record names it
                return error
            return None
        return run_exec, "exec"
    shell = InteractiveShell.instance()

    def run_ipython(source: str):
        result = shell.run_cell(source, store_history=False, silent=False)
        return result.error_before_exec or result.error_in_exec
    return run_ipython, "ipython"


def run_one(path: Path) -> dict:
    """Run one notebook's cells in this process (the child's side); its record."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = code_cells(path)
    os.chdir(Path(path).resolve().parent)
    sys.path.insert(0, str(ROOT))
    run, how = _executor()
    start = time.perf_counter()
    for k, source in enumerate(cells):
        error = run(source)
        plt.close("all")
        if error is not None:
            tail = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-3000:]
            return {"status": f"failed at code cell {k}", "runner": how, "cells_run": k + 1,
                    "seconds": round(time.perf_counter() - start, 1), "tail": tail}
    return {"status": "ok", "runner": how, "cells_run": len(cells), "seconds": round(time.perf_counter() - start, 1)}


def run_notebook(path: Path, timeout: float, full: bool = False, python: str = sys.executable) -> dict:
    """Run one notebook in a fresh process with a time limit; its record (wall seconds included)."""
    env = {**os.environ, "COURSE_QUICK": "0" if full else "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    try:
        done = subprocess.run([python, str(Path(__file__).resolve()), "--child", str(path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"notebook": Path(path).name, "status": f"timed out after {timeout:.0f} s",
                "wall_seconds": round(time.monotonic() - start, 1)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{\"status\"")]
    record = json.loads(lines[-1]) if lines else {
        "status": f"failed (exit {done.returncode})", "tail": (done.stdout + done.stderr)[-3000:]}
    return {"notebook": Path(path).name, **record, "wall_seconds": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--full", action="store_true", help="full mode (COURSE_QUICK=0); default quick")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per notebook (default 600)")
    ap.add_argument("--json", type=Path, default=None, help="write the records to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.notebooks[0])), flush=True)
        return []
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    rows = []
    for path in args.notebooks:
        rows.append(run_notebook(path, args.timeout, args.full))
        print(f"{rows[-1]['notebook']:40s} {rows[-1]['status']:28s} {rows[-1]['wall_seconds']:7.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
