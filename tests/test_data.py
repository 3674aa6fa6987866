"""The shipped data: emoji splits, captions, resizing, Twemoji, photos, and range conversion."""

import json
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from course_lib import data


@pytest.fixture(scope="module")
def splits():
    """The Noto emoji at 32 px for every split (the atlas is decoded once and cached)."""
    return {split: data.load_emoji(32, split) for split in data.SPLITS}


@pytest.fixture(scope="module")
def metadata_rows():
    """metadata.json read directly (not through course_lib): one dict per Noto image."""
    meta = json.loads((data.data_dir() / "emoji" / "metadata.json").read_text())
    return [dict(zip(meta["fields"], row)) for row in meta["rows"]]


# --- shapes, ranges, captions -------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_emoji_shapes_and_range(splits, split):
    es = splits[split]
    N = len(es)
    assert es.images.shape == (N, 3, 32, 32)
    assert es.images.dtype == torch.float32
    assert es.images.min().item() >= -1 and es.images.max().item() <= 1
    assert es.images.max().item() == 1.0  # white background: 255 -> exactly 1
    assert es.images.min().item() < -0.9  # some near-black pixels survive 2x2 averaging
    assert len(es.captions) == len(es.labels) == len(es.unified) == len(es.subcategories) == N
    assert es.labels.dtype == torch.long
    assert 0 <= es.labels.min() and es.labels.max() < len(es.categories)
    for caption in es.captions:
        assert isinstance(caption, str) and caption and caption == caption.lower()


def test_split_sizes(splits):
    n_train, n_held, n_all = (len(splits[s]) for s in ("train", "heldout", "all"))
    assert n_train + n_held == n_all
    assert 3600 <= n_all <= 4000
    assert 0.07 <= n_held / n_all <= 0.13  # about one in ten held out
    # No image is on both sides.
    assert not set(splits["train"].unified) & set(splits["heldout"].unified)


def test_split_keeps_metadata_groups_together(metadata_rows):
    # The "group" field is the base emoji every skin-tone variant shares.
    sides = defaultdict(set)
    for row in metadata_rows:
        sides[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in sides.values())


def test_skin_tone_variants_share_their_base_emoji_split(splits):
    # Independent of the metadata's group field: strip the skin-tone modifiers (U+1F3FB..U+1F3FF)
    # and variation selector (U+FE0F) from each code sequence to find its base emoji.
    def base(unified: str) -> str:
        return re.sub(r"-(1F3F[B-F]|FE0F)", "", unified)

    side = {u: "train" for u in splits["train"].unified} | {u: "heldout" for u in splits["heldout"].unified}
    groups = defaultdict(set)
    for u, s in side.items():
        groups[base(u)].add(s)
    toned = [u for u in side if re.search(r"-1F3F[B-F]", u)]
    assert len(toned) > 1000  # the check below is not vacuous
    assert all(len(groups[base(u)]) == 1 for u in toned)


def test_known_captions(splits):
    everything = splits["all"]
    assert everything.captions[0] == "grinning face"
    assert splits["train"].captions[0] == "grinning face"
    tones = ("light", "medium-light", "medium", "medium-dark", "dark")
    for unified, caption in zip(everything.unified, everything.captions):
        modifiers = re.findall(r"-(1F3F[B-F])", unified)
        if len(modifiers) == 1:
            # e.g. 1F44B-1F3FF "waving hand sign: dark skin tone"
            tone = tones[int(modifiers[0], 16) - 0x1F3FB]
            assert caption.endswith(f": {tone} skin tone"), (unified, caption)
    index = everything.unified.index("1F44B-1F3FF")
    assert everything.captions[index].endswith(": dark skin tone")


# --- resizing ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noto64():
    return data.load_emoji(64, "all")


def test_size_64_is_the_atlas_tiles(noto64):
    # Cut the tiles out of the PNG here, independently of course_lib's reshaping.
    sheet = np.asarray(Image.open(data.data_dir() / "emoji" / "noto_64.png").convert("RGB"))
    N = len(noto64)
    for i in [0, 1, 63, 64, 65, N // 2, N - 1]:
        r, c = divmod(i, 64)  # 64 tiles per atlas row
        tile = torch.from_numpy(sheet[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].copy())
        expected = tile.permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(noto64.images[i], expected, rtol=0, atol=0)


def test_size_32_is_2x2_average_pooling(noto64, splits):
    pooled = F.avg_pool2d(noto64.images, 2)
    # Area averaging and 2x2 pooling are the same arithmetic up to float32 rounding order.
    torch.testing.assert_close(splits["all"].images, pooled, rtol=0, atol=1e-6)


def test_limit_keeps_the_first_images(splits):
    few = data.load_emoji(8, "train", limit=5)
    assert few.images.shape == (5, 3, 8, 8)
    assert few.captions == splits["train"].captions[:5]


# --- Twemoji --------------------------------------------------------------------------------

def test_twemoji_style(noto64):
    tw = data.load_emoji(32, "all", style="twemoji")
    assert len(tw) > 3000
    assert tw.style == "twemoji" and tw.images.shape == (len(tw), 3, 32, 32)
    assert set(tw.unified) <= set(noto64.unified)
    # Same emoji, same caption, different artwork.
    first = noto64.unified.index(tw.unified[0])
    assert tw.captions[0] == noto64.captions[first]
    assert not torch.equal(tw.images[0], data.resize(noto64.images[first:first + 1], 32)[0])
    # Twemoji ships at 32 px (a quarter of the bytes); larger is refused by name, smaller is area-averaged from it
    with pytest.raises(ValueError, match=r"size must be an int from 1 to 32 \(the shipped twemoji tiles are 32 px\)"):
        data.load_emoji(64, style="twemoji")
    assert data.load_emoji(16, "all", style="twemoji", limit=3).images.shape == (3, 3, 16, 16)


# --- bad input ------------------------------------------------------------------------------

def test_unknown_style_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        data.load_emoji(32, "train", style="apple")
    assert "noto" in str(info.value) and "twemoji" in str(info.value)


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        data.load_emoji(32, "test")
    for split in ("train", "heldout", "all"):
        assert split in str(info.value)


def test_check_choice_is_public_and_names_every_valid_choice():
    data.check_choice("split", "train", data.SPLITS)                  # a valid choice passes silently
    with pytest.raises(ValueError, match=r"unknown split 'test'; choose from \['train', 'heldout', 'all'\]"):
        data.check_choice("split", "test", data.SPLITS)
    assert data.check_choice.__doc__ and not hasattr(data, "_check_choice")


@pytest.mark.parametrize("size", [0, 65, 32.0, -1])
def test_bad_size_names_range(size):
    with pytest.raises(ValueError, match="1 to 64"):
        data.load_emoji(size, "train")


def test_unknown_photo_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        data.load_photo("dog")
    assert "astronaut" in str(info.value) and "cat" in str(info.value)


@pytest.mark.parametrize("name", data.PHOTOS)
@pytest.mark.parametrize("size", [64, 256])
def test_load_photo(name, size):
    x = data.load_photo(name, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert -1 <= x.min().item() < x.max().item() <= 1


# --- range conversion -----------------------------------------------------------------------

def test_uint8_round_trip_is_exact():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    u8[0, 0, 0] = [0, 128, 255]  # the extremes and the middle for sure
    x = data.to_model_range(u8)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    back = data.to_uint8(x)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, u8)
    # A single (3, H, W) image converts too, and out-of-range values are clipped.
    np.testing.assert_array_equal(data.to_uint8(torch.full((3, 2, 2), 5.0)), np.full((2, 2, 3), 255, np.uint8))


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.float32),   # float 0..1 images
                                 np.zeros((8, 8, 3), np.uint8),         # no batch axis
                                 np.zeros((2, 3, 8, 8), np.uint8)])     # channels first
def test_to_model_range_rejects_what_it_would_silently_mangle(bad):
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        data.to_model_range(bad)


def test_missing_data_folder_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="COURSE_DATA"):
        data.data_dir()
