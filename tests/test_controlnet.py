"""ControlNet and its control images: each control against its definition, the controlled model exactly the base at
initialisation, diffusers' ControlNetModel.from_unet with the same weights, the one sampling path unchanged, bad
inputs refused by name, and training through the one loop with exact resume."""

import copy
import math

import pytest
import torch

from course_lib import controls
from course_lib.controlnet import ControlledUNet, ControlNet, HintEncoder, fit_controlnet, with_control
from course_lib.sd import sd_preset
from course_lib.unet import UNet, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


# --- control images against their definitions --------------------------------------------------------------

def _step(H=8, W=8, at=4, low=-1.0, high=1.0, vertical=True):
    img = torch.full((1, 3, H, W), low)
    if vertical:
        img[..., :, at:] = high
    else:
        img[..., at:, :] = high
    return img


def test_sobel_on_a_step_and_a_ramp_gives_the_known_response():
    magnitude = controls.edge_magnitude(_step())[0, 0]
    expected = torch.zeros(8, 8)
    expected[:, 3:5] = controls.STEP                  # 4 (1 - (-1)) = 8 on both columns beside the step
    assert torch.equal(magnitude, expected)
    gx, gy = controls.sobel(_step(vertical=False))
    assert torch.equal(gx, torch.zeros_like(gx)) and gy[0, 0, 3:5].eq(8).all() and gy[0, 0, :3].eq(0).all()
    ramp = (torch.arange(8.0) * 0.1 - 0.35).expand(1, 3, 8, 8)       # slope 0.1 a pixel: g_x = 4 (2 x 0.1)
    gx, gy = controls.sobel(ramp)
    torch.testing.assert_close(gx[0, 0, :, 1:-1], torch.full((8, 6), 0.8))
    torch.testing.assert_close(gy, torch.zeros_like(gy), rtol=0, atol=1e-6)
    brightness = controls.brightness(torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1))
    assert brightness.item() == pytest.approx(0.299 - 0.587 + 0.057)
    assert torch.equal(controls.edges(_step(), threshold=0.5)[0, 0], expected > 0)
    assert not controls.edges(_step(low=-0.1, high=0.1), threshold=0.25).any()    # a faint step: 0.8 < 2


def test_canny_thins_a_step_to_one_pixel_and_keeps_weak_edges_only_where_they_touch_strong_ones():
    line = controls.canny(_step(16, 16, at=8))[0, 0]
    assert line[:, 8].all() and line.sum() == 16                     # one column, the full height
    square = torch.full((1, 3, 16, 16), -1.0)
    square[..., 4:12, 4:12] = 1.0
    ring = controls.canny(square)[0, 0]
    assert not ring[6:10, 6:10].any() and not ring[:3].any() and not ring[14:].any()
    assert (ring[5:11].sum(1) == 2).all() and (ring[:, 5:11].sum(0) == 2).all()   # a closed one-pixel outline
    a = torch.linspace(0.8, 0.02, 32)[:, None]                       # an edge fading down the rows at column 16
    img = torch.cat([-a.expand(32, 16), a.expand(32, 16)], 1).clone()
    img[:, 26:] += 0.2                                               # and a faint edge of its own at column 26
    img = img.expand(1, 3, 32, 32)
    kept = controls.canny(img, low=0.05, high=0.3)[0, 0]              # strong: 0.75 a >= 0.3; weak: 0.75 a >= 0.05
    strict = controls.canny(img, low=0.3, high=0.3)[0, 0]
    edge = lambda m: m[:, 15:17].any(1)                              # the ridge's two columns tie: either
    assert edge(kept)[:28].all() and edge(strict)[:14].all() and not edge(strict)[18:].any()
    assert (kept[:, 15:17].sum(1) <= 1).all()                        # still one pixel wide
    assert not kept[:, 20:].any() and not strict[:, 20:].any()


def test_silhouette_and_colour_layout_follow_their_definitions():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (yy - 15.5) ** 2 + (xx - 12.5) ** 2 <= 9.0 ** 2
    img = torch.ones(1, 3, 32, 32)                                   # white, as the emoji's background
    img[0, :, disc] = torch.tensor([0.9, -0.8, -0.8])[:, None]       # a red disc
    assert torch.equal(controls.silhouette(img)[0, 0], disc)
    photo = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    layout = controls.colour_layout(photo, grid=4)
    means = photo.reshape(2, 3, 4, 8, 4, 8).mean(dim=(3, 5))          # each 8x8 cell's mean colour
    torch.testing.assert_close(layout, means.repeat_interleave(8, 2).repeat_interleave(8, 3))
    control = controls.make_control(img, "silhouette")
    assert control.shape == (1, 3, 32, 32) and set(control.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(control[0, 0] > 0, disc)
    for kind in controls.CONTROLS:
        out = controls.make_control(photo, kind)
        assert out.shape == photo.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match=r"unknown control 'depth'; choose from \['edges', 'canny'"):
        controls.make_control(photo, "depth")
    with pytest.raises(ValueError, match="grid must divide the image's size 32x32"):
        controls.colour_layout(photo, grid=5)
    with pytest.raises(ValueError, match=r"low must not exceed high"):
        controls.canny(photo, low=0.5, high=0.2)
    with pytest.raises(ValueError, match=r"must hold values in \[-1, 1\]"):
        controls.edges(photo * 3)


# --- the ControlNet ------------------------------------------------------------------------------------------

def _perturbed(config, seed=0):
    torch.manual_seed(seed)
    unet = UNet(config)
    with torch.no_grad():
        for p in unet.parameters():                      # zero-initialised outputs (proj_out) would hide differences
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def _randomise(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))


def _inputs(config, B=2, factor=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, config.in_channels, config.image_size, config.image_size, generator=g)
    context = torch.randn(B, 5, config.context_dim, generator=g)
    control = torch.rand(B, 3, factor * config.image_size, factor * config.image_size, generator=g) * 2 - 1
    return x, torch.tensor([10, 700][:B]), context, control


def test_agreement_is_the_iou_of_white_pixels_or_the_colour_distance():
    a = torch.full((2, 3, 4, 4), -1.0)
    b = a.clone()
    a[0, :, 0, :2] = 1                      # image 0: pixels (0,0), (0,1) white in a; (0,1), (0,2) in b
    b[0, :, 0, 1:3] = 1
    a[1, :, 1, 1] = b[1, :, 1, 1] = 1       # image 1: the same single pixel
    torch.testing.assert_close(controls.agreement(a, b, "edges"), torch.tensor([1 / 3, 1.0]))
    empty = torch.full((1, 3, 4, 4), -1.0)
    assert controls.agreement(empty, empty, "silhouette").item() == 0.0        # nothing to agree on
    red, blue = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    red[:, 0], blue[:, 2] = 1, 1
    torch.testing.assert_close(controls.agreement(red, blue, "colour"), torch.tensor([1 - 2 / 3 / 2]))
    with pytest.raises(ValueError, match="of one shape"):
        controls.agreement(a, b[:1], "edges")
    with pytest.raises(ValueError, match=r"unknown control 'depth'"):
        controls.agreement(a, b, "depth")


@pytest.mark.parametrize("config", [get_preset("sd_tiny", image_size=8), sd_preset("tiny").unet],
                         ids=["course skips", "SD skips"])
def test_a_new_controlnet_leaves_the_base_model_exactly_and_scales_its_residuals(config):
    unet = _perturbed(config)
    net = ControlNet.from_unet(unet)
    for name, p in net.named_parameters():
        if not name.startswith(("hint.", "zero_convs.", "mid_zero_conv.")):
            assert torch.equal(p, unet.get_parameter(name))            # the encoder copied
    x, t, c, control = _inputs(config)
    base = unet(x, t, c)
    assert torch.equal(ControlledUNet(unet, net, control)(x, t, c), base)
    skips, mid = net(x, t, c, None, control)
    assert len(skips) == len(net.skip_channels) == len(net.zero_convs) and not mid.any()
    _randomise(net.zero_convs, 1), _randomise(net.mid_zero_conv, 2), _randomise(net.hint.conv_out, 3)
    assert not torch.equal(ControlledUNet(unet, net, control)(x, t, c), base)
    assert torch.equal(ControlledUNet(unet, net, control, scale=0.0)(x, t, c), base)
    half, (one, mid_one) = net(x, t, c, None, control, 0.5), net(x, t, c, None, control, 1.0)
    for a, b in zip(half[0] + [half[1]], one + [mid_one]):
        torch.testing.assert_close(2 * a, b)


def test_bad_controls_and_scales_are_refused_by_name():
    config = get_preset("sd_tiny", image_size=8)
    unet = _perturbed(config)
    net = ControlNet.from_unet(unet)
    x, t, c, control = _inputs(config)
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\): RGB in \[-1, 1\] at the image's resolution, 4x"):
        net(x, t, c, None, control[:, :, :16, :16])
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\).*got \(2, 1, 32, 32\)"):
        net(x, t, c, None, control[:, :1])
    with pytest.raises(ValueError, match="one for the batch or one per image"):
        net(x, t, c, None, torch.cat([control, control[:1]]))
    with pytest.raises(ValueError, match="finite floats"):
        net(x, t, c, None, control * math.nan)
    for bad in (math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="conditioning_scale must be a finite number"):
            ControlledUNet(unet, net, control, scale=bad)
    with pytest.raises(ValueError, match="needs its control image"):
        net(x, t, c)
    with pytest.raises(ValueError, match="factor is how much smaller the latents are"):
        ControlNet.from_unet(unet, factor=3)
    with pytest.raises(ValueError, match="built from another U-Net"):
        ControlledUNet(_perturbed(sd_preset("tiny").unet), net, control)
    assert HintEncoder(32).factor == 4 and ControlNet.from_unet(unet, factor=8).hint.factor == 8


def test_residuals_match_diffusers_controlnet_from_unet():
    """A small SD-layout U-Net in diffusers, converted into the course's (course_lib.sd_convert), then each side's
    from_unet; the hint encoder and zero convs given the same random weights on both sides."""
    diffusers = pytest.importorskip("diffusers")
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("sd_parity", Path(__file__).parents[1] / "scripts" / "sd_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    from course_lib import sd_convert
    theirs_unet = parity.small_unet()
    ours_unet = parity.convert(UNet, theirs_unet, sd_convert.unet_config_from_diffusers(dict(theirs_unet.config)))
    ours = ControlNet.from_unet(ours_unet, factor=4).eval()
    theirs = diffusers.ControlNetModel.from_unet(theirs_unet, conditioning_embedding_out_channels=(16, 32, 96)).eval()
    _randomise(ours.hint, 4, std=0.1), _randomise(ours.zero_convs, 5), _randomise(ours.mid_zero_conv, 6)
    named = {"hint.": "controlnet_cond_embedding.", "zero_convs.": "controlnet_down_blocks.",
             "mid_zero_conv.": "controlnet_mid_block."}
    mine = {k: v for k, v in ours.state_dict().items() if k.startswith(tuple(named))}
    renamed = {next(d + k[len(o):] for o, d in named.items() if k.startswith(o)): v for k, v in mine.items()}
    assert set(renamed) <= set(theirs.state_dict())
    theirs.load_state_dict(renamed, strict=False)
    x, t, c, control = _inputs(ours_unet.config)
    with torch.no_grad():
        down, mid = theirs(x, t, encoder_hidden_states=c, controlnet_cond=control,
                           conditioning_scale=0.7, return_dict=False)
        skips, mine_mid = ours(x, t, c, None, control, 0.7)
        worst = max((a - b).abs().max().item() for a, b in zip(skips + [mine_mid], list(down) + [mid]))
        whole_theirs = theirs_unet(x, t, encoder_hidden_states=c, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid).sample
        whole = (ControlledUNet(ours_unet, ours, control, 0.7)(x, t, c) - whole_theirs).abs().max().item()
        size = max(r.abs().max().item() for r in skips + [mine_mid])
        effect = (whole_theirs - theirs_unet(x, t, encoder_hidden_states=c).sample).abs().max().item()
    print(f"\nControlNet against diffusers (float32): residuals max |difference| {worst:.2e} (largest residual "
          f"{size:.2f}), controlled U-Net {whole:.2e} (the control's effect {effect:.2f})")
    assert len(skips) == len(down) and worst < 1e-5 and whole < 1e-4 and size > 0.1 and effect > 0.01


# --- through the pipeline and the loop ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eight(tiny_pipe):
    from course_lib.data import load_emoji
    return load_emoji(size=tiny_pipe.vae.config.image_size, split="train", style="twemoji", limit=8)


def test_the_controlled_pipeline_samples_through_the_one_path(tiny_pipe, eight):
    net = ControlNet.from_unet(tiny_pipe.unet, factor=2)
    control = controls.make_control(eight.images[:2], "canny")
    base = tiny_pipe(["red heart", "cat"], seed=1, steps=3, return_latents=True)
    same = with_control(tiny_pipe, net, control)(["red heart", "cat"], seed=1, steps=3, return_latents=True)
    assert torch.equal(same, base)                         # a new ControlNet changes nothing, guidance included
    _randomise(net.zero_convs, 1), _randomise(net.mid_zero_conv, 2), _randomise(net.hint.conv_out, 3)
    steered = with_control(tiny_pipe, net, control)(["red heart", "cat"], seed=1, steps=3, return_latents=True)
    assert not torch.equal(steered, base)
    off = with_control(tiny_pipe, net, control, conditioning_scale=0.0)
    assert torch.equal(off(["red heart", "cat"], seed=1, steps=3, return_latents=True), base)
    with pytest.raises(ValueError, match=r"the control image must have shape \(B, 3, 32, 32\)"):
        with_control(tiny_pipe, net, control[:, :, :16])(["red heart"], steps=2)


def test_conditional_only_steers_the_conditional_pass_and_leaves_the_empty_prompts(tiny_pipe, eight):
    from course_lib.guidance import classifier_free_guidance
    net = ControlNet.from_unet(tiny_pipe.unet, factor=2)
    _randomise(net.zero_convs, 1), _randomise(net.mid_zero_conv, 2), _randomise(net.hint.conv_out, 3)
    control = controls.make_control(eight.images[:2], "canny")
    prompts = ["red heart", "cat"]
    both = with_control(tiny_pipe, net, control)
    only = with_control(tiny_pipe, net, control, conditional_only=True)
    run = lambda pipe, p, w: pipe(p, seed=1, steps=3, guidance_scale=w, return_latents=True)  # noqa: E731
    assert torch.equal(run(only, prompts, 1.0), run(both, prompts, 1.0))      # no guidance: one pass, controlled
    assert torch.equal(run(only, ["", ""], 1.0), run(tiny_pipe, ["", ""], 1.0))    # the empty prompt: uncontrolled
    assert not torch.equal(run(only, prompts, 4.0), run(both, prompts, 4.0))
    # one guided prediction against its definition: the controlled conditional, the plain unconditional pass
    x, t = torch.randn(2, *tiny_pipe.latent_shape), torch.tensor([500, 500])
    c, m = tiny_pipe.encode(prompts)
    n, nm = tiny_pipe.encode(["", ""])
    with torch.no_grad():
        guided = only.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, n]), torch.cat([m, nm]))
        want_cond = both.unet(x, t, c, m)
        want_uncond = tiny_pipe.unet(x, t, n, nm)
    assert torch.allclose(guided[:2], want_cond, atol=1e-5) and torch.allclose(guided[2:], want_uncond, atol=1e-5)
    assert torch.allclose(classifier_free_guidance(*guided.chunk(2), 4.0),
                          classifier_free_guidance(want_cond, want_uncond, 4.0), atol=1e-5)
    with pytest.raises(TypeError, match="conditional_only must be True or False"):
        with_control(tiny_pipe, net, control, conditional_only="yes")
    with pytest.raises(ValueError, match=r"uncontrolled must be one prompt's text states \(1, L, D\)"):
        ControlledUNet(tiny_pipe.unet, net, control, uncontrolled=(c, m))


def test_guidance_by_text_and_control_reduces_to_its_known_cases(tiny_pipe, eight):
    net = ControlNet.from_unet(tiny_pipe.unet, factor=2)
    _randomise(net.zero_convs, 1), _randomise(net.mid_zero_conv, 2), _randomise(net.hint.conv_out, 3)
    control = controls.make_control(eight.images[:2], "canny")
    prompts = ["red heart", "cat"]
    run = lambda pipe, p, **kw: pipe(p, seed=1, steps=3, return_latents=True, **kw)  # noqa: E731
    dual = with_control(tiny_pipe, net, control, guidance=(3.0, 3.0))
    assert dual.sampler_settings.guidance_scale == 1.0 and tiny_pipe.sampler_settings.guidance_scale != 1.0
    # (w, w): guidance w with the control on the conditional pass only
    only = with_control(tiny_pipe, net, control, conditional_only=True)
    assert torch.allclose(run(dual, prompts), run(only, prompts, guidance_scale=3.0), atol=1e-4)
    # text 0, control 1: the controlled model with the empty prompt, unguided
    alone = with_control(tiny_pipe, net, control, guidance=(0.0, 1.0))
    both = with_control(tiny_pipe, net, control)
    assert torch.allclose(run(alone, prompts), run(both, ["", ""], guidance_scale=1.0), atol=1e-4)
    # the control scale moves the image; conditioning scale 0 leaves the text-guided base model
    assert not torch.allclose(run(with_control(tiny_pipe, net, control, guidance=(3.0, 6.0)), prompts),
                              run(dual, prompts), atol=1e-3)
    off = with_control(tiny_pipe, net, control, 0.0, guidance=(3.0, 6.0))
    assert torch.allclose(run(off, prompts), run(tiny_pipe, prompts, guidance_scale=3.0), atol=1e-4)
    with pytest.raises(ValueError, match=r"guidance must be a pair \(text scale, control scale\)"):
        with_control(tiny_pipe, net, control, guidance=(4.0, -1.0))
    with pytest.raises(ValueError, match="give conditional_only or guidance, not both"):
        with_control(tiny_pipe, net, control, conditional_only=True, guidance=(4.0, 4.0))


def _stop_at(step):
    def callback(run):
        if run.step == step:
            raise KeyboardInterrupt(f"stopped at step {step}")
    return callback


def test_training_moves_only_the_controlnet_and_resumes_bit_identically(tiny_pipe, eight, tmp_path):
    control = controls.make_control(eight.images, "silhouette")
    frozen = copy.deepcopy(tiny_pipe.unet.state_dict())
    options = dict(steps=6, batch_size=4, lr=1e-3, caption_dropout=0.5)
    net, log = fit_controlnet(tiny_pipe, eight.images, eight.captions, control, **options)
    assert all(torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in frozen.items())   # the base frozen
    assert log.trainable == sum(p.numel() for p in net.parameters()) and not net.training
    assert any(z.any() for z in net.zero_convs.parameters())                               # off zero at once
    path = tmp_path / "controlnet.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit_controlnet(tiny_pipe, eight.images, eight.captions, control, checkpoint_path=path, checkpoint_every=2,
                       callback=_stop_at(3), **options)
    again, log2 = fit_controlnet(tiny_pipe, eight.images, eight.captions, control, checkpoint_path=path,
                                 checkpoint_every=2, **options)
    assert log2.losses == log.losses
    for a, b in zip(again.parameters(), net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"different run.*data"):
        fit_controlnet(tiny_pipe, eight.images, eight.captions, controls.make_control(eight.images, "canny"),
                       checkpoint_path=path, **options)
    with pytest.raises(ValueError, match="one control image per latent; got 4 for 8"):
        fit_controlnet(tiny_pipe, eight.images, eight.captions, control[:4], **options)
