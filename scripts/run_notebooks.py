"""Execute notebooks top to bottom in a fresh kernel and store their outputs.

    python scripts/run_notebooks.py                       # every notebook, full mode, outputs saved
    python scripts/run_notebooks.py notebooks/02_*.ipynb  # some notebooks
    python scripts/run_notebooks.py --quick --check       # quick mode, nothing saved: a timing run

Committed notebooks carry the outputs of a full-mode run made by this script. It drops the
widget state (large, and useless without a kernel) and prints each notebook's run time and size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def run(path: Path, quick: bool, save: bool, timeout: int) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ["COURSE_QUICK"] = "1" if quick else "0"
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    if save:
        nbformat.write(nb, path)
    size = len(nbformat.writes(nb).encode()) / 1e6
    print(f"{path.name}: {'quick' if quick else 'full'} mode, {seconds:.1f} s, {size:.2f} MB{'' if save else ' (not saved)'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--quick", action="store_true", help="run in quick mode (implies --check)")
    ap.add_argument("--check", action="store_true", help="run without saving outputs")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = ap.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        run(path, quick=args.quick, save=not (args.check or args.quick), timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
