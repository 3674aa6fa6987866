"""Execute notebooks top to bottom in a fresh kernel and store their outputs.

    python scripts/run_notebooks.py                       # every notebook, full mode, outputs saved
    python scripts/run_notebooks.py notebooks/02_*.ipynb  # some notebooks
    python scripts/run_notebooks.py --quick --check       # quick mode, nothing saved: a timing run
    OMP_NUM_THREADS=1 python scripts/run_notebooks.py --quick --record results/notebook_times.json

Committed notebooks carry the outputs of a full-mode run made by this script. It drops the
widget state (large, and useless without a kernel), re-encodes the PNG outputs losslessly at PNG's best
compression (the pixels are unchanged; `--recompress` does only that to committed notebooks), and prints each
notebook's run time and size. `--palette` re-encodes a committed notebook's images in 256-colour palettes where
that saves a quarter or more (lossy, invisible for these figures), to keep the repository under its size limit.

A notebook's time is that of its cells: from the first cell's start to the last cell's reply, as
nbclient stamps them in each cell's metadata (the kernel's start-up is not counted). A committed
notebook carries these stamps, so its full-mode time can be read back from it; `--record FILE` also
stores the time, with the date, machine and thread count, under the notebook's name and mode in FILE
(a JSON file; other entries are kept). tests/test_notebook_hygiene.py compares each notebook's
'# Needs:' line with these times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from queue import Empty
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.util import ensure_async

ROOT = Path(__file__).resolve().parent.parent



class Client(NotebookClient):
    """nbclient's client, waiting for each cell's reply in one-second slices.

    A cell that shows ipywidgets sometimes never gets its reply: the kernel has finished and is idle, and the
    client waits on the shell channel forever (jupyter/nbclient#312, seen here in notebook 06's widget cell).
    Asking the channel again every second, until the cell's own timeout, picks the reply up."""

    async def async_start_new_kernel_client(self):
        client = await super().async_start_new_kernel_client()
        channel = client.shell_channel
        wait_for = channel.get_msg

        async def get_msg(timeout=None, **kwargs):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
                try:
                    return await ensure_async(wait_for(timeout=left, **kwargs))
                except Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise

        channel.get_msg = get_msg
        return client

def cells_seconds(nb) -> float:
    """Seconds from the first code cell's start to the last one's reply, as nbclient stamps them in the cells."""
    stamps = [c.metadata.get("execution", {}) for c in nb.cells if c.cell_type == "code"]
    if not stamps or not all("iopub.execute_input" in s and "shell.execute_reply" in s for s in stamps):
        raise ValueError("not every code cell carries nbclient's timing metadata: run the notebook with this script")
    parse = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (parse(stamps[-1]["shell.execute_reply"]) - parse(stamps[0]["iopub.execute_input"])).total_seconds()


def record(file: Path, name: str, mode: str, seconds: float, wall_seconds: float) -> None:
    """Store one run's time under file[name][mode], keeping every other entry."""
    import torch
    from course_lib.settings import describe_machine

    times = json.loads(file.read_text()) if file.exists() else {}
    times.setdefault(name, {})[mode] = {
        "mode": mode,
        "seconds": round(seconds, 1),              # the cells, as cells_seconds counts them
        "wall_seconds": round(wall_seconds, 1),    # with the kernel's start-up
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "threads": torch.get_num_threads(),
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")


def reencode_images(nb, encode, keep) -> int:
    """Replace each image/png output by encode(PIL image) (PNG bytes) when keep(new size, old size); bytes saved."""
    import base64
    import io

    from PIL import Image

    saved = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            raw = base64.b64decode(data["image/png"])
            new = encode(Image.open(io.BytesIO(raw)))
            if new is not None and keep(len(new), len(raw)):
                saved += len(raw) - len(new)
                data["image/png"] = base64.b64encode(new).decode()
    return saved


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def recompress_images(nb) -> int:
    """Re-encode every image/png output with PNG's optimiser (lossless: the same pixels); returns bytes saved."""
    return reencode_images(nb, _png, lambda new, old: new < old)


def palette_images(nb, min_saving: float = 0.25) -> int:
    """Re-encode image/png outputs in an adaptive 256-colour palette where that makes them at least `min_saving`
    smaller (lossy, like the model cards' sample grids; a figure of emoji tiles and text changes invisibly);
    returns bytes saved."""
    from PIL import Image

    def encode(image):
        if image.mode == "P":
            return None
        return _png(image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT))

    return reencode_images(nb, encode, lambda new, old: new <= (1 - min_saving) * old)


def run(path: Path, quick: bool, save: bool, timeout: int, record_to: Path | None = None,
        verbose: bool = False) -> None:
    nb = nbformat.read(path, as_version=4)
    mode = "quick" if quick else "full"
    os.environ["COURSE_QUICK"] = "1" if quick else "0"
    start = time.perf_counter()
    hooks = {}
    if verbose:   # one line per cell as it starts and ends, to see where a long run is (or where it hangs)
        hooks = dict(on_cell_start=lambda cell, cell_index: print(f"  cell {cell_index} started", file=sys.stderr,
                                                                     flush=True),
                     on_cell_executed=lambda cell, cell_index, execute_reply: print(
                         f"  cell {cell_index} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True))
    Client(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   **hooks).execute()
    wall_seconds = time.perf_counter() - start
    seconds = cells_seconds(nb)
    nb.metadata.pop("widgets", None)
    recompress_images(nb)
    if save:
        nbformat.write(nb, path)
    if record_to is not None:
        record(record_to, path.name, mode, seconds, wall_seconds)
    size = len(nbformat.writes(nb).encode()) / 1e6
    print(f"{path.name}: {mode} mode, {seconds:.1f} s ({wall_seconds:.1f} s with the kernel's start), "
          f"{size:.2f} MB{'' if save else ' (not saved)'}{f'; recorded in {record_to}' if record_to else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--quick", action="store_true", help="run in quick mode (implies --check)")
    ap.add_argument("--check", action="store_true", help="run without saving outputs")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    ap.add_argument("--record", type=Path, metavar="FILE",
                    help="store each notebook's time, date, machine and threads in this JSON file "
                         "(e.g. results/notebook_times.json), keeping its other entries")
    ap.add_argument("--recompress", action="store_true",
                    help="only re-encode the stored PNG outputs losslessly (nothing is run)")
    ap.add_argument("--verbose", action="store_true", help="print each cell's start and end on stderr")
    ap.add_argument("--palette", action="store_true",
                    help="only re-encode the stored PNG outputs in a 256-colour palette where that saves a quarter "
                         "or more (lossy; nothing is run): keeps the repository small")
    args = ap.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.palette or args.recompress:   # re-encode the stored images only; nothing is run
        reencode, what = ((palette_images, "saved by 256-colour palettes") if args.palette else
                          (recompress_images, "of PNG saved, pixels unchanged"))
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            saved = reencode(nb)
            nbformat.write(nb, path)
            print(f"{path.name}: {saved / 1e3:.1f} kB {what}")
        return
    for path in paths:
        run(path, quick=args.quick, save=not (args.check or args.quick), timeout=args.timeout, record_to=args.record,
            verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
