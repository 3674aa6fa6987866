"""Image editing with the shipped tiny SD: img2img's strength at both ends and in between, inpainting keeps what
it should, DDIM inversion reconstructs and edits, and bad arguments get clear errors.

Bounds come from runs of the shipped checkpoints on the first 8 held-out emoji at 32 px (10 or 20 steps, seed 0,
one CPU thread); each test says what it measured."""

from __future__ import annotations

import pytest
import torch

from course_lib.data import load_emoji
from course_lib.editing import edit_with_inversion, img2img, img2img_timesteps, inpaint, invert, latent_mask
from course_lib.metrics import psnr
from course_lib.pipeline import TextToImage, text_to_image
from course_lib.sampling import timesteps
from course_lib.vae import encode_latents

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return TextToImage.from_shipped()


@pytest.fixture(scope="module")
def emoji():
    ds = load_emoji(size=32, split="heldout", limit=8)
    return ds.images, ds.captions


@pytest.fixture(scope="module")
def round_trip(pipe, emoji):
    """decode(encode(x)): the best any edit can do (posterior mean, as the editing functions encode)."""
    return pipe.decode(encode_latents(pipe.vae, emoji[0], pipe.scale_factor))


def mse(a, b, where=None):
    d = (a - b).pow(2)
    return (d.mean() if where is None else d[where.expand_as(d)].mean()).item()


# --- img2img -----------------------------------------------------------------------------------------------

def test_strength_picks_the_tail_of_the_grid(pipe):
    grid = timesteps(pipe.schedule, 10)                                     # 999, 899, ..., 99
    assert img2img_timesteps(pipe, 0.0, 10).numel() == 0
    assert torch.equal(img2img_timesteps(pipe, 1.0, 10), grid)
    assert torch.equal(img2img_timesteps(pipe, 0.3, 10), grid[-3:])         # [299, 199, 99]
    assert img2img_timesteps(pipe, 0.25, 10).numel() == 3                   # 2.5 rounds up
    for n, strength in [(30, 0.3), (7, 0.5), (13, 0.6)]:                  # k T / n not whole
        full, k = timesteps(pipe.schedule, n), round(strength * n + 1e-9)
        run = img2img_timesteps(pipe, strength, n)
        assert len(run) == k and run[0] == full[n - k]                      # starts exactly where diffusers does
        assert (run - full[n - k:]).abs().max() <= 1                        # and then within one of its tail


def test_strength_zero_is_the_vae_round_trip(pipe, emoji, round_trip):
    images, captions = emoji
    out = img2img(pipe, images, captions, strength=0.0, steps=10)
    torch.testing.assert_close(out, round_trip, atol=1e-5, rtol=0)
    torch.testing.assert_close(psnr(out, images), psnr(round_trip, images), atol=1e-4, rtol=0)  # 23.3 dB mean


def test_strength_one_is_plain_generation_with_the_same_seed(pipe, emoji):
    images, captions = emoji
    out = img2img(pipe, images, captions, strength=1.0, steps=10, seed=3)
    torch.testing.assert_close(out, pipe(captions, seed=3, steps=10), atol=1e-6, rtol=0)   # 0.0 seen


def test_less_strength_stays_closer_to_the_input(pipe, emoji):
    # Mean MSE to the input with the shipped (8,012-step) tiny SD, no guidance (scale 1): 0.035 at 0.1, 0.065 at
    # 0.3, 0.093 at 0.5, 0.137 at 0.9; every one of the 8 images closer at 0.3 than at 0.9. The VAE round trip
    # alone: 0.011. At guidance 4 the prompt's pull dominates even a short run (0.147 at 0.1, 0.182 at 0.9, the
    # images' own captions), so the strength is tested without guidance.
    images, captions = emoji
    low = img2img(pipe, images, captions, strength=0.3, steps=10, guidance_scale=1.0)
    high = img2img(pipe, images, captions, strength=0.9, steps=10, guidance_scale=1.0)
    assert mse(low, images) < 0.7 * mse(high, images)
    per_image = lambda x: (x - images).pow(2).flatten(1).mean(1)
    assert (per_image(low) < per_image(high)).all()
    assert mse(low, images) > 0.011                                         # it did change the image


def test_img2img_passes_the_negative_prompt_and_is_seeded(pipe, emoji):
    images, captions = emoji[0][:2], emoji[1][:2]
    a = img2img(pipe, images, captions, strength=0.6, steps=10, seed=1)
    assert torch.equal(a, img2img(pipe, images, captions, strength=0.6, steps=10, seed=1))
    assert not torch.allclose(a, img2img(pipe, images, captions, strength=0.6, steps=10, seed=2))
    assert not torch.allclose(a, img2img(pipe, images, captions, strength=0.6, steps=10, seed=1,
                                         negative_prompt="crying face"))


# --- inpainting --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hole():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1                                               # the central 16 x 16: 4 x 4 latent cells
    return mask


@pytest.fixture(scope="module")
def repainted(pipe, emoji, hole):
    return inpaint(pipe, emoji[0], hole, "red heart", steps=10, seed=0)


def test_the_mask_is_max_pooled_to_the_latent_grid(pipe, emoji):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 9:23, 9:23] = 1                                               # touches latent cells 2..5 (4 px each)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:6, 2:6] = 1
    assert torch.equal(latent_mask(pipe, mask, emoji[0]), expected)


def test_inpainting_keeps_the_known_latents_exactly(pipe, emoji, hole):
    images = emoji[0]
    z = inpaint(pipe, images, hole, "red heart", steps=10, seed=0, return_latents=True)
    z0 = encode_latents(pipe.vae, images, pipe.scale_factor)
    keep = latent_mask(pipe, hole, images) == 0
    assert torch.equal(z[keep.expand_as(z)], z0[keep.expand_as(z0)])
    assert mse(z, z0, ~keep) > 0.5                                          # repainted: 1.13 seen


def test_inpainting_keeps_the_unmasked_pixels(pipe, emoji, round_trip, hole, repainted):
    # Outside the hole, against the VAE round trip: MSE 0.049 seen (0.017 more than 4 px from the hole). The
    # latents there are exactly the input's (test above), but the decoder's 3x3 convolutions and its
    # self-attention at 8 x 8 carry the repainted cells into their neighbours. An unrelated image ("red heart"
    # generated from seed 0) is 0.37 away there. Inside, "red heart" is 0.42 from the input, where the round
    # trip is 0.038.
    images = emoji[0]
    keep = hole == 0
    assert mse(repainted, round_trip, keep) < 0.08
    assert mse(repainted, pipe(["red heart"] * 8, seed=0, steps=10), keep) > 0.2
    assert mse(repainted, images, ~keep) > 0.2
    kept = inpaint(pipe, images, hole, "red heart", steps=10, seed=0, keep_pixels=True)
    assert torch.equal(kept[keep.expand_as(kept)], images[keep.expand_as(images)])
    torch.testing.assert_close(kept[(~keep).expand_as(kept)], repainted[(~keep).expand_as(kept)])


def test_repaint_resampling_runs_and_changes_the_result(pipe, emoji, round_trip, hole, repainted):
    # resample=2 differs from 1 by MSE 0.005 overall; outside the hole it is as close to the round trip (0.048)
    images = emoji[0][:4]
    twice = inpaint(pipe, images, hole, "red heart", steps=10, seed=0, resample=2)
    assert not torch.allclose(twice, repainted[:4], atol=1e-3)
    assert mse(twice, round_trip[:4], hole == 0) < 0.08


# --- inversion ---------------------------------------------------------------------------------------------

def test_inversion_then_sampling_reconstructs(pipe, emoji, round_trip):
    # PSNR to the round trip at 20 steps (mean / worst of 8): 35.9 / 33.9 dB from start_t 599 (abar 0.19),
    # 29.6 / 27.4 dB from T-1 (abar 0.0047, the model's errors amplified by 1 / sqrt(abar) = 15); at 50 steps
    # 42.7 / 40.7 and 36.6 / 34.8 dB. Generating from fresh noise with the same prompts: 14.3 dB.
    images, captions = emoji
    mid = psnr(edit_with_inversion(pipe, images, captions, captions, steps=20, start_t=599), round_trip)
    top = psnr(edit_with_inversion(pipe, images, captions, captions, steps=20), round_trip)
    fresh = psnr(pipe(captions, seed=0, steps=20, guidance_scale=1.0), round_trip)
    assert mid.min() > 31 and top.min() > 25
    assert mid.mean() > top.mean() + 3
    assert top.mean() > fresh.mean() + 10


def test_inverted_latents_sample_back_and_guidance_drifts(pipe, emoji, round_trip):
    # First 4 images, from 599 at 20 steps: 35.6 dB at guidance 1, 31.7 dB with guidance 3 both ways, 12.0 dB
    # from fresh noise at 599
    images, captions = emoji[0][:4], emoji[1][:4]
    settings = pipe.sampler_settings.replace(steps=20, guidance_scale=1.0, start_t=599)
    z = invert(pipe, images, captions, steps=20, start_t=599)
    assert z.shape == (4, *pipe.latent_shape)
    back = text_to_image(pipe.unet, pipe.schedule, pipe.encode, pipe.decode, captions, settings,
                         latent_shape=pipe.latent_shape, latents=z)
    same = edit_with_inversion(pipe, images, captions, captions, steps=20, start_t=599)
    torch.testing.assert_close(back, same, atol=1e-6, rtol=0)              # DDIM back from the inverted latents
    fresh = pipe(captions, settings=settings)                               # fresh noise at 599: no memory of it
    assert psnr(fresh, round_trip[:4]).mean() < psnr(same, round_trip[:4]).mean() - 10
    g1 = psnr(same, round_trip[:4])
    g3 = psnr(edit_with_inversion(pipe, images, captions, captions, steps=20, start_t=599, guidance_scale=3.0),
              round_trip[:4])
    assert g3.mean() < g1.mean() - 2


def test_editing_with_another_prompt_changes_the_image(pipe, emoji, round_trip):
    # From 599 at 20 steps: MSE to the round trip 0.0011 with the source prompts, 0.106 with "red heart"
    # (0.030 to 0.176 per image)
    images, captions = emoji
    same = edit_with_inversion(pipe, images, captions, captions, steps=20, start_t=599)
    other = edit_with_inversion(pipe, images, captions, "red heart", steps=20, start_t=599)
    assert mse(other, round_trip) > 20 * mse(same, round_trip)
    assert ((other - round_trip).pow(2).flatten(1).mean(1) > 0.01).all()


# --- errors ------------------------------------------------------------------------------------------------

def test_bad_arguments_get_clear_errors(pipe, emoji, hole):
    images, captions = emoji
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        img2img(pipe, images, captions, strength=1.5)
    with pytest.raises(ValueError, match=r"prompts: give one for every image, or one per image \(8\); got 3"):
        img2img(pipe, images, captions[:3], strength=0.5)
    with pytest.raises(ValueError, match=r"negative_prompt: give one for every image, or one per image \(8\)"):
        inpaint(pipe, images, hole, captions, negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match=r"target_prompts: give one for every image, or one per image \(8\)"):
        edit_with_inversion(pipe, images, captions, ["a", "b"], steps=2)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\)"):
        img2img(pipe, images[:, :, :16, :16], captions, strength=0.5)
    with pytest.raises(ValueError, match=r"images must hold values in \[-1, 1\]"):
        img2img(pipe, images * 3, captions, strength=0.5)
    with pytest.raises(ValueError, match=r"mask must have shape \(8, 1, 32, 32\) or \(1, 1, 32, 32\)"):
        inpaint(pipe, images, torch.ones(8, 3, 32, 32), captions)
    with pytest.raises(ValueError, match=r"mask must have shape \(8, 1, 32, 32\) or \(1, 1, 32, 32\)"):
        inpaint(pipe, images, torch.ones(2, 1, 32, 32), captions)
    with pytest.raises(ValueError, match=r"mask must hold values in \[0, 1\]"):
        inpaint(pipe, images, hole * 2, captions)
    with pytest.raises(ValueError, match=r"resample must be an int >= 1 \(RePaint's U"):
        inpaint(pipe, images, hole, captions, resample=0)
