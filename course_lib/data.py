"""The course's data, loaded offline: emoji (Noto and Twemoji) and two photographs.

Images come back as float32 tensors of shape (N, 3, H, W) with values in [-1, 1],
the range diffusion models work in. The shipped files are 64 px; smaller sizes
are made here by area averaging (each output pixel is the mean of the input
pixels it covers).

    >>> from course_lib.data import load_emoji
    >>> emoji = load_emoji(size=32, split="train")
    >>> emoji.images.shape, emoji.captions[0]
    (torch.Size([3388, 3, 32, 32]), 'grinning face')

The split is fixed: about one emoji in ten is held out, chosen by a hash of the
base emoji, so all skin-tone variants of an emoji fall on the same side.

`check_choice(name, value, valid)` refuses an option that is not one of its valid
choices, naming them all; the loaders here and course_lib.metrics use it.

Data sources (see data/emoji/LICENSES.md):
  [1] Noto Color Emoji, Google, Apache-2.0, via npm emoji-datasource-google 16.0.0
  [2] Twemoji, Twitter/X, CC-BY-4.0, via npm emoji-datasource-twitter 16.0.0
  [3] Photographs from scikit-image's data folder (public domain / CC0), data/photos/SOURCES.md
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checks import check_choice, check_int  # noqa: F401  (check_choice: long imported from here)

DATA_ENV = "COURSE_DATA"
STYLES = ("noto", "twemoji")
TONES = ("", "light", "medium-light", "medium", "medium-dark", "dark")   # skin-tone modifiers; "" = the default yellow
SPLITS = ("train", "heldout", "all")
PHOTOS = ("astronaut", "cat")
MAX_EMOJI_SIZE = 64


def data_dir() -> Path:
    """The folder holding emoji/ and photos/: $COURSE_DATA, else the repository's data/."""
    path = Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parent.parent / "data")
    if not (path / "emoji" / "metadata.json").exists():
        raise FileNotFoundError(
            f"course data not found in {path}. Install the course from its repository "
            f"(pip install -e .) or set {DATA_ENV} to the repository's data/ folder.")
    return path


@dataclass
class EmojiSet:
    """Images with their captions and labels, all indexed alike."""
    images: torch.Tensor        # (N, 3, H, W) float32 in [-1, 1]
    captions: list[str]         # lower-case Unicode names, e.g. "waving hand: dark skin tone"
    labels: torch.Tensor        # (N,) int64 index into `categories`
    categories: list[str]       # the category names, e.g. "Smileys & Emotion"
    subcategories: list[str]    # per image, e.g. "face-smiling"
    unified: list[str]          # per image, the code points, e.g. "1F44B-1F3FF"
    style: str
    split: str

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        N, C, H, W = self.images.shape
        return (f"EmojiSet(style={self.style!r}, split={self.split!r}, images=({N}, {C}, {H}, {W}), "
                f"{len(self.categories)} categories)")


@lru_cache(maxsize=1)
def _metadata() -> dict:
    meta = json.loads((data_dir() / "emoji" / "metadata.json").read_text())
    meta["rows"] = [dict(zip(meta["fields"], row)) for row in meta["rows"]]
    return meta


def tile_size(style: str) -> int:
    """The size the style's images ship at: Noto 64 px, Twemoji 32 px (the largest load_emoji gives for it)."""
    meta = _metadata()
    return meta["tile"] if style == "noto" else meta.get("twemoji_tile", meta["tile"])


@lru_cache(maxsize=2)
def _atlas(style: str) -> np.ndarray:
    """All tiles of one style as (N, tile, tile, 3) uint8 (Noto 64 px, Twemoji 32 px), decoded once per process."""
    meta = _metadata()
    tile, cols = tile_size(style), meta["columns"]
    n = meta["count"] if style == "noto" else meta["twemoji_count"]
    sheet = np.asarray(Image.open(data_dir() / "emoji" / f"{style}_{tile}.png").convert("RGB"))
    rows = sheet.shape[0] // tile
    tiles = sheet.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile, tile, 3)
    return tiles[:n]


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) in 0..255 -> float32 (N, 3, H, W) in [-1, 1]."""
    array = images_uint8.numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3); got dtype {array.dtype}, shape {array.shape}")
    x = torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images (N, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (..., H, W, 3), clipped."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average (N, 3, H, W) images down to (N, 3, size, size)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


def load_emoji(size: int = 32, split: str = "train", style: str = "noto",
               limit: int | None = None) -> EmojiSet:
    """Load the emoji of one style and split at `size` px (Noto 1..64, Twemoji 1..32) as tensors in [-1, 1].

    style "noto": every Noto Color Emoji image (3,786 with skin tones).
    style "twemoji": the Twemoji image of the same emoji, where one exists.
    limit: keep only the first `limit` images (the order is fixed), e.g. for quick mode.
    """
    check_choice("style", style, STYLES)
    check_choice("split", split, SPLITS)
    size = check_int("size", size, 1, tile_size(style), hint=f" (the shipped {style} tiles are {tile_size(style)} px)")
    meta = _metadata()
    key = "twemoji" if style == "twemoji" else None
    rows = [(i if key is None else r[key], r) for i, r in enumerate(meta["rows"])
            if (split == "all" or r["split"] == split) and (key is None or r[key] is not None)]
    if limit is not None:
        rows = rows[:limit]
    tiles = _atlas(style)[[i for i, _ in rows]]
    images = resize(to_model_range(tiles), size)
    categories = sorted({r["category"] for r in meta["rows"]})
    return EmojiSet(
        images=images,
        captions=[r["caption"] for _, r in rows],
        labels=torch.tensor([categories.index(r["category"]) for _, r in rows], dtype=torch.long),
        categories=categories,
        subcategories=[r["subcategory"] for _, r in rows],
        unified=[r["unified"] for _, r in rows],
        style=style,
        split=split,
    )


def load_photo(name: str = "astronaut", size: int = 128) -> torch.Tensor:
    """A public-domain photograph as a (3, size, size) float32 tensor in [-1, 1]."""
    check_choice("photo", name, PHOTOS)
    size = check_int("size", size, 1, 256, hint=" (the shipped photos are 256 px)")
    im = np.asarray(Image.open(data_dir() / "photos" / f"{name}.png").convert("RGB"))
    return resize(to_model_range(im[None]), size)[0]
