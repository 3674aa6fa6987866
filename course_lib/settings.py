"""Run modes and devices: the one place the course reads its environment, and `timed`, which times a call on it.

Full mode is the default: the sizes a learner on an 8 GB GPU gets, with real
results in minutes. Quick mode runs the same code with tiny sizes and a handful
of steps, so the whole course runs on a 2-core CPU (the test suite sets it):

    COURSE_QUICK=1 jupyter lab       # the test suite sets it itself (conftest.py)

In code, pick a size per mode with `choose(full=..., quick=...)`.

COURSE_CACHE names the folder where course_lib.metrics keeps the emoji's features between processes (default
$XDG_CACHE_HOME/sd-from-scratch, else ~/.cache/sd-from-scratch; COURSE_CACHE=off: none).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

QUICK_ENV = "COURSE_QUICK"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

T = TypeVar("T")


def quick_mode() -> bool:
    """True when the environment variable COURSE_QUICK asks for quick mode."""
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{QUICK_ENV}={value!r} is not understood; use one of {sorted(_TRUE | _FALSE - {''})}")


def choose(full: T, quick: T) -> T:
    """The full-mode value, or the quick-mode one when quick mode is on."""
    return quick if quick_mode() else full


def mode_name() -> str:
    return "quick" if quick_mode() else "full"


def cache_dir() -> Path | None:
    """The folder named by COURSE_CACHE, else $XDG_CACHE_HOME/sd-from-scratch (~/.cache/...); None for "off"."""
    where = os.environ.get("COURSE_CACHE", "").strip()
    if where.lower() == "off":
        return None
    return Path(where) if where else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd-from-scratch"


def default_device() -> torch.device:
    """The first CUDA GPU if there is one, else the CPU (never hard-code `.cuda()`)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def describe_machine(device: torch.device | str | None = None, *, detail: bool = False) -> str:
    """One line naming what runs the code, for reports and model cards: the GPU's name, or the CPU model
    and torch's thread count. `device`: the one the work runs on (default: `default_device()`).

    detail=True, for benchmark tables: "GPU <name> (compute capability 9.0, 80 GiB)" or "CPU <model>", then
    torch's version, its thread count and the logical CPUs visible, e.g.
    "CPU Intel(R) Xeon(R) Processor; torch 2.13.0+cpu; 1 thread(s); 2 logical CPUs visible"."""
    device = default_device() if device is None else torch.device(device)
    threads = torch.get_num_threads()
    if not detail:
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        return f"{cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device)
        what = f"GPU {gpu.name} (compute capability {gpu.major}.{gpu.minor}, {gpu.total_memory / 2**30:.0f} GiB)"
    else:
        what = f"CPU {cpu_name()}"
    return f"{what}; torch {torch.__version__}; {threads} thread(s); {os.cpu_count()} logical CPUs visible"


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn()'s result and the wall-clock seconds it took. Once CUDA is in use it waits for the GPU before starting
    and before stopping the clock, since GPU work runs asynchronously and would otherwise go uncounted."""
    if not callable(fn):
        raise TypeError(f"timed takes a function of no arguments (e.g. lambda: model(x)); got {type(fn).__name__}")
    _synchronize()
    start = time.perf_counter()
    result = fn()
    _synchronize()
    return result, time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_initialized():          # CUDA in use (never initialises it just to time a CPU call)
        torch.cuda.synchronize()
