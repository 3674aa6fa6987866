"""How long loading the emoji takes, cold (first call in a process) and warm.

    python scripts/bench_data_load.py

Each row runs in a fresh Python process so the cold time includes decoding the PNG atlas.
The reference row is the bare PNG decode (Pillow), the floor any loader of these files pays.
The target is under 2 s cold for any size.
"""

from __future__ import annotations

import subprocess
import sys

CASES = [
    ("reference: decode noto_64.png only", "from PIL import Image; import numpy as np; "
     "from course_lib.data import data_dir; t=time.perf_counter(); "
     "np.asarray(Image.open(data_dir() / 'emoji' / 'noto_64.png').convert('RGB')); cold=time.perf_counter()-t; warm=float('nan')"),
]
for size in (64, 32, 16):
    for style, split in (("noto", "train"), ("noto", "all")) + ((("twemoji", "all"),) if size <= 32 else ()):
        CASES.append((f"load_emoji(size={size}, split={split!r}, style={style!r})",
                      f"from course_lib.data import load_emoji; t=time.perf_counter(); "
                      f"load_emoji({size}, {split!r}, {style!r}); cold=time.perf_counter()-t; "
                      f"t=time.perf_counter(); load_emoji({size}, {split!r}, {style!r}); warm=time.perf_counter()-t"))


def main() -> None:
    print(f"{'case':56s} {'cold (s)':>9s} {'warm (s)':>9s}")
    for name, code in CASES:
        out = subprocess.run([sys.executable, "-c", f"import time, torch\n{code}\nprint(cold, warm)"],
                             capture_output=True, text=True, check=True).stdout.split()
        warm = float(out[1])
        print(f"{name:56s} {float(out[0]):9.2f} {'-' if warm != warm else f'{warm:.2f}':>9s}")


if __name__ == "__main__":
    main()
