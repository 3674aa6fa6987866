"""Plotting helpers for the notebooks: image grids, labelled rows of images, strips of x_t over t, schedule curves.

Each function returns a matplotlib Figure (or an array) and never calls plt.show(),
so it works inline in a notebook, inside an ipywidgets Output, or headless in a test.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .data import to_uint8
from .forward import check_images, q_sample
from .schedules import NoiseSchedule

DPI = 80  # stored notebook outputs stay small


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> one (rows*H, nrow*W, 3) uint8 array, white between tiles."""
    check_images(images, "images", data_range=False)
    N, C, H, W = images.shape  # batch, channels, height, width
    nrow = max(1, min(nrow, N))
    rows = -(-N // nrow)
    tiles = to_uint8(images)
    grid = np.full((rows * (H + pad) - pad, nrow * (W + pad) - pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = tile
    return grid


def show_images(images: torch.Tensor, nrow: int = 8, titles: list[str] | None = None,
                title: str | None = None, tile_inches: float = 1.0) -> Figure:
    """A figure of images in a grid, one axis per image so each can have a title."""
    if images.ndim == 3:
        images = images[None]
    N = images.shape[0]
    nrow = max(1, min(nrow, N))
    rows = -(-N // nrow)
    height = tile_inches * rows * (1.25 if titles else 1) + (0.4 if title else 0)
    fig, axes = plt.subplots(rows, nrow, figsize=(tile_inches * nrow, height), dpi=DPI, squeeze=False)
    pixels = to_uint8(images)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < N:
            ax.imshow(pixels[i], interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], col_titles: Sequence[str] | None = None,
              title: str | None = None, size: float = 0.8) -> Figure:
    """Rows of images with a label left of each row, optional titles over the columns and one over the figure.

    rows         one (N, 3, H, W) tensor in [-1, 1] per row (clamped for display), the same N in every row
    labels       one label per row ("\\n" starts a new line)
    col_titles   N titles over the first row's images, or None
    size         each image's width and height in inches
    """
    rows, labels = list(rows), [str(label) for label in labels]
    if not rows:
        raise ValueError("rows is empty; give one (N, 3, H, W) image tensor per row")
    for i, row in enumerate(rows):
        check_images(row, f"rows[{i}]", data_range=False)
    lengths = [len(row) for row in rows]
    n = lengths[0]
    if n == 0 or any(k != n for k in lengths):
        raise ValueError(f"every row must hold the same number of images (at least one); got {lengths} images "
                         f"in the {len(rows)} rows")
    if len(labels) != len(rows):
        raise ValueError(f"labels must give one label per row: {len(rows)} rows, got {len(labels)} labels")
    if col_titles is not None and len(col_titles) != n:
        raise ValueError(f"col_titles must give one title per column: {n} columns, got {len(col_titles)} titles")
    if not size > 0:
        raise ValueError(f"size is each image's width in inches and must be positive; got {size}")
    longest = max(len(line) for label in labels for line in label.split("\n"))
    label_inches = min(3.0, max(1.2, 0.5 + 0.06 * longest))          # room for the row labels at fontsize 7
    title_lines = max(str(t).count("\n") + 1 for t in col_titles) if col_titles else 0
    height = size * len(rows) + 0.35 * bool(title) + 0.2 * title_lines
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n + label_inches, height), dpi=DPI, squeeze=False)
    for i, (row, label) in enumerate(zip(rows, labels)):
        for j, (ax, pixels) in enumerate(zip(axes[i], to_uint8(row.clamp(-1, 1)))):
            ax.imshow(pixels, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])                       # not axis("off"): it would hide the label
            for side in ax.spines.values():
                side.set_visible(False)
            if i == 0 and col_titles:
                ax.set_title(str(col_titles[j]), fontsize=7)
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig


def strip_timesteps(T: int, n: int = 8) -> list[int]:
    """n timesteps spread evenly over 0 .. T-1, first and last included (fewer if T < n)."""
    return sorted({round(i * (T - 1) / max(n - 1, 1)) for i in range(n)})


def noising_strip(schedule: NoiseSchedule, x0: torch.Tensor, n: int = 8, seed: int = 0,
                  axes=None, label: str | None = None) -> Figure:
    """x_t ~ q(x_t | x_0) at n timesteps, one noise draw for all, titled with t and alpha-bar."""
    if x0.ndim == 3:
        x0 = x0[None]
    ts = strip_timesteps(schedule.T, n)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    frames = torch.cat([q_sample(schedule, x0, t, noise=noise) for t in ts])
    if axes is None:
        fig, axes = plt.subplots(1, len(ts), figsize=(1.2 * len(ts), 1.5), dpi=DPI)
    fig = axes[0].figure
    for ax, t, img in zip(axes, ts, to_uint8(frames)):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"t={t}\nabar={schedule.alphas_cumprod[t].item():.2f}", fontsize=7)
        ax.axis("off")
    if label:
        axes[0].text(-0.1, 0.5, label, transform=axes[0].transAxes, ha="right", va="center", fontsize=8)
    return fig


def plot_schedules(schedules: list[NoiseSchedule], axes=None, highlight: str | None = None) -> Figure:
    """alpha-bar and SNR (dB) against t/T for several schedules, side by side."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=DPI)
    fig = axes[0].figure
    for s in schedules:
        frac = (np.arange(s.T) + 1) / s.T
        style = dict(lw=2.5) if highlight is None or s.name == highlight else dict(lw=1, alpha=0.4)
        axes[0].plot(frac, s.alphas_cumprod.numpy(), label=s.name, **style)
        axes[1].plot(frac, 10 * np.log10(s.snr.numpy()), label=s.name, **style)
    axes[0].set(xlabel="t / T", ylabel="alpha-bar (signal power)", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="t / T", ylabel="SNR (dB)")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array (to compare pictures in tests)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_loss_curve(losses: list[float], window: int = 50, title: str | None = None,
                    ax=None) -> Figure:
    """Training loss per step (faint) and its running mean over `window` steps, log scale."""
    fig = ax.figure if ax is not None else plt.figure(figsize=(6, 3), dpi=DPI)
    ax = ax or fig.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=float)
    if len(values):
        kernel = np.ones(min(window, len(values))) / min(window, len(values))
        running = np.convolve(values, kernel, mode="valid")
        ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=0.8, label="per step")
        ax.plot(steps[len(values) - len(running):], running, color="tab:blue", lw=2,
                label=f"mean of {len(kernel)} steps")
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_grid_png(images: torch.Tensor, path, columns: int = 16) -> None:
    """Images (N, 3, H, W) in [-1, 1] as a PNG grid of `columns` per row (N a multiple of it), in a 256-colour
    palette (a third of the size of full colour for emoji, and the repository stays small): model cards' pictures."""
    from PIL import Image

    if len(images) == 0 or len(images) % columns:
        raise ValueError(f"need a positive multiple of columns={columns} images; got {len(images)}")
    grid = to_uint8(images)                                                   # (N, H, W, 3) uint8
    rows = [np.concatenate(list(grid[r * columns:(r + 1) * columns]), axis=1) for r in range(len(grid) // columns)]
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# --- notebook 14: SD 3's timestep shift -------------------------------------------------

def time_shift_figure(shift: float, steps: int = 10, reference: Sequence[float] = (1.0, 3.0),
                      draws: int = 20_000, seed: int = 0) -> Figure:
    r"""SD 3's timestep shift t' = s t / (1 + (s - 1) t) (course_lib.schedules.time_shift) at s = `shift`, with the
    `reference` shifts faint, in three panels: the shifted time against the even one, with the `steps` times an
    Euler sampler visits (FlowSchedule(shift=s).grid) as dots; the log signal-to-noise ratio of the straight path,
    log SNR = 2 log((1 - t') / t'), which the shift lowers by 2 log s at every t; and the density of the training
    times SD 3 draws (logit-normal, then shifted; `draws` of them). Lines and dots are labelled "s=<shift>" (the
    grid: "grid s=<shift>") and carry the plotted numbers, for tests."""
    from .checks import check_int
    from .schedules import FlowSchedule, check_shift, time_shift

    shift = check_shift(shift)
    steps = check_int("steps", steps, 1, 1000)
    shifts = [check_shift(r) for r in reference if check_shift(r) != shift] + [shift]
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    inner = t[1:-1]                                                  # log SNR is infinite at the ends
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.0), dpi=DPI)
    for s in shifts:
        chosen = s == shift
        style = dict(lw=2.0 if chosen else 1.0, alpha=1.0 if chosen else 0.45, label=f"s={s:g}",
                     color="tab:red" if chosen else None)
        axes[0].plot(t, time_shift(t, s), **style)
        shifted = time_shift(inner, s)
        axes[1].plot(inner, 2 * torch.log((1 - shifted) / shifted), **style)
        times = FlowSchedule("logit_normal", shift=s).draw_times(draws, torch.Generator().manual_seed(seed))
        axes[2].hist(times.numpy(), bins=40, range=(0, 1), density=True, histtype="step", **style)
    grid = FlowSchedule(shift=shift).grid(steps)
    even = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    axes[0].scatter(even, grid, s=14, color="tab:red", zorder=3, label=f"grid s={shift:g}")
    axes[0].set_xlabel("t, even steps (1: noise, 0: data)"), axes[0].set_ylabel("t' visited")
    axes[0].set_title(f"{steps} Euler steps at s={shift:g}", fontsize=9)
    axes[1].set_xlabel("t, even steps"), axes[1].set_ylabel("log SNR at t'")
    axes[1].set_title(f"log SNR lowered by 2 ln s = {2 * torch.log(torch.tensor(shift)).item():.2f}", fontsize=9)
    axes[2].set_xlabel("training time t' (logit-normal, shifted)"), axes[2].set_ylabel("density")
    axes[2].set_title(f"middle draw t = 0.5 becomes t' = {time_shift(0.5, shift):.2f}", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
