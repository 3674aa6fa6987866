"""Add a SHA-256 checksum to safetensors files written before the course's files carried one.

    python scripts/add_checksum.py checkpoints/my_model.safetensors [more files ...]

course_lib refuses to read a file without a checksum (course_lib.checkpoint). Run this only on files you trust:
it reads each file unverified, then rewrites it atomically with the same tensors and metadata plus the checksum,
and reads it back verified. A file that already has a checksum is verified and left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors import safe_open  # noqa: E402

from course_lib import checkpoint as ckpt  # noqa: E402


def add_checksum(path: Path) -> str:
    tensors, metadata = ckpt.read(path, verify=False)      # a file that is not safetensors is refused here, by name
    with safe_open(str(path), framework="pt") as f:         # read() drops the key: look for it in the raw metadata
        had = ckpt.CHECKSUM_KEY in (f.metadata() or {})
    if had:
        ckpt.read(path)                                     # verify it; raises if damaged
        return "already had a checksum, verified"
    ckpt.atomic_save(tensors, path, metadata)               # writes, reads back and verifies before the rename
    return "checksum added"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    for path in p.parse_args().files:
        print(f"{path}: {add_checksum(path)}")


if __name__ == "__main__":
    main()
