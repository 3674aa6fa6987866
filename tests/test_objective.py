"""The one training objective (course_lib.forward.diffusion_loss), min-SNR-gamma weighting, zero-terminal-SNR
schedules (Lin et al. 2024, checked against diffusers' implementation) and the finite-input check."""

from __future__ import annotations

import pytest
import torch

from course_lib.forward import PREDICTIONS, check_images, diffusion_loss, q_sample, snr_weight
from course_lib.schedules import cosine_schedule, linear_schedule, make_schedule, rescale_zero_terminal_snr


def identity_model(x, t, *cond):
    return x * 0.5


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusion_loss_is_the_definition(prediction):
    schedule = linear_schedule(100)
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    terms = diffusion_loss(identity_model, schedule, x0, prediction=prediction, generator=g)
    g = torch.Generator().manual_seed(0)                  # the same draws by hand: t first, then noise
    t = torch.randint(0, 100, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = schedule.alphas_cumprod[t].float()[:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    assert torch.allclose(terms.x_t, q_sample(schedule, x0, t, noise=eps), atol=1e-6)
    assert torch.allclose(terms.x_t, xt, atol=1e-6)
    assert terms.loss.item() == pytest.approx(torch.nn.functional.mse_loss(0.5 * xt, target).item(), rel=1e-5)


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    assert torch.equal(snr_weight("epsilon", snr, None), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(snr_weight("epsilon", snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    assert torch.allclose(snr_weight("x0", snr, 5.0), torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64))
    assert torch.allclose(snr_weight("v", snr, 5.0), torch.tensor([0, 0.5 / 1.5, 5 / 6, 5 / 51], dtype=torch.float64))
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        snr_weight("v", snr, 0.0)


def test_weighted_loss_weights_each_sample():
    schedule = cosine_schedule(50)
    x0 = torch.zeros(4, 1, 2, 2)
    plain = diffusion_loss(identity_model, schedule, x0, prediction="epsilon", generator=torch.Generator().manual_seed(1))
    weighted = diffusion_loss(identity_model, schedule, x0, prediction="epsilon",
                              generator=torch.Generator().manual_seed(1), min_snr_gamma=1.0)
    snr = schedule.snr[torch.randint(0, 50, (4,), generator=torch.Generator().manual_seed(1))]
    expected = plain.per_sample * snr_weight("epsilon", snr, 1.0).float()
    assert torch.allclose(weighted.per_sample, expected, rtol=1e-5)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference

    for base in (linear_schedule(1000), make_schedule("scaled_linear", 1000), cosine_schedule(1000)):
        ours = rescale_zero_terminal_snr(base)
        theirs = reference(base.betas.clone())              # in float64, as ours
        assert ours.zero_terminal_snr and ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1
        assert ours.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
        assert torch.allclose(ours.betas, theirs, rtol=1e-9, atol=1e-12)
        assert ours.name.endswith("_zero_snr") and not base.zero_terminal_snr


def test_zero_terminal_snr_needs_a_falling_schedule():
    with pytest.raises(ValueError, match="at least 2 steps"):
        rescale_zero_terminal_snr(linear_schedule(1))
    assert make_schedule("linear", 10, zero_terminal_snr=True).zero_terminal_snr


def test_nan_and_inf_images_are_refused():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite value"):
        check_images(x)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        q_sample(linear_schedule(10), x, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        diffusion_loss(identity_model, linear_schedule(10), x * 1.0, generator=torch.Generator())
