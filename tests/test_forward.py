"""The forward process from first principles: Monte Carlo moments, variance, and Bayes' rule."""

import math

import numpy as np
import pytest
import torch

from course_lib import forward
from course_lib.schedules import KINDS, make_schedule

# Three fixed "pixels" of a clean image; each is followed by N independent chains.
PIXELS = torch.tensor([-1.0, 0.3, 1.0])
N = 20_000
CHECK_T = (0, 10, 100, 199)  # includes the first and last step of a T = 200 schedule


def _x0_batch(n: int = N) -> torch.Tensor:
    """(n, 1, 1, 3): the same three-pixel image n times."""
    return PIXELS.reshape(1, 1, 1, 3).expand(n, 1, 1, 3).contiguous()


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, var: float, what: str):
    """Per-pixel sample mean and variance over the batch, within 5 standard errors of the truth.

    x_t is Gaussian here, so SE(mean) = sqrt(var / n) and SE(sample variance) = var * sqrt(2 / (n - 1)).
    With fixed seeds the test is deterministic; 5 SE leaves a ~1e-6 chance per check of a false alarm
    for any other seed.
    """
    n = x.shape[0]
    x = x.double().reshape(n, -1)
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2 / (n - 1))
    assert (x.mean(0) - mean).abs().max().item() < 5 * se_mean, f"{what}: mean"
    assert (x.var(0) - var).abs().max().item() < 5 * se_var, f"{what}: variance"


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_markov_chain_matches_closed_form(kind):
    s = make_schedule(kind, 200)
    x0 = _x0_batch()
    gen = torch.Generator().manual_seed(1)
    seen = []
    for t, xt in forward.q_chain(s, x0, generator=gen):
        seen.append(t)
        if t in CHECK_T:
            abar = s.alphas_cumprod[t].item()
            # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
            _assert_moments(xt, math.sqrt(abar) * PIXELS.double(), 1 - abar, f"{kind} chain t={t}")
    assert seen == list(range(200))  # one x_t per step, t = 0 .. T-1


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_repeated_q_step_matches_closed_form(kind):
    s = make_schedule(kind, 200)
    x = _x0_batch()
    gen = torch.Generator().manual_seed(2)
    for t in range(s.T):
        x = forward.q_step(s, x, t, generator=gen)
        if t in CHECK_T:
            abar = s.alphas_cumprod[t].item()
            _assert_moments(x, math.sqrt(abar) * PIXELS.double(), 1 - abar, f"{kind} q_step t={t}")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_moments(kind):
    s = make_schedule(kind, 200)
    x0 = _x0_batch()
    gen = torch.Generator().manual_seed(3)
    for t in CHECK_T:
        xt = forward.q_sample(s, x0, t, generator=gen)
        abar = s.alphas_cumprod[t].item()
        _assert_moments(xt, math.sqrt(abar) * PIXELS.double(), 1 - abar, f"{kind} q_sample t={t}")


# --- variance preservation ------------------------------------------------------------------

def test_q_sample_preserves_unit_variance():
    # x0 = random signs +-1: unit variance, inside [-1, 1], independent of the noise.
    n = 100_000
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 2, (n, 1, 1, 1), generator=gen).float() * 2 - 1
    # Var(x_t^2) <= 2 for this mixture, so the sample variance has SE <= sqrt(2 / n); allow 5 SE.
    tol = 5 * math.sqrt(2 / n)
    for kind in KINDS:
        s = make_schedule(kind, 1000)
        for t in (0, 250, 500, 999):
            xt = forward.q_sample(s, x0, t, generator=gen)
            assert abs(xt.double().var().item() - 1) < tol, (kind, t)


def test_vp_mix_keeps_variance_but_linear_mix_does_not():
    n = 100_000
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 2, (n, 1, 1, 1), generator=gen).float() * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    tol = 5 * math.sqrt(2 / n)  # as above
    # Linear mix at level 0.5: 0.5^2 Var(x0) + 0.5^2 Var(noise) = 0.25 + 0.25 = 0.5.
    assert abs(forward.linear_mix(x0, noise, 0.5).var().item() - 0.5) < tol
    # Variance-preserving mix at alpha-bar 0.5: 0.5 + 0.5 = 1.
    assert abs(forward.vp_mix(x0, noise, 0.5).var().item() - 1.0) < tol


# --- the posterior q(x_{t-1} | x_t, x_0) against Bayes' rule ---------------------------------

def _bayes_on_grid(s, x0: float, xt: float, t: int, points: int = 20_001):
    """Mean and variance of p(x_{t-1}) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), by summing on a 1-D grid."""
    beta, alpha = s.betas[t].item(), s.alphas[t].item()
    abar_prev = s.alphas_cumprod[t - 1].item()
    prior_mean, prior_std = math.sqrt(abar_prev) * x0, math.sqrt(1 - abar_prev)     # q(x_{t-1} | x_0)
    lik_mean, lik_std = xt / math.sqrt(alpha), math.sqrt(beta / alpha)              # q(x_t | x_{t-1}) in x_{t-1}
    # The posterior lies between the two means and is narrower than either: this window holds it all.
    lo = min(prior_mean - 12 * prior_std, lik_mean - 12 * lik_std)
    hi = max(prior_mean + 12 * prior_std, lik_mean + 12 * lik_std)
    x = np.linspace(lo, hi, points)
    log_p = (-(xt - math.sqrt(alpha) * x) ** 2 / (2 * beta)
             - (x - prior_mean) ** 2 / (2 * prior_std ** 2))
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    mean = (p * x).sum()
    return mean, (p * (x - mean) ** 2).sum()


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_matches_bayes_rule(kind):
    T = 1000
    s = make_schedule(kind, T)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.tensor([-0.8, 0.1, 0.7], dtype=torch.float64).reshape(3, 1, 1, 1)
    for t in (1, 2, 100, 500, T - 1):
        xt = forward.q_sample(s, x0, t, generator=gen)  # a plausible observation at step t
        mean, var = forward.q_posterior(s, x0, xt, t)
        for i in range(3):
            m_grid, v_grid = _bayes_on_grid(s, x0[i].item(), xt[i].item(), t)
            # The grid has >= 20 points per posterior std, where a Riemann sum of a Gaussian is accurate
            # to far below 1e-9; 1e-6 relative leaves room for the float64 closed form.
            assert mean[i].item() == pytest.approx(m_grid, rel=1e-6, abs=1e-9), (t, i)
            assert var.flatten()[0].item() == pytest.approx(v_grid, rel=1e-6), (t, i)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_at_t0_is_x0_with_zero_variance(kind):
    s = make_schedule(kind, 1000)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    xt = forward.q_sample(s, x0, 0, generator=gen)
    mean, var = forward.q_posterior(s, x0, xt, 0)
    assert var.item() == 0.0
    # coef1 = beta_0 / (1 - abar_0) with abar_0 = 1 - beta_0: 1 up to float64 rounding.
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-12)


def test_q_posterior_batched_timesteps():
    # One timestep per image gives the same answer as each image on its own.
    s = make_schedule("cosine", 1000)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.rand(3, 1, 2, 2, generator=gen) * 2 - 1
    xt = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 5, 999])
    mean, var = forward.q_posterior(s, x0, xt, t)
    for i in range(3):
        m_i, v_i = forward.q_posterior(s, x0[i:i + 1], xt[i:i + 1], int(t[i]))
        torch.testing.assert_close(mean[i:i + 1], m_i)
        torch.testing.assert_close(var[i].flatten()[0], v_i)


# --- q_step is Eq. 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_q_step_formula(kind):
    s = make_schedule(kind, 1000)
    gen = torch.Generator().manual_seed(9)
    x_prev = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(x_prev.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    got = forward.q_step(s, x_prev, t, noise=noise)
    for i, ti in enumerate(t.tolist()):
        beta = s.betas[ti].item()
        expected = math.sqrt(1 - beta) * x_prev[i] + math.sqrt(beta) * noise[i]  # N(sqrt(alpha) x, beta)
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)  # float64 throughout


def test_q_sample_formula_and_seeded_noise():
    s = make_schedule("linear", 1000)
    x0 = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10))
    abar = s.alphas_cumprod[300].item()
    expected = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    torch.testing.assert_close(forward.q_sample(s, x0, 300, noise=noise), expected, rtol=1e-6, atol=1e-6)  # float32
    # The same generator seed gives the same noise as passing it explicitly.
    seeded = forward.q_sample(s, x0, 300, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(seeded, expected, rtol=1e-6, atol=1e-6)


# --- bad input ----------------------------------------------------------------------------

S = make_schedule("linear", 1000)


def test_3d_image_raises_with_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        forward.q_sample(S, torch.zeros(3, 8, 8), 5)


def test_0_255_image_raises_with_expected_range():
    x = torch.full((1, 3, 8, 8), 200.0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        forward.q_sample(S, x, 5)


def test_uint8_image_raises_type_error():
    with pytest.raises(TypeError, match="float"):
        forward.q_sample(S, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="x_prev must be a float tensor.*to_model_range"):
        forward.q_step(S, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 5)


def test_noise_of_wrong_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        forward.q_sample(S, torch.zeros(2, 3, 8, 8), 5, noise=torch.zeros(2, 3, 8, 7))
    with pytest.raises(ValueError, match="shape"):
        forward.q_step(S, torch.zeros(2, 3, 8, 8), 5, noise=torch.zeros(1, 3, 8, 8))


def test_timestep_T_raises_naming_range():
    x = torch.zeros(1, 3, 8, 8)
    for fn in (forward.q_sample, forward.q_step):
        with pytest.raises(ValueError, match=r"0\.\.999"):
            fn(S, x, 1000)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        forward.q_posterior(S, x, x, 1000)


def test_posterior_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        forward.q_posterior(S, torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4), 5)
