"""Run a script of scripts/ in the test's own process, as `python scripts/<name>.py args...` would from the
repository root, and hand back what a subprocess would: the exit status, stdout and stderr.

A new interpreter costs seconds a run on the course's 2-core machine (Python, torch, torch's compiler module that
the first optimiser step imports, the emoji atlas), and the suite runs the scripts' quick modes dozens of times.
Tests that check what a script prints, writes and refuses call it here; what needs a process of its own (kill -9,
torchrun, a fresh interpreter's imports) stays a subprocess. The script's module is loaded fresh each call; the
working folder, sys.argv, sys.path and torch's thread count are put back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str | os.PathLike, *args: str, cwd: str | os.PathLike = ROOT) -> subprocess.CompletedProcess:
    """`script`: a file name in scripts/ or a path. Exit status 0 when main() returns None or 0, main()'s int
    otherwise, SystemExit's code (argparse's refusals: 2, message on stderr), 1 with the traceback on stderr when it
    raises."""
    path = Path(script) if Path(script).is_absolute() else ROOT / "scripts" / script
    spec = importlib.util.spec_from_file_location(f"scriptrun_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, list(sys.path), os.getcwd(), torch.get_num_threads()
    code = 0
    try:
        sys.argv = [str(path), *map(str, args)]
        sys.path.insert(0, str(path.parent))                # as the interpreter does for a script
        os.chdir(cwd)
        sys.modules[spec.name] = module                     # dataclasses look their module up by name
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                spec.loader.exec_module(module)
                result = module.main()
                code = result if isinstance(result, int) else 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:                              # noqa: BLE001 (a crashed script: status 1, its traceback)
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.chdir(saved[2])
        torch.set_num_threads(saved[3])
        sys.modules.pop(spec.name, None)
    return subprocess.CompletedProcess([sys.executable, str(path), *map(str, args)], code, out.getvalue(),
                                       err.getvalue())
