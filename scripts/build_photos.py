"""Rebuild data/photos/ from public-domain photographs shipped inside scikit-image's wheel.

    python scripts/build_photos.py                 # downloads the pinned wheel with pip
    python scripts/build_photos.py --wheel FILE    # uses a wheel you already have

Each photo is centre-cropped to a square and resized to 256 px (PNG).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

WHEEL = "scikit-image==0.26.0"
SIZE = 256
PHOTOS = {  # file in skimage/data -> (our name, provenance and licence as scikit-image documents it)
    "astronaut.png": ("astronaut", "Eileen Collins, NASA astronaut; NASA Great Images database. Public domain."),
    "chelsea.png": ("cat", "Chelsea the cat, by Stefan van der Walt. CC0 (public-domain dedication)."),
}
OUT = Path(__file__).resolve().parent.parent / "data" / "photos"


def square(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return im.convert("RGB").crop(box).resize((size, size), Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help=f"a {WHEEL} wheel file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--only-binary=:all:", "-d", tmp, WHEEL], check=True)
            wheel = next(Path(tmp).glob("scikit_image-*.whl"))
        OUT.mkdir(parents=True, exist_ok=True)
        lines = [f"Photographs for notebook 01, from the data folder of {WHEEL}, cropped and resized to {SIZE} px.", ""]
        with zipfile.ZipFile(wheel) as zf:
            for member, (name, credit) in PHOTOS.items():
                im = Image.open(io.BytesIO(zf.read(f"skimage/data/{member}")))
                square(im, SIZE).save(OUT / f"{name}.png", optimize=True)
                lines.append(f"- {name}.png: {credit}")
        (OUT / "SOURCES.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
