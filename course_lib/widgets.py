"""The logic behind the notebooks' sliders, as plain functions: parameters in, figures out.

Each `*_figure` function is what a widget redraws; it can be called and tested
without a browser. `live` wires core ipywidgets controls to such a function
(works with ipywidgets 7.7, as on Colab, and 8), drawing into an Output widget.
"""

from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from .data import to_uint8
from .forward import linear_mix, vp_mix
from .plotting import DPI, noising_strip, plot_schedules
from .schedules import KINDS, NoiseSchedule, make_schedule

BETA_KINDS = ("linear", "scaled_linear")  # the kinds a beta range applies to


# --- notebook 01: a slider over the noise level -------------------------------------------

def noise_level_figure(images: list[torch.Tensor], level: float, seed: int = 0) -> Figure:
    """Each image mixed with noise at `level` in [0, 1], by the seed's linear mix and by the
    variance-preserving mix (alpha-bar = 1 - level), with the measured std of each result."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1]; got {level}")
    fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.6), dpi=DPI, squeeze=False)
    gen = torch.Generator().manual_seed(seed)
    for j, x0 in enumerate(images):
        noise = torch.randn(x0.shape, generator=gen)
        for i, (name, x) in enumerate([("linear mix", linear_mix(x0, noise, level)),
                                       ("variance preserving", vp_mix(x0, noise, 1.0 - level))]):
            ax = axes[i, j]
            ax.imshow(to_uint8(x.clamp(-1, 1)), interpolation="nearest")
            ax.set_title(f"{name}\nstd {x.std().item():.2f}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"noise level {level:.2f}  (pure noise has std 1.00)", fontsize=10)
    fig.tight_layout()
    return fig


# --- notebook 02: the schedule explorer ---------------------------------------------------

def explorer_schedule(kind: str, T: int, beta_start: float, beta_end: float) -> NoiseSchedule:
    """The schedule the explorer's controls describe.

    The beta range applies to the linear kinds only; if the sliders cross, beta_end is raised
    to beta_start (a flat schedule) rather than raising an error mid-drag.
    """
    if kind in BETA_KINDS:
        return make_schedule(kind, T, beta_start=beta_start, beta_end=min(max(beta_end, beta_start), 0.999))
    return make_schedule(kind, T)


def schedule_explorer_figure(kind: str, T: int, beta_start: float, beta_end: float,
                             image: torch.Tensor, n_strip: int = 8, seed: int = 0) -> Figure:
    """Alpha-bar and SNR of the chosen schedule (the others faint, at the same T) and a strip of x_t."""
    chosen = explorer_schedule(kind, T, beta_start, beta_end)
    others = [make_schedule(k, T) for k in KINDS if k != kind]
    fig = plt.figure(figsize=(10, 6), dpi=DPI)
    grid = fig.add_gridspec(2, n_strip, height_ratios=[2, 1.2])
    curves = [fig.add_subplot(grid[0, : n_strip // 2]), fig.add_subplot(grid[0, n_strip // 2:])]
    plot_schedules(others + [chosen], axes=curves, highlight=chosen.name)
    curves[0].set_title(repr(chosen)[len("NoiseSchedule("):-1], fontsize=8)
    strip = [fig.add_subplot(grid[1, i]) for i in range(n_strip)]
    noising_strip(chosen, image, n=n_strip, seed=seed, axes=strip)
    fig.tight_layout()
    return fig


# --- wiring -----------------------------------------------------------------------------------

def live(render: Callable[..., Figure], controls: dict, columns: int = 4):
    """A box of `controls` above an Output that shows render(**values), redrawn on every change."""
    import ipywidgets as W
    from IPython.display import display

    def draw(**values):
        fig = render(**values)
        display(fig)
        plt.close(fig)

    out = W.interactive_output(draw, controls)
    items = list(controls.values())
    rows = [W.HBox(items[i:i + columns]) for i in range(0, len(items), columns)]
    return W.VBox(rows + [out])
