"""The notebooks' widget logic, headless: figures in, pixels compared; no browser needed."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from course_lib import plotting, widgets
from course_lib.schedules import KINDS, make_schedule


@pytest.fixture(autouse=True)
def close_figures():
    """Every figure a test opens is closed afterwards, to keep memory flat."""
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def image():
    """A small fixed (3, 16, 16) image in [-1, 1]: a diagonal gradient."""
    ramp = torch.linspace(-1, 1, 16)
    return torch.stack([ramp[None, :].expand(16, 16), ramp[:, None].expand(16, 16), -ramp[None, :].expand(16, 16)])


def pixels(fig: Figure) -> np.ndarray:
    out = plotting.figure_to_array(fig)
    plt.close(fig)
    return out


def explorer(kind, image, T=100, beta_start=1e-4, beta_end=0.02):
    return widgets.schedule_explorer_figure(kind, T, beta_start, beta_end, image, n_strip=4)


# --- notebook 02: the schedule explorer ------------------------------------------------

def test_explorer_gives_a_different_picture_per_kind(image):
    pictures = {}
    for kind in KINDS:
        fig = explorer(kind, image)
        assert isinstance(fig, Figure)
        pictures[kind] = pixels(fig)
    assert len({p.shape for p in pictures.values()}) == 1  # same canvas size
    for a in KINDS:
        for b in KINDS:
            if a < b:
                assert not np.array_equal(pictures[a], pictures[b]), (a, b)


def test_explorer_is_deterministic_and_depends_on_T(image):
    first = pixels(explorer("linear", image, T=100))
    assert np.array_equal(first, pixels(explorer("linear", image, T=100)))  # same inputs, same pixels
    assert not np.array_equal(first, pixels(explorer("linear", image, T=20)))


def test_beta_range_changes_linear_but_not_cosine(image):
    linear_a = pixels(explorer("linear", image, beta_start=1e-4, beta_end=0.02))
    linear_b = pixels(explorer("linear", image, beta_start=1e-3, beta_end=0.05))
    assert not np.array_equal(linear_a, linear_b)
    cosine_a = pixels(explorer("cosine", image, beta_start=1e-4, beta_end=0.02))
    cosine_b = pixels(explorer("cosine", image, beta_start=1e-3, beta_end=0.05))
    assert np.array_equal(cosine_a, cosine_b)


def test_explorer_schedule_uses_beta_range_only_for_linear_kinds():
    lin = widgets.explorer_schedule("linear", 50, 1e-3, 0.05)
    assert lin.betas[0].item() == pytest.approx(1e-3) and lin.betas[-1].item() == pytest.approx(0.05)
    cos = widgets.explorer_schedule("cosine", 50, 1e-3, 0.05)
    torch.testing.assert_close(cos.betas, make_schedule("cosine", 50).betas, rtol=0, atol=0)
    # A beta_end slider dragged below beta_start is lifted to it rather than raising.
    flat = widgets.explorer_schedule("linear", 50, 0.01, 0.001)
    torch.testing.assert_close(flat.betas, torch.full((50,), 0.01, dtype=torch.float64))


# --- notebook 01: the noise-level slider -------------------------------------------------

def test_noise_level_figure_changes_with_level(image):
    images = [image, -image]
    pictures = [pixels(widgets.noise_level_figure(images, level)) for level in (0.0, 0.5, 1.0)]
    assert not np.array_equal(pictures[0], pictures[1])
    assert not np.array_equal(pictures[1], pictures[2])
    assert not np.array_equal(pictures[0], pictures[2])


@pytest.mark.parametrize("level", [-0.1, 1.5])
def test_noise_level_outside_unit_interval_raises(image, level):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        widgets.noise_level_figure([image], level)


# --- plotting helpers --------------------------------------------------------------------

def test_image_grid_shape_arithmetic():
    images = torch.zeros(10, 3, 8, 8)  # mid-grey tiles
    grid = plotting.image_grid(images, nrow=4, pad=1)
    # 10 tiles in rows of 4 -> 3 rows; each tile 8 px plus 1 px of padding between tiles.
    assert grid.shape == (3 * 9 - 1, 4 * 9 - 1, 3) and grid.dtype == np.uint8
    assert (grid[:8, :8] == 128).all()       # the first tile: 0.0 maps to 128
    assert (grid[8, :] == 255).all()         # white padding row
    assert (grid[18:, 9 * 2:] == 255).all()  # the two empty slots of the last row stay white


def test_strip_timesteps():
    s = make_schedule("linear", 1000)
    ts = plotting.strip_timesteps(s.T, 8)
    assert ts[0] == 0 and ts[-1] == 999
    assert len(ts) == len(set(ts)) == 8
    assert ts == sorted(ts)


# --- wiring controls to a render function ------------------------------------------------

def test_live_redraws_on_every_change():
    W = pytest.importorskip("ipywidgets")
    calls = []

    def render(n, kind):
        calls.append((n, kind))
        fig, ax = plt.subplots()
        ax.set_title(f"{kind} {n}")
        return fig

    n = W.IntSlider(value=3, min=1, max=10)
    kind = W.Dropdown(options=["linear", "cosine"], value="linear")
    box = widgets.live(render, {"n": n, "kind": kind}, columns=1)
    assert isinstance(box, W.VBox)
    assert len(box.children) == 3  # one row per control (columns=1) and the Output
    assert isinstance(box.children[-1], W.Output)
    assert calls == [(3, "linear")]  # drawn once on creation
    n.value = 5
    kind.value = "cosine"
    assert calls == [(3, "linear"), (5, "linear"), (5, "cosine")]
    assert plt.get_fignums() == []  # live closes each figure after showing it


# --- notebook 05: the reverse-process scrubber ----------------------------------------------

@pytest.fixture(scope="module")
def trajectory():
    """A recorded 6-step DDIM run of a stand-in denoiser on a 50-step schedule (3 images of 8 x 8)."""
    from course_lib.sampling import reverse_process

    schedule = make_schedule("cosine", 50)
    model = lambda x, t: 0.5 * x  # noqa: E731  (any x_t-shaped output will do)
    steps = list(reverse_process(model, schedule, (3, 3, 8, 8), steps=6, generator=torch.Generator().manual_seed(0)))
    return steps, schedule


def test_reverse_process_figure_changes_with_index(trajectory):
    steps, schedule = trajectory
    assert len(steps) == 7  # 6 steps and the result
    first = widgets.reverse_process_figure(steps, 0, schedule, n_images=2)
    assert isinstance(first, Figure)
    title = first.get_suptitle()
    assert f"t = {steps[0].t}" in title and f"{schedule.alphas_cumprod[steps[0].t].item():.4f}" in title
    pictures = [pixels(first)] + [pixels(widgets.reverse_process_figure(steps, i, schedule, n_images=2))
                                  for i in (3, 6)]
    assert len({p.shape for p in pictures}) == 1  # the canvas does not jump while scrubbing
    assert not np.array_equal(pictures[0], pictures[1]) and not np.array_equal(pictures[1], pictures[2])
    assert np.array_equal(pictures[1], pixels(widgets.reverse_process_figure(steps, 3, schedule, n_images=2)))
    last = widgets.reverse_process_figure(steps, 6, schedule)
    assert "the result" in last.get_suptitle() and "1.0000" in last.get_suptitle()


def test_reverse_process_figure_rejects_bad_input(trajectory):
    steps, schedule = trajectory
    for index in (-1, 7, 2.0):
        with pytest.raises(ValueError, match="from 0 to 6"):
            widgets.reverse_process_figure(steps, index, schedule)
    with pytest.raises(TypeError, match="ReverseStep"):
        widgets.reverse_process_figure([], 0, schedule)


# --- notebook 06: the latent interpolation -------------------------------------------------

@pytest.fixture(scope="module")
def small_vae():
    """An untrained "tiny" VAE (seeded), in eval mode: any fixed encoder and decoder will do."""
    from course_lib.vae import VAE, vae_preset as get_preset

    torch.manual_seed(0)
    return VAE(get_preset("tiny")).eval().requires_grad_(False)


def shown(fig: Figure, label: str) -> np.ndarray:
    """The picture on the axis with this label."""
    (ax,) = [ax for ax in fig.axes if ax.get_label() == label]
    return np.asarray(ax.get_images()[0].get_array())


def test_latent_interpolation_endpoints_are_the_decoded_endpoints(small_vae, image):
    from course_lib.data import to_uint8
    from course_lib.vae import decode_latents, encode_latents

    a, b, sf = image, -image.flip(-1), 0.7
    fig = widgets.latent_interpolation_figure(small_vae, sf, a, b, alpha=0.3, steps=5)
    assert isinstance(fig, Figure)
    decoded = to_uint8(decode_latents(small_vae, encode_latents(small_vae, torch.stack([a, b]), sf), sf))
    np.testing.assert_array_equal(shown(fig, "latent 0"), decoded[0])
    np.testing.assert_array_equal(shown(fig, "latent 4"), decoded[1])
    np.testing.assert_array_equal(shown(fig, "pixel 0"), to_uint8(a))   # the cross-fade starts at a
    np.testing.assert_array_equal(shown(fig, "pixel 4"), to_uint8(b))   # and ends at b
    assert not np.array_equal(shown(fig, "latent 2"), shown(fig, "pixel 2"))
    # alpha = 1 shows image B's decoding in the framed column, alpha = 0 image A's
    np.testing.assert_array_equal(shown(widgets.latent_interpolation_figure(small_vae, sf, a, b, 1.0, steps=5),
                                        "latent alpha"), decoded[1])
    np.testing.assert_array_equal(shown(widgets.latent_interpolation_figure(small_vae, sf, a, b, 0, steps=5),
                                        "latent alpha"), decoded[0])


def test_latent_interpolation_changes_with_alpha_on_a_fixed_canvas(small_vae, image):
    pictures = [pixels(widgets.latent_interpolation_figure(small_vae, 0.7, image, -image, alpha))
                for alpha in (0.0, 0.5, 0.5, 1.0)]
    assert len({p.shape for p in pictures}) == 1  # the canvas does not jump while dragging
    assert np.array_equal(pictures[1], pictures[2])  # deterministic
    assert not np.array_equal(pictures[0], pictures[1]) and not np.array_equal(pictures[1], pictures[3])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", None])
def test_latent_interpolation_rejects_bad_alpha(small_vae, image, alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        widgets.latent_interpolation_figure(small_vae, 0.7, image, -image, alpha)


def test_latent_interpolation_rejects_bad_images_and_steps(small_vae, image):
    with pytest.raises(ValueError, match=r"steps must be an int >= 2 \(the two end points\)"):
        widgets.latent_interpolation_figure(small_vae, 0.7, image, -image, 0.5, steps=1)
    with pytest.raises(ValueError, match=r"image_b must be one image, a \(3, H, W\)"):
        widgets.latent_interpolation_figure(small_vae, 0.7, image, image[None], 0.5)
    with pytest.raises(ValueError, match="same shape"):
        widgets.latent_interpolation_figure(small_vae, 0.7, image, image[:, :8, :8], 0.5)


# --- notebook 08: prompt-to-image retrieval ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    """An untrained "tiny" mini CLIP (seeded) with a tokenizer trained on a few captions, and 10 random
    32 px images with their captions: any fixed encoders will do."""
    from course_lib.clip import MiniCLIP, clip_config
    from course_lib.tokenizer import Tokenizer

    captions = [f"{colour} {thing}" for colour in ("red", "green") for thing in ("heart", "cat face", "car",
                                                                                   "flag", "ball")]
    tokenizer = Tokenizer.train(captions * 2, vocab_size=64)
    torch.manual_seed(0)
    clip = MiniCLIP(clip_config("tiny", tokenizer.vocab_size)).eval().requires_grad_(False)
    images = torch.rand(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return clip, tokenizer, images, captions


def test_retrieval_figure_shows_the_top_k_by_similarity(tiny_clip):
    from course_lib.data import to_uint8
    from course_lib.clip import similarity

    clip, tokenizer, images, captions = tiny_clip
    fig = widgets.retrieval_figure(clip, tokenizer, images, captions, "red heart", k=4)
    assert isinstance(fig, Figure)
    scores = similarity(clip, tokenizer, images, ["red heart"])[:, 0]
    order = scores.argsort(descending=True)[:4].tolist()
    for rank, i in enumerate(order, start=1):
        np.testing.assert_array_equal(shown(fig, f"rank {rank}"), to_uint8(images[i]))
        (ax,) = [ax for ax in fig.axes if ax.get_label() == f"rank {rank}"]
        assert f"{scores[i].item():.3f}" in ax.get_title() and captions[i] in ax.get_xlabel().replace("\n", " ")
    assert len([ax for ax in fig.axes if ax.get_label().startswith("rank ")]) == 4
    assert "red heart" in fig.get_suptitle()


def test_retrieval_figure_depends_on_the_prompt_and_caps_k(tiny_clip):
    clip, tokenizer, images, captions = tiny_clip
    a = widgets.retrieval_figure(clip, tokenizer, images, captions, "red heart", k=3)
    b = widgets.retrieval_figure(clip, tokenizer, images, captions, "green car", k=3)
    titles = lambda fig: [ax.get_title() for ax in fig.axes]  # noqa: E731
    assert titles(a) != titles(b)                       # other scores for another prompt
    assert pixels(widgets.retrieval_figure(clip, tokenizer, images, captions, "red heart", k=3)).shape == \
        pixels(widgets.retrieval_figure(clip, tokenizer, images, captions, "green car", k=3)).shape
    everything = widgets.retrieval_figure(clip, tokenizer, images, captions, "", k=50)   # k above N: all N
    assert len(everything.axes) == len(images)


def test_retrieval_figure_rejects_bad_input(tiny_clip):
    clip, tokenizer, images, captions = tiny_clip
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"k must be an int >= 1 \(how many images to show\)"):
            widgets.retrieval_figure(clip, tokenizer, images, captions, "cat", k=k)
    with pytest.raises(ValueError, match="one caption per image"):
        widgets.retrieval_figure(clip, tokenizer, images, captions[:-1], "cat")
    with pytest.raises(ValueError, match=r"non-empty \(N, 3, H, W\)"):
        widgets.retrieval_figure(clip, tokenizer, images[0], captions, "cat")
    with pytest.raises(TypeError, match="prompt must be a str"):
        widgets.retrieval_figure(clip, tokenizer, images, captions, None)


# --- notebook 09: the prompt box -----------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_text_to_image_figure_shows_the_pipelines_images(tiny_pipe):
    from course_lib.data import to_uint8

    fig = widgets.text_to_image_figure(tiny_pipe, "red heart", 3.0, seed=5, n=3, steps=3)
    assert isinstance(fig, Figure)
    expected = to_uint8(tiny_pipe("red heart", seed=5, steps=3, guidance_scale=3.0, images_per_prompt=3))
    shown_images = [shown(fig, f"image {k}") for k in range(3)]
    assert len([ax for ax in fig.axes if ax.get_images()]) == 3
    for k in range(3):
        assert shown_images[k].shape == (32, 32, 3) and shown_images[k].dtype == np.uint8
        np.testing.assert_array_equal(shown_images[k], expected[k])
    # image k is the pipeline's image for seed + k, alone
    np.testing.assert_array_equal(shown_images[1], to_uint8(tiny_pipe("red heart", seed=6, steps=3,
                                                                       guidance_scale=3.0))[0])
    title = fig._suptitle.get_text()
    assert "red heart" in title and "guidance scale 3" in title and "seed 5" in title
    # another prompt or seed gives other pictures; the same arguments the same ones
    again = widgets.text_to_image_figure(tiny_pipe, "red heart", 3.0, seed=5, n=3, steps=3)
    np.testing.assert_array_equal(shown(again, "image 0"), shown_images[0])
    other = widgets.text_to_image_figure(tiny_pipe, "grinning face", 3.0, seed=5, n=3, steps=3)
    assert not np.array_equal(shown(other, "image 0"), shown_images[0])
    assert len(widgets.text_to_image_figure(tiny_pipe, "", 0.0, seed=0, n=1, steps=2).axes) == 1


@pytest.mark.usefixtures("one_thread")
def test_text_to_image_figure_passes_the_guidance_rescale(tiny_pipe):
    from course_lib.data import to_uint8

    fig = widgets.text_to_image_figure(tiny_pipe, "red heart", 6.0, seed=2, n=2, steps=3, guidance_rescale=0.7)
    expected = to_uint8(tiny_pipe("red heart", seed=2, steps=3, guidance_scale=6.0, guidance_rescale=0.7,
                                  images_per_prompt=2))
    for k in range(2):
        np.testing.assert_array_equal(shown(fig, f"image {k}"), expected[k])
    assert "rescaled by phi 0.7" in fig._suptitle.get_text()
    plain = widgets.text_to_image_figure(tiny_pipe, "red heart", 6.0, seed=2, n=2, steps=3)
    assert "rescaled" not in plain._suptitle.get_text()
    assert not np.array_equal(shown(plain, "image 0"), shown(fig, "image 0"))
    with pytest.raises(ValueError, match="guidance_rescale"):
        widgets.text_to_image_figure(tiny_pipe, "red heart", 6.0, seed=2, n=1, steps=2, guidance_rescale=1.5)


@pytest.mark.parametrize("n", [0, -1, 17, 2.5, "4", True, None])
def test_text_to_image_figure_rejects_bad_n(tiny_pipe, n):
    with pytest.raises(ValueError, match="n must be an int from 1 to 16"):
        widgets.text_to_image_figure(tiny_pipe, "red heart", 3.0, seed=0, n=n, steps=2)


def test_text_to_image_figure_rejects_bad_prompt_seed_and_scale(tiny_pipe):
    with pytest.raises(TypeError, match="prompt must be a string"):
        widgets.text_to_image_figure(tiny_pipe, ["red heart"], 3.0, seed=0, n=2, steps=2)
    with pytest.raises(TypeError, match="seed must be an integer"):
        widgets.text_to_image_figure(tiny_pipe, "red heart", 3.0, seed=0.5, n=2, steps=2)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
        widgets.text_to_image_figure(tiny_pipe, "red heart", -1.0, seed=0, n=2, steps=2)


def test_lora_scale_figure_blends_base_and_adapted(tiny_pipe):
    import copy

    from course_lib import lora
    from course_lib.data import to_uint8

    pipe = copy.copy(tiny_pipe)
    pipe.unet = copy.deepcopy(tiny_pipe.unet)
    with pytest.raises(ValueError, match="no LoRA layers"):
        widgets.lora_scale_figure(pipe, ["red heart"], 1.0, steps=2)
    lora.inject_lora(pipe.unet, rank=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(pipe.unet).values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
    prompts = ["red heart", "grinning face"]
    base = widgets.lora_scale_figure(pipe, prompts, 0.0, seed=1, steps=3)
    expected = to_uint8(tiny_pipe(prompts, seed=1, steps=3, guidance_scale=3.0))
    for k in range(2):
        np.testing.assert_array_equal(shown(base, f"image {k}"), expected[k])   # scale 0 = the base model
    adapted = widgets.lora_scale_figure(pipe, prompts, 1.0, seed=1, steps=3)
    assert not np.array_equal(shown(adapted, "image 0"), shown(base, "image 0"))
    assert "LoRA scale 1" in adapted._suptitle.get_text()
    assert all(layer.scale == 1.0 for layer in lora.lora_layers(pipe.unet).values())   # restored
    with pytest.raises(ValueError, match="lora_scale must be a number"):
        widgets.lora_scale_figure(pipe, prompts, 9.0, steps=2)


# --- notebook 13: few-step sampling of 2-D flows ---------------------------------------------------

def _two_flows():
    from course_lib import flow
    exact = flow.gaussian_velocity(torch.tensor([2.0, 0.0]), torch.tensor([0.05, 0.05]))
    return {"exact": exact, "zero": lambda x, t: torch.zeros_like(x)}


def test_flow_steps_figure_draws_each_fields_euler_ends():
    g = torch.Generator().manual_seed(0)
    noise, real = torch.randn(50, 2, generator=g), torch.randn(80, 2, generator=g) * 0.2 + torch.tensor([2.0, 0.0])
    fig = widgets.flow_steps_figure(_two_flows(), noise, real, steps=4)
    axes = {ax.get_label(): ax for ax in fig.axes if ax.get_label() in ("exact", "zero")}
    assert set(axes) == {"exact", "zero"}
    ends = axes["zero"].collections[-1].get_offsets()                  # the zero field leaves noise where it is
    np.testing.assert_allclose(np.asarray(ends), noise.numpy(), atol=1e-6)
    exact_ends = np.asarray(axes["exact"].collections[-1].get_offsets())
    assert abs(exact_ends[:, 0].mean() - 2.0) < 0.2                     # the exact field carries it to the data
    one, many = (widgets.flow_steps_figure(_two_flows(), noise, real, steps=s) for s in (1, 8))
    assert axes["exact"].get_xlim() == one.axes[0].get_xlim() == many.axes[0].get_xlim()
    plt.close("all")


def test_flow_steps_figure_rejects_bad_input():
    noise = torch.randn(5, 2)
    with pytest.raises(ValueError, match="steps must be an int from 1 to 1000; got 0"):
        widgets.flow_steps_figure(_two_flows(), noise, noise, steps=0)
    with pytest.raises(ValueError, match=r"noise and real must be \(N, 2\) points"):
        widgets.flow_steps_figure(_two_flows(), torch.randn(5, 3), noise, steps=2)
    with pytest.raises(ValueError, match="at least one velocity field"):
        widgets.flow_steps_figure({}, noise, noise, steps=2)


# --- notebook 15: editing --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_pipe():
    from course_lib.pipeline import TextToImage
    return TextToImage.from_shipped()


def test_img2img_figure_shows_the_input_and_the_edit(shipped_pipe):
    from course_lib.data import load_emoji, to_uint8
    from course_lib.editing import img2img
    images = load_emoji(size=32, split="heldout", limit=2).images
    fig = widgets.img2img_figure(shipped_pipe, images, "red heart", 0.5, seed=1, steps=4)
    expected = to_uint8(img2img(shipped_pipe, images, "red heart", strength=0.5, seed=1, steps=4))
    for k in range(2):
        np.testing.assert_array_equal(shown(fig, f"input {k}"), to_uint8(images)[k])
        np.testing.assert_array_equal(shown(fig, f"edit {k}"), expected[k])
    other = widgets.img2img_figure(shipped_pipe, images, "red heart", 1.0, seed=1, steps=4)
    assert not np.array_equal(shown(other, "edit 0"), expected[0])
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        widgets.img2img_figure(shipped_pipe, images, "red heart", 1.5)
    plt.close("all")


def test_inpaint_figure_uses_the_chosen_mask(shipped_pipe):
    from course_lib.data import load_emoji, to_uint8
    from course_lib.editing import inpaint
    images = load_emoji(size=32, split="heldout", limit=2).images
    centre = torch.zeros(1, 1, 32, 32)
    centre[..., 8:24, 8:24] = 1
    masks = {"centre": centre, "left": torch.zeros(1, 1, 32, 32).index_fill_(3, torch.arange(16), 1.0)}
    fig = widgets.inpaint_figure(shipped_pipe, images, masks, "left", "cat face", seed=2, steps=4)
    expected = to_uint8(inpaint(shipped_pipe, images, masks["left"], "cat face", seed=2, steps=4))
    np.testing.assert_array_equal(shown(fig, "inpainted 1"), expected[1])
    with pytest.raises(ValueError, match=r"unknown mask 'top'; choose from \['centre', 'left'\]"):
        widgets.inpaint_figure(shipped_pipe, images, masks, "top", "cat face")
    plt.close("all")


# --- the transformers notebook: SD 3's timestep shift -------------------------------------------------------

def test_time_shift_figure_draws_the_shift_its_log_snr_and_its_grid():
    from course_lib.schedules import FlowSchedule, time_shift
    fig = widgets.time_shift_figure(3.0, steps=5, reference=(1.0, 6.0))
    shifted, snr, _ = fig.axes[:3]
    lines = {line.get_label(): line for line in shifted.get_lines()}
    assert set(lines) == {"s=1", "s=6", "s=3"}
    t, y = (np.asarray(v, dtype=float) for v in lines["s=3"].get_data())
    np.testing.assert_allclose(y, time_shift(torch.tensor(t, dtype=torch.float64), 3.0).numpy(), atol=1e-12)
    np.testing.assert_allclose(lines["s=1"].get_data()[1], t, atol=1e-12)          # s = 1: no change
    snr_lines = {line.get_label(): np.asarray(line.get_data()[1], dtype=float) for line in snr.get_lines()}
    np.testing.assert_allclose(snr_lines["s=3"] - snr_lines["s=1"], -2 * np.log(3.0), atol=1e-9)
    grid = [c for c in shifted.collections if c.get_label() == "grid s=3"][0]
    np.testing.assert_allclose(np.asarray(grid.get_offsets())[:, 1], FlowSchedule(shift=3.0).grid(5), atol=1e-6)
    other = widgets.time_shift_figure(1.5, steps=5, reference=(1.0, 6.0))
    assert "s=1.5" in {line.get_label() for line in other.axes[0].get_lines()}
    plt.close("all")


def test_time_shift_figure_rejects_bad_input():
    with pytest.raises(ValueError, match="the timestep shift must be a finite number > 0"):
        widgets.time_shift_figure(0.0)
    with pytest.raises(ValueError, match="steps must be an int from 1 to 1000; got 0"):
        widgets.time_shift_figure(3.0, steps=0)


# --- the control notebook ----------------------------------------------------------------------------------

def test_control_figure_shows_the_control_and_the_steered_images(shipped_pipe):
    from course_lib import controls
    from course_lib.controlnet import ControlNet, with_control
    from course_lib.data import load_emoji, to_uint8
    images = load_emoji(size=32, split="heldout", limit=2).images
    net = ControlNet.from_unet(shipped_pipe.unet, factor=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                      # off zero, so that the control reaches the images
        for p in [*net.zero_convs.parameters(), *net.mid_zero_conv.parameters(), *net.hint.conv_out.parameters()]:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    menu = {name: controls.make_control(images[i:i + 1], "silhouette") for i, name in enumerate(("a", "b"))}
    fig = widgets.control_figure(shipped_pipe, net, menu, "b", "red heart", 1.0, seed=3, steps=3, n=2)
    expected = to_uint8(with_control(shipped_pipe, net, menu["b"], 1.0)("red heart", seed=3, steps=3,
                                                                        images_per_prompt=2))
    np.testing.assert_array_equal(shown(fig, "control"), to_uint8(menu["b"])[0])
    for k in range(2):
        np.testing.assert_array_equal(shown(fig, f"image {k}"), expected[k])
    other = widgets.control_figure(shipped_pipe, net, menu, "a", "red heart", 1.0, seed=3, steps=3, n=2)
    assert not np.array_equal(shown(other, "image 0"), expected[0])          # another control, another image
    only = widgets.control_figure(shipped_pipe, net, menu, "b", "red heart", 1.0, seed=3, steps=3, n=1,
                                  conditional_only=True)
    expected_only = with_control(shipped_pipe, net, menu["b"], 1.0, conditional_only=True)("red heart", seed=3, steps=3)
    np.testing.assert_array_equal(shown(only, "image 0"), to_uint8(expected_only)[0])
    assert "conditional pass only" in only._suptitle.get_text()
    off = widgets.control_figure(shipped_pipe, net, menu, "b", "red heart", 0.0, seed=3, steps=3, n=1)
    np.testing.assert_array_equal(shown(off, "image 0"), to_uint8(shipped_pipe("red heart", seed=3, steps=3))[0])
    with pytest.raises(ValueError, match=r"unknown control 'c'; choose from \['a', 'b'\]"):
        widgets.control_figure(shipped_pipe, net, menu, "c", "red heart", 1.0)
    with pytest.raises(ValueError, match="conditioning_scale must be a finite number"):
        widgets.control_figure(shipped_pipe, net, menu, "a", "red heart", float("nan"))
    with pytest.raises(ValueError, match="n must be an int from 1 to 8"):
        widgets.control_figure(shipped_pipe, net, menu, "a", "red heart", 1.0, n=0)
    plt.close("all")
