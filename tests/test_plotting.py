"""show_rows: labelled rows of images, drawn headlessly (the Agg backend, set in conftest.py)."""

import matplotlib.pyplot as plt
import pytest
import torch

from course_lib.plotting import show_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n, size=8, seed=0):
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_one_axis_per_image_with_labels_and_titles():
    fig = show_rows([images(4), images(4, seed=1), images(4, seed=2)], ["real", "DDPM", "DDIM\neta = 0"],
                    col_titles=[f"seed {k}" for k in range(4)], title="three rows")
    axes = fig.axes
    assert len(axes) == 12
    assert [ax.get_ylabel() for ax in axes[::4]] == ["real", "DDPM", "DDIM\neta = 0"]
    assert [ax.get_ylabel() for ax in axes if ax not in axes[::4]] == [""] * 9
    assert [ax.get_title() for ax in axes[:4]] == ["seed 0", "seed 1", "seed 2", "seed 3"]
    assert [ax.get_title() for ax in axes[4:]] == [""] * 8
    assert fig._suptitle.get_text() == "three rows"
    assert all(len(ax.images) == 1 for ax in axes)


def test_pixels_are_clamped_and_shown_as_uint8():
    row = torch.full((2, 3, 4, 4), 5.0)
    row[1] = -7.0
    fig = show_rows([row], ["out of range"])
    shown = [ax.images[0].get_array() for ax in fig.axes]
    assert shown[0].dtype.name == "uint8" and shown[0].shape == (4, 4, 3)
    assert shown[0].min() == 255 and shown[1].max() == 0


def test_without_titles_and_a_bigger_size():
    small = show_rows([images(3)], ["a"])
    big = show_rows([images(3)], ["a"], size=1.6)
    assert small._suptitle is None and all(ax.get_title() == "" for ax in small.axes)
    assert big.get_size_inches()[0] > small.get_size_inches()[0]
    assert big.get_size_inches()[1] == pytest.approx(2 * small.get_size_inches()[1])


def test_accepts_any_sequence_and_any_float_dtype():
    fig = show_rows((images(2).bfloat16(), images(2)), (f"row {i}" for i in range(2)), col_titles=("x", "y"))
    assert len(fig.axes) == 4


def test_rows_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match=r"same number of images.*\[3, 2\]"):
        show_rows([images(3), images(2)], ["a", "b"])


def test_label_count_must_match_rows():
    with pytest.raises(ValueError, match="one label per row: 2 rows, got 3 labels"):
        show_rows([images(2), images(2)], ["a", "b", "c"])
    with pytest.raises(ValueError, match="one label per row: 2 rows, got 1 labels"):
        show_rows([images(2), images(2)], ["a"])


def test_col_titles_count_must_match_columns():
    with pytest.raises(ValueError, match="one title per column: 2 columns, got 3 titles"):
        show_rows([images(2)], ["a"], col_titles=["x", "y", "z"])


@pytest.mark.parametrize("rows, match", [([], "rows is empty"),
                                         ([images(0)], "at least one"),
                                         ([images(2)[0]], r"\(B, C, H, W\).*x\[None\]"),
                                         ([images(2).numpy()], "must be a torch.Tensor")])
def test_bad_rows_are_named(rows, match):
    with pytest.raises((ValueError, TypeError), match=match):
        show_rows(rows, ["a"] * len(rows))


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="must be positive; got 0"):
        show_rows([images(2)], ["a"], size=0)


def test_save_grid_png_writes_a_small_palette_grid(tmp_path):
    from PIL import Image

    from course_lib.plotting import save_grid_png

    images = torch.rand(32, 3, 8, 8) * 2 - 1
    save_grid_png(images, tmp_path / "g.png", columns=16)
    picture = Image.open(tmp_path / "g.png")
    assert picture.size == (16 * 8, 2 * 8) and picture.mode == "P"
    with pytest.raises(ValueError, match="multiple of columns=16"):
        save_grid_png(images[:20], tmp_path / "h.png", columns=16)
