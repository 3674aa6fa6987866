"""The consistency function and the "lcm" sampler: the boundary condition, diffusers' LCMScheduler step by step, and a
Gaussian toy whose probability-flow ODE is known in closed form, on which distillation finds the fixed point it
should and the sampler lands where the ODE does."""

import math
import types

import pytest
import torch
from torch import nn

from course_lib import sampling
from course_lib.consistency import boundary_scalings, consistency_function, consistency_timesteps, skipping_grid
from course_lib.lcm import ConsistencyDistillation, LCMConfig, guided_ddim_step
from course_lib.pipeline import SamplerSettings
from course_lib.schedules import FlowSchedule, make_schedule, schedule_from_alphas_cumprod

pytestmark = pytest.mark.usefixtures("one_thread")

S = make_schedule("scaled_linear", 1000)
SHAPE = (2, 4, 8, 8)
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


def fake_model(x, t):
    """Any smooth function of (x, t): the steps are compared on the same outputs."""
    return torch.sin(1.3 * x + t.float().view(-1, 1, 1, 1) / 300)


# --- the parametrisation ---------------------------------------------------------------------------------

def test_boundary_coefficients_follow_their_formula_and_f_is_the_identity_at_time_zero():
    assert boundary_scalings(0) == (1.0, 0.0)
    for tau in (1, 19, 500, 999):
        c_skip, c_out = boundary_scalings(tau)
        scaled = 10.0 * tau
        assert c_skip == pytest.approx(0.25 / (scaled ** 2 + 0.25), rel=1e-12)
        assert c_out == pytest.approx(scaled / math.sqrt(scaled ** 2 + 0.25), rel=1e-12)
    x = torch.randn(SHAPE)
    for path in (S, FlowSchedule()):
        for prediction in path.predictions:
            zero = torch.zeros(SHAPE[0], dtype=torch.long)
            f = consistency_function(fake_model, path, x, zero, prediction=prediction)
            assert torch.equal(f, x)                              # the boundary condition, exactly
    f = consistency_function(fake_model, S, x, torch.tensor([19, 999]))
    assert not torch.equal(f, x)


def test_bad_coefficients_and_grids_are_refused_by_name():
    for bad in (math.inf, math.nan, 0, -1.0, True):
        with pytest.raises(ValueError, match="timestep_scaling must be a finite number > 0"):
            boundary_scalings(5, timestep_scaling=bad)
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
        boundary_scalings(5, sigma_data=math.inf)
    with pytest.raises(ValueError, match="at most distilled_steps=50 steps, the grid the student was distilled on"):
        consistency_timesteps(S, 51)
    with pytest.raises(ValueError, match="at most distilled_steps=4 steps"):
        sampling.sample(fake_model, S, SHAPE, sampler="lcm", steps=8, distilled_steps=4)
    with pytest.raises(ValueError, match="leave spacing 'trailing', offset 0, start_t None and final_t -1"):
        sampling.sample(fake_model, S, SHAPE, sampler="lcm", steps=4, spacing="leading")
    with pytest.raises(ValueError, match="eta applies to the 'ddim' sampler only"):
        SamplerSettings(sampler="lcm", eta=0.5)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
        SamplerSettings(sampler="lcm", guidance_scale=math.inf)
    with pytest.raises(ValueError, match="distilled_steps must be an int >= 1"):
        SamplerSettings(sampler="lcm", distilled_steps=0)
    with pytest.raises(ValueError, match="guidance must be a finite scale"):
        LCMConfig(guidance=math.nan)
    with pytest.raises(ValueError, match="guidance must be a finite scale"):
        LCMConfig(guidance=(5.0, 3.0))
    with pytest.raises(ValueError, match="unknown consistency loss 'l1'"):
        LCMConfig(loss="l1")


def test_skipping_grid_is_lcms():
    assert skipping_grid(S, 50) == [20 * n - 1 for n in range(50, 0, -1)] + [0]
    assert consistency_timesteps(S, 1) == [999] and consistency_timesteps(S, 4) == [999, 759, 499, 259]
    assert skipping_grid(FlowSchedule(), 4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0])


# --- against diffusers' LCMScheduler -------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_timesteps_coefficients_and_every_step_match_diffusers_lcm_scheduler(prediction):
    """float32, the model's output shared: each of our steps against LCMScheduler.step on the same input and noise."""
    diffusers = pytest.importorskip("diffusers")
    worst = {}
    for steps in (1, 2, 4, 8):
        ref = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     prediction_type=DIFFUSERS_PREDICTION[prediction])
        schedule = schedule_from_alphas_cumprod(ref.alphas_cumprod)        # the same float32 table
        ref.set_timesteps(steps)
        assert consistency_timesteps(schedule, steps) == ref.timesteps.tolist()
        for t in ref.timesteps:
            for ours, theirs in zip(boundary_scalings(int(t)), ref.get_scalings_for_boundary_condition_discrete(t)):
                worst["coefficients"] = max(worst.get("coefficients", 0.0), abs(ours - float(theirs)))
        x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        states = list(sampling.reverse_process(fake_model, schedule, SHAPE, sampler="lcm", steps=steps, x_T=x_T,
                                               prediction=prediction, clip_x0=False,
                                               generator=torch.Generator().manual_seed(1)))
        gen = torch.Generator().manual_seed(1)                               # the same noise, in the same order
        for state, after in zip(states, states[1:]):
            t = torch.tensor(state.t)
            out = ref.step(fake_model(state.x_t, t.repeat(SHAPE[0])), t, state.x_t, generator=gen)
            worst["step"] = max(worst.get("step", 0.0), (after.x_t - out.prev_sample).abs().max().item())
        assert torch.equal(states[-1].x_t, states[-1].x0_hat)                 # the last step keeps f
    print(f"\nLCMScheduler parity ({prediction}, float32): max |difference| {worst}")
    assert worst["coefficients"] < 1e-6 and worst["step"] < 1e-5


# --- a Gaussian toy with a closed-form probability-flow ODE ---------------------------------------------------
# Data x0 ~ N(MU, SIGMA0^2) in every coordinate. At timestep t (a = sqrt(abar_t), s = sqrt(1 - abar_t)) the marginal
# is N(a MU, v_t), v_t = a^2 SIGMA0^2 + s^2; the ideal denoiser is E[x0 | x_t] = MU + a SIGMA0^2 (x_t - a MU) / v_t;
# the ODE keeps (x - a MU) / sqrt(v_t) constant, so it maps x_t to a' MU + sqrt(v_t' / v_t) (x_t - a MU) at t'. The
# ideal consistency function (boundary at timestep 0) is that map down to t' = 0.

MU, SIGMA0 = 0.3, 0.5


def _a_v(tau):
    ab = S.alphas_cumprod[tau.long()].float().view(-1, 1, 1, 1)
    return ab.sqrt(), ab * SIGMA0 ** 2 + (1 - ab)


def exact_x0(x, tau, *cond):
    a, v = _a_v(tau)
    return MU + a * SIGMA0 ** 2 * (x - a * MU) / v


def ode_to_zero(x, t):
    (a, v), (a0, v0) = _a_v(torch.tensor([t])), _a_v(torch.tensor([0]))
    return a0 * MU + (v0 / v).sqrt() * (x - a * MU)


class IdealStudent(nn.Module):
    """Predicts epsilon so that c_skip x + c_out x0_hat is the ODE's end point: the consistency function itself."""

    def forward(self, x, tau, *cond):
        (a, v), (a0, v0) = _a_v(tau), _a_v(torch.zeros_like(tau))
        end = a0 * MU + (v0 / v).sqrt() * (x - a * MU)
        c_skip, c_out = (c.float() for c in boundary_scalings(tau.double().view(-1, 1, 1, 1)))
        x0 = torch.where(c_out > 0, (end - c_skip * x) / c_out.clamp_min(1e-30), x)
        return (x - a * x0) / (1 - a * a).sqrt()


def test_the_ideal_consistency_function_lands_where_the_ode_does_in_one_step_and_more():
    student = IdealStudent()
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in (999, 519, 19):
        f = consistency_function(student, S, x, torch.full((64,), t))
        torch.testing.assert_close(f, ode_to_zero(x, t), rtol=0, atol=2e-5)
    one = sampling.sample(lambda z, tau: student(z, tau), S, x.shape, sampler="lcm", steps=1, x_T=x, clip_x0=False)
    torch.testing.assert_close(one, ode_to_zero(x, 999), rtol=0, atol=2e-5)
    # several steps re-noise the end point each time; the result keeps the data's distribution at timestep 0
    many = sampling.sample(lambda z, tau: student(z, tau), S, (4000, 1, 2, 2), sampler="lcm", steps=4, clip_x0=False,
                           generator=torch.Generator().manual_seed(1))
    a0, v0 = _a_v(torch.tensor([0]))
    assert abs(many.mean().item() - a0.item() * MU) < 0.02 and abs(many.var().item() - v0.item()) < 0.02


class AffineStudent(nn.Module):
    """x0_hat = alpha[t] x + beta[t] at each time of the grid: enough for the Gaussian toy's exact answer."""

    def __init__(self, grid):
        super().__init__()
        self.index = {int(t): i for i, t in enumerate(grid)}
        self.alpha, self.beta = nn.Parameter(torch.zeros(len(grid))), nn.Parameter(torch.zeros(len(grid)))

    def forward(self, x, tau, *cond):
        i = torch.tensor([self.index[int(t)] for t in tau])
        return self.alpha[i].view(-1, 1, 1, 1) * x + self.beta[i].view(-1, 1, 1, 1)


class ExactTeacher(nn.Module):
    def forward(self, x, tau, *cond):
        return exact_x0(x, tau)


def _toy_run(student, N, target_ema, steps=300):
    pipe = types.SimpleNamespace(schedule=S, prediction="x0", device=torch.device("cpu"), unet=ExactTeacher())
    g = torch.Generator().manual_seed(0)
    z = MU + SIGMA0 * torch.randn(512, 1, 2, 2, generator=g)
    text, mask = torch.zeros(512, 1, 1), torch.ones(512, 1, dtype=torch.bool)
    null = (torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))
    return ConsistencyDistillation(pipe, student, list(student.parameters()), z, text, mask, null, steps=steps,
                                   config=LCMConfig(distilled_steps=N, guidance=1.0, loss="l2", target_ema=target_ema),
                                   lr=0.05, batch_size=256)


def _ddim_down_the_grid(x, grid, n):
    """The teacher's solver from grid[n] to timestep 0, one DDIM step per grid interval, with the exact denoiser."""
    for t, t_next in zip(grid[n:-1], grid[n + 1:]):
        x0, eps = sampling.denoise(lambda z, tau: exact_x0(z, tau), S, x, t, prediction="x0", clip_x0=False)
        x = sampling.ddim_step(S, x, t, t_next, x0, eps)
    return x


def test_distillation_finds_the_consistency_function_of_the_teachers_solver():
    """The fixed point of the distillation step is f(x, t_n) = DDIM from t_n down the skipping grid to the boundary:
    trained from zero, the student reaches it; and as the grid grows that solver's end nears the ODE's exact end."""
    N = 5
    grid = skipping_grid(S, N)
    student = AffineStudent(grid)
    run = _toy_run(student, N, target_ema=0.5)
    run.run()
    assert run.history["loss"][-1] < 1e-8 < run.history["loss"][0]
    x = MU + SIGMA0 * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    for n, t in enumerate(grid[:-1]):
        f = consistency_function(student, S, x, torch.full((64,), t), prediction="x0")
        torch.testing.assert_close(f, _ddim_down_the_grid(x, grid, n), rtol=0, atol=1e-4)
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    errors = [(_ddim_down_the_grid(x_T, skipping_grid(S, N), 0) - ode_to_zero(x_T, 999)).abs().max().item()
              for N in (5, 50, 200)]                       # DDIM is first order: the error falls as 1 / N
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 3 and errors[2] < 0.03, errors


def test_a_distillation_step_is_its_definition():
    """One loss() by hand: t_{n+k} and t_n from the grid, the closed-form noising, the teacher's DDIM step, the
    target's f at t_n without gradient, the L2 distance."""
    N = 5
    grid = skipping_grid(S, N)
    student = AffineStudent(grid)
    with torch.no_grad():
        student.alpha.uniform_(0.5, 1.0), student.beta.uniform_(-0.1, 0.1)
    run = _toy_run(student, N, target_ema=None)
    g = torch.Generator().manual_seed(0)
    loss = run.loss()
    i = torch.randint(0, 512, (256,), generator=g)
    n = torch.randint(0, N, (256,), generator=g)
    noise = torch.randn(256, 1, 2, 2, generator=g)
    torch.rand(256, generator=g)                                              # the guidance scale's draw
    t, t_next = torch.tensor(grid)[n], torch.tensor(grid)[n + 1]
    ab = S.alphas_cumprod.float()
    x = ab[t].sqrt().view(-1, 1, 1, 1) * run.z[i] + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * noise
    x0 = exact_x0(x, t)
    eps = (x - ab[t].sqrt().view(-1, 1, 1, 1) * x0) / (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    x_next = ab[t_next].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t_next]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(guided_ddim_step(run.teacher, S, x, t, t_next, run.context[i], run.mask[i],
                                                *run.null, torch.ones(256), "x0"), x_next)

    def f(xx, tt):
        c_skip, c_out = (c.float().view(-1, 1, 1, 1) for c in boundary_scalings(tt.double()))
        return c_skip * xx + c_out * student(xx, tt)
    with torch.no_grad():
        expected = (f(x, t) - f(x_next, t_next)).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()                                                           # the target carries no gradient
    assert student.alpha.grad is not None


# --- through the pipeline ----------------------------------------------------------------------------------

def test_the_pipeline_samples_with_lcm_through_its_one_path(tiny_pipe):
    settings = LCMConfig(distilled_steps=50).sampler(steps=2)
    assert settings.options()["distilled_steps"] == 50 and settings.guidance_scale == 1.0
    z = tiny_pipe(["red heart"], seed=3, settings=settings, return_latents=True)
    from course_lib.guidance import conditional
    c, m = tiny_pipe.encode(["red heart"])
    from course_lib.pipeline import start_latents
    x_T = start_latents(tiny_pipe.latent_shape, 1, 3)
    expected = sampling.sample(conditional(tiny_pipe.unet, c, m), tiny_pipe.schedule, x_T.shape, sampler="lcm",
                               steps=2, x_T=x_T, clip_x0=False, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at most distilled_steps=4"):
        tiny_pipe(["red heart"], settings=LCMConfig(distilled_steps=4).sampler(steps=8))
