"""Sampling and DDIM inversion from a start timestep (for editing: SDEdit's strength), and zero terminal SNR in the
samplers: an epsilon model refused where abar = 0, a v model sampled from there."""

from __future__ import annotations

import pytest
import torch

from course_lib.forward import q_sample
from course_lib.pipeline import SamplerSettings
from course_lib.sampling import ddim_invert, sample, timesteps
from course_lib.schedules import cosine_schedule, linear_schedule, make_schedule

SCHEDULE = linear_schedule(1000)
TARGET = torch.rand(2, 3, 4, 4) * 2 - 1                  # the data: exactly these two images


def exact_eps(schedule):
    """The exact noise prediction when the data are the point TARGET: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    def model(x, t):
        ab = schedule.alphas_cumprod[t].to(x)[:, None, None, None]
        return (x - ab.sqrt() * TARGET) / (1 - ab).sqrt()
    return model


def exact_v(schedule):
    def model(x, t):
        ab = schedule.alphas_cumprod[t].to(x)[:, None, None, None]
        eps = (x - ab.sqrt() * TARGET) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * TARGET
    return model


def test_start_lays_the_grid_over_zero_to_start():
    assert torch.equal(timesteps(SCHEDULE, 20, start=999), timesteps(SCHEDULE, 20))
    ts = timesteps(SCHEDULE, 10, start=499)
    assert ts[0] == 499 and ts[-1] >= 0 and (ts[1:] < ts[:-1]).all() and len(ts) == 10
    for spacing in ("leading", "linspace"):
        ts = timesteps(SCHEDULE, 5, spacing, start=299)
        assert ts.max() <= 299 and len(ts) == 5
    with pytest.raises(ValueError, match=r"start must be an int from 0 to 999 \(the first timestep, below T=1000\)"):
        timesteps(SCHEDULE, 10, start=1000)
    with pytest.raises(ValueError, match=r"steps must be an int from 1 to 50 \(start \+ 1\)"):
        timesteps(SCHEDULE, 51, start=49)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "ddpm"])
def test_sampling_from_a_start_timestep_lands_on_the_data(sampler):
    start = 400
    noise = torch.randn(TARGET.shape, generator=torch.Generator().manual_seed(0))
    x_start = q_sample(SCHEDULE, TARGET, start, noise=noise)
    out = sample(exact_eps(SCHEDULE), SCHEDULE, TARGET.shape, sampler=sampler, steps=10, x_T=x_start,
                 start_t=start, clip_x0=False, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, TARGET, atol=1e-4)


def test_inversion_to_a_start_timestep_round_trips():
    start = 600
    x_start = ddim_invert(exact_eps(SCHEDULE), SCHEDULE, TARGET, steps=15, start_t=start)
    assert not torch.allclose(x_start, TARGET, atol=1e-2)                  # it did go up in noise
    back = sample(exact_eps(SCHEDULE), SCHEDULE, TARGET.shape, sampler="ddim", steps=15, x_T=x_start,
                  start_t=start, clip_x0=False)
    assert torch.allclose(back, TARGET, atol=1e-4)


def test_zero_terminal_snr_needs_a_v_model_from_the_top():
    zsnr = make_schedule("cosine", 1000, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="an epsilon model cannot be asked at t=999: abar_t = 0"):
        sample(exact_eps(cosine_schedule(1000)), zsnr, TARGET.shape, steps=5, clip_x0=False)
    for sampler in ("ddim", "dpm++2m", "ddpm"):
        out = sample(exact_v(zsnr), zsnr, TARGET.shape, sampler=sampler, steps=8, clip_x0=False, prediction="v",
                     generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, TARGET, atol=1e-4), sampler


def test_sampler_settings_carry_the_start():
    settings = SamplerSettings(steps=10).replace(start_t=300)
    assert settings.options()["start_t"] == 300
    out = sample(exact_eps(SCHEDULE), SCHEDULE, TARGET.shape, x_T=q_sample(SCHEDULE, TARGET, 300),
                 prediction="epsilon", clip_x0=False, **settings.options())
    assert torch.allclose(out, TARGET, atol=1e-4)


def test_the_shipped_v_model_inverts_a_held_out_emoji():
    """DDIM inversion then sampling reconstructs held-out emoji with the trained zero-terminal-SNR v model, even from
    the very top; the epsilon model's round trip from there explodes (1 / sqrt(abar_999) ~ 20,000)."""
    from course_lib.checkpoint import shipped
    from course_lib.unet_file import load_model
    from course_lib.data import load_emoji

    x0 = load_emoji(size=32, split="heldout").images[:4]

    def round_trip(name, start):
        model, schedule, info = load_model(shipped(name))
        x = ddim_invert(model, schedule, x0, steps=25, prediction=info["prediction"], start_t=start)
        back = sample(model, schedule, x0.shape, sampler="ddim", steps=25, x_T=x, start_t=start, clip_x0=False,
                      prediction=info["prediction"])
        return (back - x0).pow(2).mean().sqrt().item()
    errors = {(name, start): round_trip(name, start) for name, start in
              [("ddpm_emoji32_v", 900), ("ddpm_emoji32_v", 999), ("ddpm_emoji32", 999)]}
    print(errors)
    assert errors["ddpm_emoji32_v", 900] < 0.12        # RMS in [-1, 1]; here 0.075, and 50 steps on 16 images: 0.035
    assert errors["ddpm_emoji32_v", 999] < 0.4         # 50 steps on 16 images: 0.20
    assert errors["ddpm_emoji32", 999] > 10            # 50 steps on 16 images: 1265, the flaw
