"""The logic behind the notebooks' sliders, as plain functions: parameters in, figures out.

Each `*_figure` function is what a widget redraws; it can be called and tested
without a browser. `live` wires core ipywidgets controls to such a function
(works with ipywidgets 7.7, as on Colab, and 8), drawing into an Output widget.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from .checks import check_choice, check_int
from .data import to_uint8
from .forward import linear_mix, vp_mix
from .plotting import DPI, noising_strip, plot_schedules, time_shift_figure  # noqa: F401 (notebook 14's slider)
from .sampling import ReverseStep
from .schedules import KINDS, NoiseSchedule, make_schedule

BETA_KINDS = ("linear", "scaled_linear")  # the kinds a beta range applies to


# --- notebook 01: a slider over the noise level -------------------------------------------

def noise_level_figure(images: list[torch.Tensor], level: float, seed: int = 0) -> Figure:
    """Each image mixed with noise at `level` in [0, 1], by the linear mix and by the
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


# --- notebook 05: the reverse-process scrubber ------------------------------------------------

def reverse_process_figure(trajectory: Sequence[ReverseStep], index: int, schedule: NoiseSchedule,
                           n_images: int = 4) -> Figure:
    """The reverse process at step `index` of a recorded `course_lib.sampling.reverse_process` run:
    x_t (top row) and the model's x_0 estimate there (bottom row) for the first n_images images, and
    where the step lies on the alpha-bar curve of the run (right)."""
    trajectory = list(trajectory)
    if not trajectory or not all(isinstance(s, ReverseStep) for s in trajectory):
        raise TypeError("trajectory must be a non-empty list of ReverseStep, e.g. "
                        "list(course_lib.sampling.reverse_process(model, schedule, shape, ...))")
    check_int("index", index, 0, len(trajectory) - 1, hint=" (the recorded steps)")
    step = trajectory[index]
    n = max(1, min(n_images, step.x_t.shape[0]))
    alpha_bar = [1.0 if s.t < 0 else schedule.alphas_cumprod[s.t].item() for s in trajectory]

    fig = plt.figure(figsize=(1.5 * n + 3.2, 3.4), dpi=DPI)
    grid = fig.add_gridspec(2, n + 1, width_ratios=[1] * n + [2.2])
    for row, (name, images) in enumerate([("x_t", step.x_t), ("predicted x_0", step.x0_hat)]):
        for j, pixels in enumerate(to_uint8(images[:n])):
            ax = fig.add_subplot(grid[row, j])
            ax.imshow(pixels, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    curve = fig.add_subplot(grid[:, n])
    curve.plot(range(len(trajectory)), alpha_bar, color="0.5", lw=1.5, marker=".", ms=3)
    curve.plot([index], [alpha_bar[index]], "o", color="tab:red", ms=7)
    curve.set(xlabel="sampling step", ylabel="alpha-bar (signal power)", ylim=(-0.03, 1.05))
    curve.grid(alpha=0.3)
    where = "the result" if step.t < 0 else f"t = {step.t}"
    fig.suptitle(f"step {index} of {len(trajectory) - 1}: {where}, alpha-bar = {alpha_bar[index]:.4f}", fontsize=10)
    fig.tight_layout()
    return fig


# --- notebook 06: interpolating in the VAE's latent space --------------------------------------

def latent_interpolation_figure(vae, scale_factor: float, image_a: torch.Tensor, image_b: torch.Tensor,
                                alpha: float, steps: int = 7) -> Figure:
    """Two ways from image_a to image_b, each (3, H, W) in [-1, 1], at `steps` evenly spaced weights t
    from 0 to 1, and at t = alpha in a framed column on the right:
        top row     the pixel cross-fade (1 - t) a + t b
        bottom row  the decoded interpolation of the scaled latents (posterior means):
                    decode_latents((1 - t) z_a + t z_b) with z = encode_latents(image) (course_lib.vae)
    Every image axis has a label ("pixel 0", ..., "latent 0", ..., "pixel alpha", "latent alpha") and
    shows a uint8 (H, W, 3) array, so tests can read the pictures back."""
    from .vae import decode_latents, encode_latents  # imported here: the other widgets do not need the VAE

    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (0 is image_a, 1 is image_b); got {alpha!r}")
    check_int("steps", steps, 2, hint=" (the two end points)")
    for name, image in (("image_a", image_a), ("image_b", image_b)):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{name} must be one image, a (3, H, W) tensor in [-1, 1]; got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if image_a.shape != image_b.shape:
        raise ValueError(f"image_a and image_b must have the same shape; got {tuple(image_a.shape)} "
                         f"and {tuple(image_b.shape)}")
    weights = torch.linspace(0, 1, steps).tolist() + [float(alpha)]
    t = torch.tensor(weights)[:, None, None, None]                       # (steps + 1, 1, 1, 1)
    a, b = image_a.detach().float().cpu(), image_b.detach().float().cpu()
    pixel_rows = (1 - t) * a + t * b
    z = encode_latents(vae, torch.stack([a, b]), scale_factor)           # (2, C, h, w), scaled
    latent_rows = decode_latents(vae, (1 - t) * z[0] + t * z[1], scale_factor)

    fig = plt.figure(figsize=(0.95 * (steps + 1) + 1.6, 2.6), dpi=DPI)
    grid = fig.add_gridspec(2, steps + 2, width_ratios=[1] * steps + [0.25, 1])
    for row, (name, images) in enumerate([("pixel", pixel_rows), ("latent", latent_rows)]):
        pictures = to_uint8(images)
        for j in range(steps + 1):
            last = j == steps
            ax = fig.add_subplot(grid[row, steps + 1 if last else j], label=f"{name} {'alpha' if last else j}")
            ax.imshow(pictures[j], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if last:
                for side in ax.spines.values():
                    side.set(color="tab:red", linewidth=2.5)
            else:
                for side in ax.spines.values():
                    side.set_visible(False)
            if row == 0:
                ax.set_title(f"alpha = {alpha:.2f}" if last else f"t = {weights[j]:.2f}", fontsize=8,
                             color="tab:red" if last else "black")
            if j == 0:
                ax.set_ylabel("pixel\ncross-fade" if name == "pixel" else "decoded latent\ninterpolation",
                              fontsize=8)
    fig.suptitle("from image A (left) to image B: mixing pixels (top) or mixing latents (bottom)", fontsize=9)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig


# --- notebook 08: prompt-to-image retrieval ----------------------------------------------------

def retrieval_figure(clip, tokenizer, images: torch.Tensor, captions: Sequence[str], prompt: str,
                     k: int = 8) -> Figure:
    """The k images that a mini CLIP (course_lib.text.MiniCLIP) ranks highest for a typed `prompt`, best
    first: the cosine similarity of each image's embedding with the prompt's (course_lib.text.similarity).
    Each is titled with its rank and score, with its own caption below (shown, never used for ranking).
    images: (N, 3, H, W) in [-1, 1]; captions: their N captions. Each image axis has the label "rank 1",
    "rank 2", ... and shows a uint8 (H, W, 3) array, so tests can read the pictures back."""
    import textwrap

    from .clip import similarity  # imported here: the other widgets do not need the text models

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (\"\" is the empty prompt); got {type(prompt).__name__}")
    check_int("k", k, 1, hint=" (how many images to show)")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) tensor in [-1, 1]; got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if len(captions) != len(images):
        raise ValueError(f"need one caption per image; got {len(images)} images and {len(captions)} captions")
    k = min(int(k), len(images))
    scores = similarity(clip, tokenizer, images, [prompt])[:, 0]           # (N,) cosine similarities
    best = scores.topk(k)
    pictures = to_uint8(images[best.indices])

    fig, axes = plt.subplots(1, k, figsize=(1.2 * k + 0.3, 2.5), dpi=DPI, squeeze=False)
    for rank, (ax, i, score) in enumerate(zip(axes[0], best.indices.tolist(), best.values.tolist()), start=1):
        ax.set_label(f"rank {rank}")
        ax.imshow(pictures[rank - 1], interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{rank}. score {score:.3f}", fontsize=7)
        lines = textwrap.wrap(captions[i], 17)
        ax.set_xlabel("\n".join(lines[:3]) + (" ..." if len(lines) > 3 else ""), fontsize=7)
    fig.suptitle(f"prompt {prompt!r}: the {k} best of {len(images)} images", fontsize=9)
    fig.tight_layout(w_pad=0.4)
    return fig


# --- notebook 09: the prompt box -----------------------------------------------------------

def _image_row(images: torch.Tensor, labels: Sequence[str], height: float, fontsize: float) -> Figure:
    """Images side by side, each axis labelled "image k" (tests read the uint8 (H, W, 3) pictures back) and captioned."""
    pictures, n = to_uint8(images), len(labels)
    fig, axes = plt.subplots(1, n, figsize=(1.3 * n + 0.2, height), dpi=DPI, squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.set_label(f"image {k}")
        ax.imshow(pictures[k], interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(labels[k], fontsize=fontsize)
    return fig


def text_to_image_figure(pipe, prompt: str, guidance_scale: float, seed: int, n: int = 4, steps: int = 20,
                         sampler: str = "ddim", negative_prompt: str = "", guidance_rescale: float = 0.0) -> Figure:
    """n images for `prompt` from a course_lib.pipeline.TextToImage, side by side, titled with the prompt,
    the guidance scale (and its rescale phi, when not 0) and the seed (image k starts from the noise of seed + k, as in the pipeline, so
    the same seed always gives the same images). Every image axis is labelled "image 0", "image 1", ...
    and shows a uint8 (H, W, 3) array, so tests can read the pictures back."""
    from .pipeline import check_seed     # the pipeline's own check: a TypeError for a seed that is not an int

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string (\"\" asks for no prompt at all); got {type(prompt).__name__}")
    check_seed(seed)
    check_int("n", n, 1, 16, hint=" (the images drawn side by side)")
    images = pipe(prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                  negative_prompt=negative_prompt, images_per_prompt=int(n), guidance_rescale=guidance_rescale)
    fig = _image_row(images, [f"seed {int(seed) + k}" for k in range(int(n))], height=1.85, fontsize=7)
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    negative = f", not {negative_prompt!r}" if negative_prompt else ""
    rescale = f" rescaled by phi {guidance_rescale:g}" if guidance_rescale else ""
    fig.suptitle(f"{shown!r}{negative}\nguidance scale {guidance_scale:g}{rescale}, seed {int(seed)}, {steps} {sampler} steps",
                 fontsize=9)
    fig.tight_layout(w_pad=0.3)
    return fig


# --- notebook 10: the LoRA-scale slider ---------------------------------------------------

def lora_scale_figure(pipe, prompts: Sequence[str], lora_scale: float, seed: int = 0, steps: int = 20,
                      guidance_scale: float = 3.0) -> Figure:
    """One image per prompt from a pipeline whose U-Net carries LoRA layers, with the update multiplied by
    `lora_scale` (0: the base model, 1: the adapted one; between blends, beyond extrapolates). Prompt k
    starts from the noise of seed + k at every scale, so only the adapter's strength changes between
    redraws. Axes are labelled "image 0", "image 1", ... and show uint8 (H, W, 3) arrays."""
    from .lora import lora_layers, lora_scale as scaled

    if not lora_layers(pipe.unet):
        raise ValueError("the pipeline's U-Net has no LoRA layers; load one with course_lib.lora.load_lora")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or len(prompts) > 16:
        raise ValueError(f"give 1 to 16 prompts; got {len(prompts)}")
    if not isinstance(lora_scale, numbers.Real) or not -4 <= lora_scale <= 4:
        raise ValueError(f"lora_scale must be a number from -4 to 4; got {lora_scale!r}")
    with scaled(pipe.unet, float(lora_scale)):
        images = pipe(list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale)
    fig = _image_row(images, [p if len(p) <= 22 else p[:20] + "..." for p in prompts], height=1.9, fontsize=6)
    fig.suptitle(f"LoRA scale {float(lora_scale):g}  (0 = base model, 1 = adapted)", fontsize=9)
    fig.tight_layout(w_pad=0.3)
    return fig


# --- notebook 13: few-step sampling of 2-D flows -----------------------------------------------------

def flow_steps_figure(fields: dict, noise: torch.Tensor, real: torch.Tensor, steps: int,
                      show_paths: int = 40) -> Figure:
    """One panel per velocity field (name -> v(x, t), t from 1 = noise to 0 = data): the end points of
    `steps` Euler steps from 2-D `noise` over the `real` points, and the first `show_paths` paths drawn.
    Panels are labelled with the field's name and keep the same limits at every step count."""
    from .flow import sample_flow

    if not fields:
        raise ValueError("give at least one velocity field")
    if noise.ndim != 2 or noise.shape[1] != 2 or real.ndim != 2 or real.shape[1] != 2:
        raise ValueError(f"noise and real must be (N, 2) points; got {tuple(noise.shape)} and {tuple(real.shape)}")
    check_int("steps", steps, 1, 1000)
    lim = 1.15 * max(real.abs().max().item(), 3.0)
    fig, axes = plt.subplots(1, len(fields), figsize=(3.0 * len(fields), 3.1), dpi=DPI, squeeze=False)
    for ax, (name, velocity) in zip(axes[0], fields.items()):
        end, path = sample_flow(velocity, noise, int(steps), "euler", return_path=True)
        ax.set_label(name)
        ax.scatter(real[:, 0], real[:, 1], s=2, c="#bbbbbb", label="data")
        lines = torch.stack(path)[:, :show_paths]                     # (steps + 1, paths, 2)
        ax.plot(lines[..., 0], lines[..., 1], lw=0.6, alpha=0.6, color="tab:blue")
        ax.scatter(end[:, 0], end[:, 1], s=2, c="tab:red", label=f"{steps} Euler step(s)")
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    axes[0, 0].legend(fontsize=6, loc="lower left", markerscale=3)
    fig.suptitle(f"{steps} Euler step(s) from the same noise (blue: paths; red: where they end)", fontsize=9)
    fig.tight_layout()
    return fig


# --- notebook 15: img2img strength and inpainting masks ----------------------------------------------

def img2img_figure(pipe, images: torch.Tensor, prompt: str, strength: float, seed: int = 0,
                   steps: int = 20) -> Figure:
    """The input images (top) and SDEdit's result at `strength` with `prompt` (bottom; course_lib.editing.img2img).
    Axes are labelled "input k" and "edit k" and show uint8 (H, W, 3) arrays."""
    from .editing import img2img

    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    edited = img2img(pipe, images, prompt, strength=strength, seed=seed, steps=steps)
    words = prompt if len(prompt) <= 40 else prompt[:38] + "..."
    return _two_rows([("input", images), ("edit", edited)],
                     f"strength {float(strength):.2f} (0 = the input, 1 = from pure noise): {words!r}")


def _two_rows(rows: list[tuple[str, torch.Tensor]], title: str) -> Figure:
    """Rows of images, axes labelled "<row name> k", under one title."""
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 0.2, 1.5 * len(rows)), dpi=DPI, squeeze=False)
    for row, (name, images) in enumerate(rows):
        pics = to_uint8(images)
        for k in range(n):
            ax = axes[row, k]
            ax.set_label(f"{name} {k}")
            ax.imshow(pics[k], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(w_pad=0.3)
    return fig


def inpaint_figure(pipe, images: torch.Tensor, masks: dict, mask_name: str, prompt: str, seed: int = 0,
                   steps: int = 20, resample: int = 1) -> Figure:
    """The input with the chosen mask's hole greyed out (top) and the inpainted result (bottom;
    course_lib.editing.inpaint). masks: name -> (1, 1, H, W) pixel mask, 1 = repaint."""
    from .editing import inpaint

    check_choice("mask", mask_name, tuple(masks))
    mask = masks[mask_name]
    filled = inpaint(pipe, images, mask, prompt, seed=seed, steps=steps, resample=resample)
    holed = images * (1 - mask)                                   # the hole shown grey (0 in [-1, 1])
    return _two_rows([("masked", holed), ("inpainted", filled)], f"mask {mask_name!r}, prompt {prompt!r}")


# --- notebook 17: a control image, a prompt and the conditioning scale -------------------------------

def control_figure(pipe, controlnet, controls: dict, control_name: str, prompt: str, scale: float, seed: int = 0,
                   steps: int = 20, n: int = 3, conditional_only: bool = False) -> Figure:
    """The chosen control image (left) and n images for `prompt` from the pipeline steered by `controlnet` with that
    control at conditioning scale `scale` (course_lib.controlnet.with_control: 0 is the base model, 1 as trained;
    conditional_only: on guidance's conditional pass only), image k from the noise of seed + k. controls: name ->
    (1, 3, H, W) control image in [-1, 1]. Axes are labelled "control" and "image k" and show uint8 arrays."""
    from .controlnet import check_scale, with_control

    check_choice("control", control_name, tuple(controls))
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string (\"\" asks for no prompt at all); got {type(prompt).__name__}")
    check_int("n", n, 1, 8, hint=" (the images drawn beside the control)")
    scale = check_scale(scale)
    control = controls[control_name]
    images = with_control(pipe, controlnet, control, scale, conditional_only=conditional_only)(
        prompt, seed=seed, steps=steps, images_per_prompt=int(n))
    fig = _image_row(torch.cat([control.detach().float().cpu()[:1], images]),
                     ["control"] + [f"seed {int(seed) + k}" for k in range(int(n))], height=1.9, fontsize=7)
    for k, ax in enumerate(fig.axes):
        ax.set_label("control" if k == 0 else f"image {k - 1}")
    words = prompt if len(prompt) <= 40 else prompt[:38] + "..."
    where = ", conditional pass only" if conditional_only else ""
    fig.suptitle(f"control {control_name!r}, prompt {words!r}, conditioning scale {scale:g}{where} (0 = no control)",
                 fontsize=8)
    fig.tight_layout(w_pad=0.3)
    return fig


# --- notebook 19: the 8 GB planner ----------------------------------------------------------

def budget_figure(size: int, batch: int, weights: str, checkpointing: bool, attention: str, rank: int,
                  optimizer: str, gpu: str = "T4", budget_gib: float = 8.0) -> Figure:
    """A LoRA step on SD 1.5 as one stacked bar of its parts (course_lib.budget.plan: closed forms and accounted
    activations) against the budget line."""
    from .budget import plan
    p = plan(size, batch, weights, checkpointing, attention, rank, optimizer, gpu, budget_gib)
    fig, ax = plt.subplots(figsize=(8, 2.4), dpi=DPI)
    left, colours = 0.0, ["#4c72b0", "#dd8452", "#55a868", "#8172b3"]
    for (name, value), colour in zip(p.parts.items(), colours):
        gib = value / 2 ** 30
        ax.barh([0], [gib], left=left, color=colour, label=f"{name} {gib:.2f}")
        left += gib
    ax.axvline(budget_gib, color="crimson", lw=2)
    ax.text(budget_gib, 0.45, f" {budget_gib:g} GiB", color="crimson", va="center", fontsize=8)
    ax.set_xlim(0, max(budget_gib * 1.25, left * 1.05)), ax.set_yticks([]), ax.set_xlabel("GiB (accounted)")
    verdict = "fits" if p.fits else "does NOT fit"
    ax.set_title(f"LoRA step, {size} px, batch {batch}, {weights} base: {p.total_gib:.2f} GiB, {verdict}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, frameon=False)
    fig.tight_layout()
    return fig
