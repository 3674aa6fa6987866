"""Rebuild data/emoji/ from the pinned npm packages of emoji-datasource.

    python scripts/build_emoji_data.py              # fetches the packages with `npm pack`
    python scripts/build_emoji_data.py --from DIR   # uses DIR/emoji-datasource-*-16.0.0.tgz

What it writes (64 px tiles, Twemoji's 32 px, RGB composited on white, in one fixed order):
    noto_64.png        every emoji that has a Google (Noto Color Emoji) image, skin tones included
    twemoji_32.png     the Twemoji image of the same emoji, for those that have one, area-averaged to 32 px
    metadata.json      per emoji: code points, caption (lower-case Unicode name, with
                       ": medium skin tone" etc. for variants), category, subcategory,
                       the group its skin-tone variants share, train/held-out split,
                       and its tile in the Twemoji atlas (or null)

The tarballs are checked against pinned SHA-1 sums, so a rebuild reads the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = "16.0.0"
PACKAGES = {  # npm package -> SHA-1 of its tarball at VERSION
    "emoji-datasource-google": "a80ac3e8106cbd4d8648ce758aa099e8827b6157",
    "emoji-datasource-twitter": "e2bd39a8acb77e158106f8249dd7b4cd93fa1b14",
}
TILE = 64      # pixels per side, as shipped by the packages
COLUMNS = 64   # tiles per atlas row
HELD_OUT_EVERY = 10  # about 1 group in 10 goes to the held-out split

SKIN_TONES = {  # Fitzpatrick modifiers, with their CLDR names
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

OUT = Path(__file__).resolve().parent.parent / "data" / "emoji"


def fetch(package: str, source: Path | None, workdir: Path) -> tarfile.TarFile:
    """The package tarball, from `source` if given, else from `npm pack`; checked by SHA-1."""
    name = f"{package}-{VERSION}.tgz"
    if source is None:
        subprocess.run(["npm", "pack", f"{package}@{VERSION}", "--pack-destination", str(workdir)],
                       check=True, stdout=subprocess.DEVNULL)
        path = workdir / name
    else:
        path = source / name
    blob = path.read_bytes()
    digest = hashlib.sha1(blob).hexdigest()
    if digest != PACKAGES[package]:
        raise SystemExit(f"{path}: SHA-1 {digest}, expected {PACKAGES[package]} for {package}@{VERSION}")
    return tarfile.open(fileobj=io.BytesIO(blob))


def on_white(png: bytes) -> np.ndarray:
    """Composite an RGBA tile on white; returns (TILE, TILE, 3) uint8."""
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    if im.size != (TILE, TILE):
        im = im.resize((TILE, TILE), Image.LANCZOS)
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, im).convert("RGB"))


def held_out(group: str) -> bool:
    """Fixed split: hash the group (base emoji), so skin-tone variants never straddle it."""
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def entries(emoji_json: list[dict]) -> list[dict]:
    """One row per image with a Google version: base emoji then its skin-tone variants."""
    rows = []
    for e in sorted(emoji_json, key=lambda e: e["sort_order"]):
        base = e["name"].lower()
        variants = [(e, base)]
        for tones, v in sorted((e.get("skin_variations") or {}).items()):
            names = ", ".join(SKIN_TONES[t] for t in tones.split("-"))
            variants.append((v, f"{base}: {names}"))
        for v, caption in variants:
            if not v["has_img_google"]:
                continue
            rows.append(dict(
                unified=v["unified"], caption=caption, category=e["category"],
                subcategory=e["subcategory"], group=e["unified"], image=v["image"],
                has_twemoji=bool(v["has_img_twitter"]),
            ))
    return rows


TWEMOJI_TILE = 32   # Twemoji ships at 32 px (the course trains on it at 32 px at most): a quarter of the bytes


def halve(tile: np.ndarray) -> np.ndarray:
    """A (2n, 2n, 3) uint8 tile area-averaged to (n, n, 3), rounded: what load_emoji(size=n) computes from it."""
    t = tile.astype(np.float64)
    return np.round((t[0::2, 0::2] + t[1::2, 0::2] + t[0::2, 1::2] + t[1::2, 1::2]) / 4).astype(np.uint8)


def atlas(tiles: list[np.ndarray], tile_size: int = TILE) -> Image.Image:
    rows = -(-len(tiles) // COLUMNS)
    sheet = np.full((rows * tile_size, COLUMNS * tile_size, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, COLUMNS)
        sheet[r * tile_size:(r + 1) * tile_size, c * tile_size:(c + 1) * tile_size] = tile
    return Image.fromarray(sheet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", type=Path, help="folder holding the two .tgz files")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        google = fetch("emoji-datasource-google", args.source, Path(tmp))
        twitter = fetch("emoji-datasource-twitter", args.source, Path(tmp))
        emoji_json = json.load(google.extractfile("package/emoji.json"))
        rows = entries(emoji_json)

        noto, twemoji = [], []
        for row in rows:
            noto.append(on_white(google.extractfile(f"package/img/google/64/{row['image']}").read()))
            row["twemoji"] = None
            if row.pop("has_twemoji"):
                member = f"package/img/twitter/64/{row['image']}"
                try:
                    twemoji.append(on_white(twitter.extractfile(member).read()))
                    row["twemoji"] = len(twemoji) - 1
                except KeyError:
                    pass
            row.pop("image")
            row["split"] = "heldout" if held_out(row["group"]) else "train"

    OUT.mkdir(parents=True, exist_ok=True)
    atlas(noto).save(OUT / "noto_64.png", optimize=True)
    atlas([halve(t) for t in twemoji], TWEMOJI_TILE).save(OUT / f"twemoji_{TWEMOJI_TILE}.png", optimize=True)
    meta = dict(
        source={p: f"{VERSION} (sha1 {s})" for p, s in PACKAGES.items()},
        tile=TILE, twemoji_tile=TWEMOJI_TILE, columns=COLUMNS, count=len(rows), twemoji_count=len(twemoji),
        fields=list(rows[0].keys()),
        rows=[list(r.values()) for r in rows],
    )
    (OUT / "metadata.json").write_text(json.dumps(meta, separators=(",", ":"), ensure_ascii=False) + "\n")
    n_held = sum(r["split"] == "heldout" for r in rows)
    sizes = {p.name: p.stat().st_size for p in sorted(OUT.glob("*")) if p.is_file()}
    print(f"{len(rows)} Noto images ({n_held} held out), {len(twemoji)} Twemoji images")
    for name, size in sizes.items():
        print(f"  {name:16s} {size / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
