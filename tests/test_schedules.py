"""Noise schedules: shapes, boundary values, known constants, round trips, and diffusers."""

import math

import pytest
import torch

from course_lib import forward, schedules
from course_lib.schedules import KINDS, NoiseSchedule, make_schedule

# Every per-timestep table a NoiseSchedule holds.
TABLES = ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "snr", "log_snr", "posterior_variance",
          "posterior_mean_coef1", "posterior_mean_coef2")


# --- shape, dtype, boundary values and monotonicity -------------------------------------

@pytest.mark.parametrize("T", [1000, 10, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_tables_are_float64_of_length_T(kind, T):
    s = make_schedule(kind, T)
    assert len(s) == s.T == T
    for name in TABLES:
        table = getattr(s, name)
        assert table.dtype == torch.float64, name
        assert table.shape == (T,), name
        assert torch.isfinite(table).all(), name


@pytest.mark.parametrize("T", [1000, 10, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_boundaries_and_monotonicity(kind, T):
    s = make_schedule(kind, T)
    assert ((s.betas > 0) & (s.betas < 1)).all()
    ab = s.alphas_cumprod
    assert ((ab > 0) & (ab < 1)).all()
    assert (ab[1:] < ab[:-1]).all(), "alpha-bar must fall strictly: every step adds noise"
    assert (s.snr[1:] < s.snr[:-1]).all()
    # log_snr is exactly the log of snr (same float64 values, so a tight tolerance).
    torch.testing.assert_close(s.log_snr, s.snr.log(), rtol=1e-14, atol=0)
    # abar_{t-1} for t = 0 is 1 (no noise before the first step), so the posterior variance there is 0.
    assert s.alphas_cumprod_prev[0] == 1.0
    assert s.posterior_variance[0] == 0.0


# --- known values -----------------------------------------------------------------------

def test_linear_known_values():
    s = make_schedule("linear", 1000)
    # float64 linspace hits its end points to within rounding.
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # Evenly spaced: all differences equal (0.0199 / 999).
    torch.testing.assert_close(s.betas.diff(), torch.full((999,), 0.0199 / 999, dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_scaled_linear_known_values():
    T = 1001  # odd, so index T // 2 = 500 is exactly halfway along the linspace
    s = make_schedule("scaled_linear", T)
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # The square roots are linear, so the middle beta is the squared mean of the end roots.
    middle = ((math.sqrt(0.00085) + math.sqrt(0.012)) / 2) ** 2
    assert s.betas[T // 2].item() == pytest.approx(middle, rel=1e-12)
    # Not the same as the mean of the ends (that would be the plain linear schedule).
    assert s.betas[T // 2].item() < (0.00085 + 0.012) / 2


def _cosine_abar(t: int, T: int, s: float = 0.008) -> float:
    """Nichol & Dhariwal's closed form, normalised so abar before step 0 is 1; index t is step t+1."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t + 1) / f(0)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_matches_closed_form_where_not_clipped(T):
    s = make_schedule("cosine", T)
    clipped = s.betas >= 0.999
    # Only the last beta is clipped (abar(1) = cos^2(pi/2) = 0 would make it 1).
    assert clipped.tolist() == [False] * (T - 1) + [True]
    assert s.betas[-1].item() == pytest.approx(0.999, rel=1e-12)
    expected = torch.tensor([_cosine_abar(t, T) for t in range(T - 1)], dtype=torch.float64)
    # float64 products over <= 1000 steps: relative error far below 1e-10.
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected, rtol=1e-10, atol=0)


def test_cosine_spot_values_at_T_1000():
    s = make_schedule("cosine", 1000)
    for t in (0, 499, 998):
        assert s.alphas_cumprod[t].item() == pytest.approx(_cosine_abar(t, 1000), rel=1e-10)
    # Halfway through, a cosine schedule keeps about half the signal power (a linear one much less).
    assert 0.45 < s.alphas_cumprod[499].item() < 0.52
    assert make_schedule("linear", 1000).alphas_cumprod[499].item() < 0.1


# --- round trips --------------------------------------------------------------------------

def test_schedule_from_betas_round_trips():
    lin = schedules.linear_schedule(1000)
    again = schedules.schedule_from_betas(lin.betas.clone())
    for name in TABLES:
        torch.testing.assert_close(getattr(again, name), getattr(lin, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_from_alphas_cumprod_recovers_betas(kind):
    s = make_schedule(kind, 1000)
    again = schedules.schedule_from_alphas_cumprod(s.alphas_cumprod)
    # beta = 1 - abar_t / abar_{t-1} loses only a few float64 ulps of 1.
    torch.testing.assert_close(again.betas, s.betas, rtol=0, atol=1e-12)


def test_schedule_from_alphas_cumprod_rejects_increasing_curve():
    with pytest.raises(ValueError, match="non-increasing"):
        schedules.schedule_from_alphas_cumprod(torch.tensor([0.9, 0.95, 0.5]))


# --- cross-check against diffusers ------------------------------------------------------------

# (our kind, diffusers' beta_schedule, the beta range to pass to diffusers). DDPMScheduler's
# default range is linear's 1e-4..0.02, so scaled_linear needs Stable Diffusion's range spelled out.
DIFFUSERS = [
    ("linear", "linear", {}),
    ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("cosine", "squaredcos_cap_v2", {}),
]


@pytest.fixture(scope="module")
def DDPMScheduler():
    return pytest.importorskip("diffusers").DDPMScheduler


@pytest.mark.parametrize("ours,theirs,beta_range", DIFFUSERS)
def test_tables_match_diffusers(DDPMScheduler, ours, theirs, beta_range):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **beta_range)
    s = make_schedule(ours, 1000)
    # diffusers stores float32: betas are float64 values rounded once (relative error <= 6e-8,
    # a little more for scaled_linear, which squares a float32 linspace).
    torch.testing.assert_close(ref.betas.double(), s.betas, rtol=1e-6, atol=1e-9)
    # Its alphas_cumprod is a float32 cumprod over 1000 steps: rounding errors accumulate to a
    # few 1e-7 absolute (measured <= 5e-7), so 1e-6 absolute + 1e-6 relative.
    torch.testing.assert_close(ref.alphas_cumprod.double(), s.alphas_cumprod, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ours,theirs,beta_range", DIFFUSERS)
def test_q_sample_matches_diffusers_add_noise(DDPMScheduler, ours, theirs, beta_range):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **beta_range)
    s = make_schedule(ours, 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    t[0], t[1] = 0, 999  # include both ends
    expected = ref.add_noise(x0, noise, t)
    got = forward.q_sample(s, x0, t, noise=noise)
    assert got.dtype == torch.float32
    # float32 throughout; near t = 0 diffusers' sqrt(1 - abar) from a float32 abar ~ 0.9999 keeps only
    # ~4 significant digits (about 3e-6 absolute), times |noise| up to ~4: measured max 7e-6.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------

def test_unknown_kind_lists_every_valid_kind():
    with pytest.raises(ValueError) as info:
        make_schedule("quadratic")
    message = str(info.value)
    assert "quadratic" in message
    for kind in KINDS:
        assert kind in message


@pytest.mark.parametrize("T", [0, -5, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_T_raises(kind, T):
    with pytest.raises(ValueError, match=rf"T \(number of steps\) must be an int >= 1; got {T}$"):
        make_schedule(kind, T)


@pytest.mark.parametrize("builder", [schedules.linear_schedule, schedules.scaled_linear_schedule])
def test_beta_start_above_beta_end_raises(builder):
    with pytest.raises(ValueError, match="beta_start"):
        builder(100, beta_start=0.02, beta_end=0.01)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan")])
def test_noise_schedule_rejects_betas_outside_open_interval(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.01, bad, 0.02]))


@pytest.mark.parametrize("T", [1000, 10])
@pytest.mark.parametrize("t", ["minus_one", "T"])
def test_out_of_range_timestep_names_valid_range(T, t):
    s = make_schedule("linear", T)
    t = -1 if t == "minus_one" else T
    x = torch.zeros(1, 3, 4, 4)
    valid = f"0..{T - 1}"  # e.g. "0..999"
    with pytest.raises(ValueError, match=valid):
        s.check_timesteps(t)
    with pytest.raises(ValueError, match=valid):
        s.extract(s.betas, torch.tensor([t]), x)


def test_float_timesteps_raise_type_error():
    s = make_schedule("linear", 1000)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(TypeError, match=r"timesteps must be integers 0\.\.999; got dtype torch\.float32"):
        s.check_timesteps(5.0)
    with pytest.raises(TypeError, match=r"timesteps must be integers 0\.\.999; got dtype torch\.float32"):
        s.extract(s.betas, torch.tensor([1.0, 2.0]), x)


def test_extract_batch_mismatch_raises():
    s = make_schedule("linear", 1000)
    with pytest.raises(ValueError, match="batch"):
        s.extract(s.betas, torch.tensor([1, 2, 3]), torch.zeros(2, 3, 4, 4))


def test_extract_shapes_and_dtype():
    s = make_schedule("linear", 1000)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    v = s.extract(s.betas, torch.tensor([0, 10, 999]), x)
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float32
    torch.testing.assert_close(v.flatten(), s.betas[[0, 10, 999]].float())
    # A single int gives a scalar that broadcasts against any batch.
    assert s.extract(s.betas, 7, x).shape == ()
