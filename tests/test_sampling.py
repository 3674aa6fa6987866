"""Samplers against diffusers' schedulers, step by step, and against first principles: for Gaussian data
the optimal denoiser and the probability-flow ODE's solution are known in closed form."""

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from course_lib import pipeline, sampling
from course_lib.forward import PREDICTIONS, prediction_target
from course_lib.schedules import make_schedule, schedule_from_betas

T = 1000
SHAPE = (2, 3, 4, 4)
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
# diffusers' DPM-Solver passes a tensor to np.array (a numpy 2 deprecation inside diffusers, not ours).
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed linear function of x_t and t: not a good denoiser, but any rule mismatch shows up.
    At high noise its x0 estimate leaves [-1, 1], so clipping is exercised too."""
    tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / T
    w = torch.linspace(-0.5, 0.5, x[0].numel(), dtype=x.dtype, device=x.device).reshape(x.shape[1:])
    return 0.9 * x + 0.3 * tt * w - 0.1 * tt


# --- Gaussian data: the exact denoiser ------------------------------------------------------------
# x0 ~ N(mu, S^2 I) and x_t = a x0 + s eps (a^2 = abar_t, s^2 = 1 - abar_t) are jointly Gaussian, so
#   E[eps | x_t] = s (x_t - a mu) / (a^2 S^2 + s^2),   E[x0 | x_t] = mu + a S^2 (x_t - a mu) / (a^2 S^2 + s^2).
# These are the minimisers of the training losses: a perfectly trained network outputs them.

MU = torch.linspace(-0.4, 0.4, 16, dtype=torch.float64).reshape(1, 1, 4, 4)


def gaussian_model(schedule, S: float, prediction: str = "epsilon", mu: torch.Tensor = MU):
    ab = schedule.alphas_cumprod

    def model(x, t):
        abar = ab[t.cpu()].to(x).reshape(-1, 1, 1, 1)
        a, s, m = abar.sqrt(), (1 - abar).sqrt(), mu.to(x)
        var = abar * S ** 2 + s ** 2          # Var(x_t)
        eps = s * (x - a * m) / var
        x0 = m + a * S ** 2 * (x - a * m) / var
        return prediction_target(prediction, x0, eps, abar)
    return model


def ode_solution(schedule, S: float, x_T: torch.Tensor, t_start: int = T - 1) -> torch.Tensor:
    """Where the probability-flow ODE takes x_T (at t_start) at the clean end: for Gaussian data the flow
    is the affine map N(a mu, a^2 S^2 + s^2) -> N(mu, S^2), x_0 = mu + S (x_T - a mu) / sqrt(a^2 S^2 + s^2)."""
    abar = schedule.alphas_cumprod[t_start].item()
    return MU + S * (x_T - math.sqrt(abar) * MU) / math.sqrt(abar * S ** 2 + 1 - abar)


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


# --- timesteps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", sampling.SPACINGS)
def test_timesteps_match_diffusers(spacing):
    for n_train in (7, 50, 1000):
        schedule = make_schedule("linear", n_train)
        ref = DDIMScheduler(num_train_timesteps=n_train, timestep_spacing=spacing, steps_offset=0)
        for steps in range(1, n_train + 1):
            ours = sampling.timesteps(schedule, steps, spacing)
            assert ours.dtype == torch.long and len(ours) == steps
            assert (ours[1:] < ours[:-1]).all() and 0 <= ours.min() and ours.max() <= n_train - 1
            if spacing == "linspace" and steps == 1:
                assert ours.tolist() == [n_train - 1]  # diffusers gives [0]: one step from no noise at all
                continue
            ref.set_timesteps(steps)
            if spacing == "trailing" and len(ref.timesteps) == steps + 1:
                # numpy's float arange sometimes makes one element too many, and diffusers then asks
                # for timestep -1 (which wraps to T-1). Ours stops at `steps`.
                assert ref.timesteps[-1] == -1 and torch.equal(ours, ref.timesteps[:-1])
            else:
                assert torch.equal(ours, ref.timesteps), (n_train, steps)
    assert sampling.timesteps(make_schedule("linear", 1000), 4).tolist() == [999, 749, 499, 249]


# --- step by step against diffusers ----------------------------------------------------------------
# Options that make the comparison apples to apples:
#   set_alpha_to_one=True               DDIM's last step lands on abar = 1 (our t_next = -1)
#   use_clipped_model_output=True       DDIM recomputes eps from the clipped x0, as we do
#   variance_type="fixed_small"         DDPM adds the posterior variance beta~ (Ho et al. Eq. 7)
#   clip_sample=clip_x0                 both clamp x0 to [-1, 1], or both do not
#   thresholding=clip_x0, sample_max_value=1.0   DPM-Solver's way to clamp x0 to exactly [-1, 1]
#   final_sigmas_type="zero", lower_order_final  DPM-Solver's last step lands on x0_hat, first order
#   steps_offset=0                      "leading" timesteps as ours (SD uses an offset of 1)
# diffusers keeps its tables in float32. In float64 we give it our float64 alphas_cumprod (built from
# the same betas), so only the update rules are compared and agree to ~1e-12; in float32 both use
# their own tables and agree to ~1e-5. DPM-Solver computes in float32 whatever the input dtype.


def _our_steps(sampler, schedule, dtype, **kw):
    steps = list(sampling.reverse_process(fake_model, schedule, SHAPE, sampler=sampler, dtype=dtype,
                                          generator=torch.Generator().manual_seed(0), **kw))
    return [s.x_t for s in steps], [s.x0_hat for s in steps], [s.t for s in steps]


def _share_tables(ref, schedule, dtype):
    if dtype == torch.float64:
        ref.alphas_cumprod = schedule.alphas_cumprod.clone()
        ref.final_alpha_cumprod = ref.one = torch.tensor(1.0, dtype=torch.float64)


def _tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing,steps,eta", [("trailing", 50, 0.0), ("leading", 20, 0.0), ("trailing", 10, 0.5)])
def test_ddim_matches_diffusers_every_step(dtype, clip, spacing, steps, eta):
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True,
                        timestep_spacing=spacing, steps_offset=0)
    schedule = schedule_from_betas(ref.betas)
    _share_tables(ref, schedule, dtype)
    ref.set_timesteps(steps)
    xs, x0s, ts = _our_steps("ddim", schedule, dtype, steps=steps, eta=eta, spacing=spacing, clip_x0=clip)
    assert ts == ref.timesteps.tolist() + [-1]

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen, dtype=dtype)  # x_T first, then each step's noise: our order
    tol = _tolerance(dtype)
    for i, t in enumerate(ref.timesteps):
        torch.testing.assert_close(xs[i], x, rtol=0, atol=tol)
        out = ref.step(fake_model(x, t.repeat(SHAPE[0])), t, x, eta=eta, use_clipped_model_output=True,
                       generator=gen)
        torch.testing.assert_close(x0s[i], out.pred_original_sample, rtol=0, atol=tol)
        x = out.prev_sample
    torch.testing.assert_close(xs[-1], x, rtol=0, atol=tol)
    if clip:  # the fake model's x0 estimate at the first step leaves [-1, 1], so clipping was tested
        raw_x0, _ = sampling.denoise(fake_model, schedule, xs[0], ts[0], clip_x0=False)
        assert raw_x0.abs().max() > 1 and torch.equal(x0s[0], raw_x0.clamp(-1, 1))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_prediction_types_match_diffusers(prediction):
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing",
                        prediction_type=DIFFUSERS_PREDICTION[prediction])
    schedule = schedule_from_betas(ref.betas)
    _share_tables(ref, schedule, torch.float64)
    ref.set_timesteps(25)
    xs, _, _ = _our_steps("ddim", schedule, torch.float64, steps=25, prediction=prediction)
    x = xs[0]
    for t in ref.timesteps:
        x = ref.step(fake_model(x, t.repeat(SHAPE[0])), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(xs[-1], x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing,steps", [("trailing", 50), ("leading", 20), ("linspace", 13), ("trailing", 1000)])
def test_ddpm_matches_diffusers_every_step(dtype, clip, spacing, steps):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                        variance_type="fixed_small", timestep_spacing=spacing, steps_offset=0)
    schedule = schedule_from_betas(ref.betas)
    _share_tables(ref, schedule, dtype)
    ref.set_timesteps(steps)
    xs, x0s, ts = _our_steps("ddpm", schedule, dtype, steps=steps, spacing=spacing, clip_x0=clip)
    assert ts == ref.timesteps.tolist() + [-1]

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen, dtype=dtype)
    # At the last step diffusers still draws noise when t > 0 and scales it by sqrt(1e-20) (its variance
    # floor), where ours adds none: a 1e-10 difference at the very end, and nothing before it.
    tol = max(_tolerance(dtype), 1e-9)
    for i, t in enumerate(ref.timesteps):
        torch.testing.assert_close(xs[i], x, rtol=0, atol=tol)
        out = ref.step(fake_model(x, t.repeat(SHAPE[0])), t, x, generator=gen)
        torch.testing.assert_close(x0s[i], out.pred_original_sample, rtol=0, atol=tol)
        x = out.prev_sample
    torch.testing.assert_close(xs[-1], x, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing,steps", [("trailing", 5), ("trailing", 10), ("trailing", 50), ("leading", 8)])
def test_dpm_solver_matches_diffusers_every_step(dtype, clip, prediction, spacing, steps):
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", algorithm_type="dpmsolver++",
                                      solver_order=2, solver_type="midpoint", thresholding=clip,
                                      sample_max_value=1.0, final_sigmas_type="zero", lower_order_final=True,
                                      timestep_spacing="trailing",
                                      prediction_type=DIFFUSERS_PREDICTION[prediction])
    schedule = schedule_from_betas(ref.betas)
    if spacing == "trailing":
        ref.set_timesteps(steps)
    else:  # DPM-Solver's own "leading" differs from DDIM's; hand it ours
        ref.set_timesteps(timesteps=sampling.timesteps(schedule, steps, spacing).tolist())
    if dtype == torch.float64:  # its sigma = sqrt((1 - abar) / abar), from our float64 table, then 0 at the end
        abar = schedule.alphas_cumprod[ref.timesteps]
        ref.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    xs, _, ts = _our_steps("dpm++2m", schedule, dtype, steps=steps, spacing=spacing, clip_x0=clip,
                           prediction=prediction)
    assert ts == ref.timesteps.tolist() + [-1]
    # DPM-Solver computes x in float32 whatever the input; with float32 tables, 1 - abar near t = 0 loses
    # digits (abar = 0.9999), which its second-order term amplifies: hence 1e-4 there.
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    x = xs[0]
    for i, t in enumerate(ref.timesteps):
        torch.testing.assert_close(xs[i], x, rtol=tol, atol=tol, check_dtype=False)
        x = ref.step(fake_model(x, t.repeat(SHAPE[0])), t, x).prev_sample
    torch.testing.assert_close(xs[-1], x, rtol=tol, atol=tol, check_dtype=False)


def test_ddim_inversion_matches_diffusers():
    ref = DDIMInverseScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False,
                               set_alpha_to_one=True, timestep_spacing="trailing")
    schedule = schedule_from_betas(ref.betas)
    ref.alphas_cumprod, ref.initial_alpha_cumprod = schedule.alphas_cumprod.clone(), torch.tensor(1.0)
    ref.set_timesteps(20)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    x = x0
    for t in ref.timesteps:  # ascending; the model is asked at the timestep the step lands on
        x = ref.step(fake_model(x, t.repeat(SHAPE[0])), t, x).prev_sample
    torch.testing.assert_close(sampling.ddim_invert(fake_model, schedule, x0, steps=20), x, rtol=0, atol=1e-10)


# --- first principles with the exact Gaussian denoiser ----------------------------------------------

def test_ode_solvers_converge_to_the_exact_flow():
    S = 0.5
    schedule = make_schedule("cosine", T)
    model = gaussian_model(schedule, S)
    x_T = torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = ode_solution(schedule, S, x_T)
    errors = {name: [] for name in ("ddim", "dpm++2m")}
    for steps in (5, 10, 20, 40):
        for name in errors:
            x0 = sampling.sample(model, schedule, x_T.shape, sampler=name, steps=steps, x_T=x_T,
                                 dtype=torch.float64, clip_x0=False)
            errors[name].append(rms(x0 - exact))
    for name, errs in errors.items():
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
    # DDIM is first order: doubling the steps halves its error (measured ratios 1.9-1.95).
    assert all(1.7 < a / b < 2.3 for a, b in zip(errors["ddim"], errors["ddim"][1:])), errors["ddim"]
    # DPM-Solver++(2M) beats DDIM at every budget, by 10x from 20 steps (measured: 25x at 20, 23x at 40).
    assert all(d < e for d, e in zip(errors["dpm++2m"], errors["ddim"])), errors
    assert errors["dpm++2m"][2] < errors["ddim"][2] / 10
    assert errors["dpm++2m"][3] < 2e-3


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_dpm_solver_beats_ddim_at_few_steps(kind):
    S = 0.5
    schedule = make_schedule(kind, T)
    model = gaussian_model(schedule, S)
    x_T = torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = ode_solution(schedule, S, x_T)
    for steps in (10, 20):
        err = {name: rms(sampling.sample(model, schedule, x_T.shape, sampler=name, steps=steps, x_T=x_T,
                                         dtype=torch.float64, clip_x0=False) - exact)
               for name in ("ddim", "dpm++2m")}
        assert err["dpm++2m"] < err["ddim"], (kind, steps, err)  # measured ratios 0.3-0.8


def _assert_moments(x: torch.Tensor, mean: float, var: float, what: str, n_se: float = 4.0):
    """Sample mean and variance of all entries (independent here) within n_se standard errors."""
    x = x.double().flatten()
    n = x.numel()
    assert abs(x.mean().item() - mean) < n_se * math.sqrt(var / n), f"{what}: mean {x.mean().item()} vs {mean}"
    assert abs(x.var().item() - var) < n_se * var * math.sqrt(2 / (n - 1)), f"{what}: var {x.var().item()} vs {var}"


def test_ddpm_samples_have_the_data_moments():
    # Unit-variance data, all 1000 steps: the fixed-small variance beta~ costs 0.5% of the data's variance
    # here (exact figure from the moment recursion below), under 1 standard error of the check.
    S = 1.0
    schedule = make_schedule("cosine", T)
    x0 = sampling.sample(gaussian_model(schedule, S), schedule, (4000, 1, 4, 4), sampler="ddpm", steps=T,
                         dtype=torch.float64, clip_x0=False, generator=torch.Generator().manual_seed(3))
    _assert_moments((x0 - MU) / S, 0.0, 1.0, "DDPM, 1000 steps")


def _ddpm_output_moments(schedule, S: float, mu: float, steps: int) -> tuple[float, float]:
    """Exact mean and variance of the respaced DDPM sampler's output for N(mu, S^2) data: each step is
    affine in x_t plus independent Gaussian noise, so a Gaussian stays Gaussian and its moments propagate."""
    ts = sampling.timesteps(schedule, steps).tolist()
    abar = lambda t: 1.0 if t < 0 else schedule.alphas_cumprod[t].item()  # noqa: E731
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for t, t_next in zip(ts, ts[1:] + [-1]):
        a2, an2 = abar(t), abar(t_next)
        k = math.sqrt(a2) * S ** 2 / (a2 * S ** 2 + 1 - a2)            # E[x0|x_t] = mu + k (x_t - a mu)
        q = (1 - an2) / (1 - a2)
        c0, ct = math.sqrt(an2) * (1 - a2 / an2) / (1 - a2), math.sqrt(a2 / an2) * q  # posterior mean coefs
        A, B = c0 * k + ct, c0 * mu * (1 - k * math.sqrt(a2))
        m, v = A * m + B, A * A * v + q * (1 - a2 / an2)
    return m, v


def test_respaced_ddpm_follows_its_exact_distribution():
    # With 100 of 1000 steps and beta~, the sampler's output is narrower than the data: its exact law
    # (computed in closed form) has std 0.936 S for this data. The samples must follow that law.
    S, mu = 0.5, 0.3
    schedule = make_schedule("linear", T)
    m, v = _ddpm_output_moments(schedule, S, mu, 100)
    assert abs(m - mu) < 1e-4 and 0.9 < math.sqrt(v) / S < 0.95
    full_m, full_v = _ddpm_output_moments(schedule, S, mu, T)
    assert abs(full_m - mu) < 1e-4 and abs(math.sqrt(full_v) / S - 1) < 0.01  # all steps: within 1%
    model = gaussian_model(schedule, S, mu=torch.full((1, 1, 4, 4), mu, dtype=torch.float64))
    x0 = sampling.sample(model, schedule, (4000, 1, 4, 4), sampler="ddpm", steps=100, dtype=torch.float64,
                         clip_x0=False, generator=torch.Generator().manual_seed(4))
    _assert_moments(x0, m, v, "DDPM, 100 steps")


def test_ddim_eta_one_is_ddpm():
    # sigma_t(eta=1)^2 = beta~, and with eps recomputed from the (clipped) x0 the means agree too.
    schedule = make_schedule("linear", 100)
    for steps in (100, 10):
        runs = [sampling.sample(fake_model, schedule, SHAPE, sampler=name, steps=steps, eta=eta,
                                dtype=torch.float64, generator=torch.Generator().manual_seed(5))
                for name, eta in (("ddpm", 0.0), ("ddim", 1.0))]
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-10)


def test_ddim_is_deterministic_and_seeds_reproduce():
    schedule = make_schedule("cosine", 200)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    a = sampling.ddim_sample(fake_model, schedule, SHAPE, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = sampling.ddim_sample(fake_model, schedule, SHAPE, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # eta = 0: the noise generator is never used
    for sampler, eta in (("ddim", 0.7), ("ddpm", 0.0), ("dpm++2m", 0.0)):
        run = [sampling.sample(fake_model, schedule, SHAPE, sampler=sampler, eta=eta, steps=20,
                               generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
        assert torch.equal(run[0], run[1]), sampler
        assert not torch.allclose(run[0], run[2]), sampler


def test_ddim_inversion_reconstructs():
    S = 0.5
    schedule = make_schedule("cosine", T)
    model = gaussian_model(schedule, S)
    x0 = MU + S * torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    errs = []
    for steps in (50, 200):
        x_T = sampling.ddim_invert(model, schedule, x0, steps=steps)
        # The inverted noise is close to where the exact flow sends x0 (the inverse of ode_solution) ...
        abar = schedule.alphas_cumprod[T - 1].item()
        exact_T = math.sqrt(abar) * MU + math.sqrt(abar * S ** 2 + 1 - abar) * (x0 - MU) / S
        assert rms(x_T - exact_T) < 0.05
        back = sampling.ddim_sample(model, schedule, x0.shape, steps=steps, x_T=x_T, dtype=torch.float64,
                                    clip_x0=False)
        errs.append(rms(back - x0))
    # ... and sampling brings it back: error 7e-3 at 200 steps (vs S = 0.5), shrinking like 1/steps.
    assert errs[1] < 0.01 and errs[1] < errs[0] / 2.5, errs


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
@pytest.mark.parametrize("clip", [True, False])
def test_prediction_types_agree(sampler, clip):
    schedule = make_schedule("linear", T)
    x_T = torch.randn((8, 1, 4, 4), generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    outs = [sampling.sample(gaussian_model(schedule, 0.8, p), schedule, x_T.shape, sampler=sampler, steps=20,
                            x_T=x_T, prediction=p, dtype=torch.float64, clip_x0=clip,
                            generator=torch.Generator().manual_seed(11)) for p in PREDICTIONS]
    for p, out in zip(PREDICTIONS[1:], outs[1:]):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-8, msg=f"{p} vs epsilon")


# --- the reverse process, and what the model sees -----------------------------------------------------

@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_reverse_process_yields_every_step_and_the_result(sampler):
    schedule = make_schedule("linear", 100)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(12))
    kw = dict(sampler=sampler, steps=7, x_T=x_T, generator=torch.Generator().manual_seed(13))
    steps = list(sampling.reverse_process(fake_model, schedule, SHAPE, **kw))
    assert [s.index for s in steps] == list(range(8))
    assert [s.t for s in steps] == sampling.timesteps(schedule, 7).tolist() + [-1]
    assert torch.equal(steps[0].x_t, x_T) and torch.equal(steps[-1].x_t, steps[-1].x0_hat)
    assert all(s.x0_hat.abs().max() <= 1 for s in steps)  # clip_x0 by default
    kw["generator"] = torch.Generator().manual_seed(13)
    assert torch.equal(sampling.sample(fake_model, schedule, SHAPE, **kw), steps[-1].x_t)
    wrapper = {"ddpm": sampling.ddpm_sample, "ddim": sampling.ddim_sample, "dpm++2m": sampling.dpm_solver_sample}
    kw["generator"] = torch.Generator().manual_seed(13)
    del kw["sampler"]
    assert torch.equal(wrapper[sampler](fake_model, schedule, SHAPE, **kw), steps[-1].x_t)


def test_the_loop_written_out_is_sample():
    # The loop in the module docstring, by hand, gives what `sample` gives.
    schedule, x_T = make_schedule("cosine", T), torch.randn(SHAPE, generator=torch.Generator().manual_seed(15))
    ts = sampling.timesteps(schedule, 20).tolist()
    x = x_T
    for t, t_next in zip(ts, ts[1:] + [-1]):
        x0_hat, eps_hat = sampling.denoise(fake_model, schedule, x, t)
        x = sampling.ddim_step(schedule, x, t, t_next, x0_hat, eps_hat)
    assert torch.equal(x, sampling.sample(fake_model, schedule, SHAPE, steps=20, x_T=x_T))


def test_model_gets_long_timesteps_without_grad(capsys):
    seen = []
    layer = torch.nn.Conv2d(3, 3, 1)

    def model(x, t):
        seen.append((t.dtype, tuple(t.shape), t.device, torch.is_grad_enabled()))
        return layer(x)

    x0 = sampling.sample(model, make_schedule("linear", 50), SHAPE, steps=5, progress=True)
    assert not x0.requires_grad and x0.dtype == torch.float32
    assert seen == [(torch.long, (2,), torch.device("cpu"), False)] * 5
    assert "5/5" in capsys.readouterr().err  # the tqdm bar
    assert torch.is_grad_enabled()


def test_step_functions_ask_for_noise_when_they_need_it():
    schedule = make_schedule("linear", 100)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        sampling.ddpm_step(schedule, x, 50, 40, x)
    with pytest.raises(ValueError, match="noise"):
        sampling.ddim_step(schedule, x, 50, 40, x, x, eta=0.5)
    torch.testing.assert_close(sampling.ddpm_step(schedule, x, 9, -1, x.clamp(-1, 1)), x.clamp(-1, 1))
    with pytest.raises(ValueError, match="t_next < t"):
        sampling.ddim_step(schedule, x, 40, 50, x, x)


# --- errors ---------------------------------------------------------------------------------------------

S100 = make_schedule("linear", 100)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="lms"), r"unknown sampler 'lms'; choose from \['ddpm', 'ddim', 'dpm\+\+2m', 'euler', 'heun', 'lcm'\]"),
    (dict(sampler="euler"), r"sampler 'euler' integrates the ODE in a continuous path's own time"),
    (dict(steps=0), r"steps must be an int from 1 to 100 \(the schedule's length T\)"),
    (dict(steps=101), r"steps must be an int from 1 to 100 \(the schedule's length T\)"),
    (dict(steps=2.5), r"steps must be an int"),
    (dict(spacing="uniform"), r"unknown timestep spacing 'uniform'; choose from \['trailing', 'leading', 'linspace'\]"),
    (dict(eta=-0.1), r"eta must be a number in \[0, 1\]"),
    (dict(sampler="ddpm", eta=0.5), r"eta applies to the 'ddim' sampler only"),
    (dict(prediction="noise"), r"unknown prediction type 'noise'; choose from \['epsilon', 'x0', 'v', 'flow'\]"),
    (dict(prediction="flow"), r"a model predicting 'flow' cannot be sampled along NoiseSchedule"),
    (dict(x_T=torch.zeros(1, 3, 4, 4)), r"x_T has shape \(1, 3, 4, 4\) but shape is \(2, 3, 4, 4\)"),
])
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(fake_model, S100, SHAPE, **kwargs)


def test_bad_shapes_and_models_raise_clear_errors():
    with pytest.raises(ValueError, match=r"shape must be 4 positive ints \(B, C, H, W\).*got \(3, 4, 4\)"):
        sampling.sample(fake_model, S100, (3, 4, 4))
    with pytest.raises(ValueError, match=r"model's output has shape \(2, 1, 4, 4\); expected x_t's \(2, 3, 4, 4\)"):
        sampling.sample(lambda x, t: x[:, :1], S100, SHAPE, steps=2)
    with pytest.raises(TypeError, match=r"must return a tensor; got dict"):
        sampling.sample(lambda x, t: {"sample": x}, S100, SHAPE, steps=2)
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, C, H, W\)"):
        sampling.ddim_invert(fake_model, S100, torch.zeros(3, 4, 4))


# --- SamplerSettings: a pipeline's sampler as one value -------------------------------------------------

def test_sampler_settings_give_sample_its_keywords():
    settings = pipeline.SamplerSettings(sampler="ddim", steps=6, spacing="leading", offset=1, final_t=0)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = sampling.sample(fake_model, S100, SHAPE, sampler="ddim", steps=6, spacing="leading", offset=1,
                               final_t=0, x_T=x_T)
    assert torch.equal(sampling.sample(fake_model, S100, SHAPE, **settings.options(), x_T=x_T), expected)
    assert "guidance_scale" not in settings.options() and "guidance_rescale" not in settings.options()
    assert pipeline.TINY_SD_SAMPLER == pipeline.SamplerSettings(sampler="ddim", steps=20, guidance_scale=4.0)


def test_sampler_settings_replace_keeps_fields_given_as_none():
    base = pipeline.SamplerSettings(steps=20, guidance_scale=4.0)
    changed = base.replace(steps=5, guidance_scale=None, sampler=None)
    assert (changed.steps, changed.guidance_scale, changed.sampler) == (5, 4.0, "ddim")
    assert base.steps == 20                                   # frozen: the preset itself never changes
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.steps = 3
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        base.replace(steps=0)                                 # a replaced field is checked again


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="lms"), r"unknown sampler 'lms'; choose from \['ddpm', 'ddim', 'dpm\+\+2m', 'euler', 'heun', 'lcm'\]"),
    (dict(steps=0), r"steps must be an int >= 1 \(up to the schedule's length T\); got 0"),
    (dict(steps=2.5), r"steps must be an int >= 1"),
    (dict(steps=True), r"steps must be an int >= 1"),
    (dict(guidance_scale=-1.0), r"guidance_scale must be a number >= 0 \(1 = no guidance\); got -1.0"),
    (dict(guidance_scale=float("inf")), r"guidance_scale must be a number >= 0"),
    (dict(guidance_scale="7.5"), r"guidance_scale must be a number >= 0"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be a number in \[0, 1\] \(0: plain guidance"),
    (dict(guidance_rescale=True), r"guidance_rescale must be a number in \[0, 1\]"),
    (dict(eta=2.0), r"eta must be a number in \[0, 1\]"),
    (dict(sampler="dpm++2m", eta=0.5), r"eta applies to the 'ddim' sampler only"),
    (dict(spacing="uniform"), r"unknown timestep spacing 'uniform'; choose from \['trailing', 'leading', 'linspace'\]"),
    (dict(offset=-1), r"offset must be an int >= 0; got -1"),
    (dict(final_t=-2), r"final_t must be an int >= -1; got -2"),
])
def test_bad_sampler_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.SamplerSettings(**kwargs)


def test_sample_forwards_every_keyword_to_reverse_process():
    """sample has no keyword list of its own: reverse_process's are the only ones (documented there)."""
    import inspect
    params = inspect.signature(sampling.sample).parameters
    assert list(params) == ["model", "schedule", "shape", "options"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        sampling.sample(fake_model, S100, SHAPE, stepz=3)


# --- GPU: the same numbers from the same CPU seed ---------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpm++2m", 0.0)])
def test_cuda_matches_cpu(sampler, eta):
    schedule = make_schedule("cosine", T)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1, dtype=torch.float64)
            torch.nn.init.constant_(self.conv.weight, 0.01)
            torch.nn.init.constant_(self.conv.bias, 0.1)

        def forward(self, x, t):
            return self.conv(x) + fake_model(x, t)

    def run(device):
        return sampling.sample(Net().to(device), schedule, SHAPE, sampler=sampler, eta=eta, steps=20,
                               dtype=torch.float64, generator=torch.Generator().manual_seed(14))

    on_gpu = run("cuda")  # no device given: it follows the model's parameters
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), run("cpu"), rtol=0, atol=1e-10)  # a CPU seed, the same numbers
    x0 = torch.rand(SHAPE, dtype=torch.float64, device="cuda") * 2 - 1
    x_T = sampling.ddim_invert(Net().cuda(), schedule, x0, steps=5)
    assert x_T.device.type == "cuda"
    torch.testing.assert_close(x_T.cpu(), sampling.ddim_invert(Net(), schedule, x0.cpu(), steps=5),
                               rtol=0, atol=1e-10)
