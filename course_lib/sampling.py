r"""Samplers: turning a trained denoiser and pure noise into images.

Every sampler walks down a short list of timesteps t_0 > t_1 > ... > t_{N-1} (see `timesteps`)
and then lands on the clean image. At each timestep t it asks the model for its estimate of
the clean image and of the noise, then moves x_t to x_{t'} at the next timestep t' < t. The
samplers differ only in that move.

Notation (course_lib.schedules; timesteps are integers 0..T-1, and t' = -1 stands for the clean
end of the chain, where abar = 1):
    abar_t                      \bar\alpha_t                signal power left at step t (alpha_bar in code)
    a_t = sqrt(abar_t)          \alpha_t in DPM-Solver      signal scale
    s_t = sqrt(1 - abar_t)      \sigma_t in DPM-Solver      noise scale
    lambda_t = log(a_t / s_t)   \lambda_t                   half the log signal-to-noise ratio
    x0_hat, eps_hat             the model's estimate of x_0 and of the noise at (x_t, t)

The model may predict epsilon, x0 or v (course_lib.forward.PREDICTIONS), or, trained with rectified flow, the
flow's velocity; `denoise` turns its output into (x0_hat, eps_hat) (course_lib.forward.x0_eps_from, the one
place that knows the prediction types), and every sampler works from those two. The samplers never ask which
objective trained the model: they ask the schedule for a_t and s_t of x_t = a_t x0 + s_t eps (a NoiseSchedule:
sqrt(abar_t), sqrt(1 - abar_t); a rectified flow's FlowSchedule: 1 - t, t; see course_lib.schedules), so the
steps below, written in (a, s), serve both. Euler and Heun integrate dx/dt = (da/dt) x0_hat + (ds/dt) eps_hat
in a continuous path's own time (on a flow, the velocity): Euler's step there is DDIM's at eta = 0. With clip_x0, x0_hat is clamped to [-1, 1] and
eps_hat is recomputed from it, eps_hat = (x_t - a_t x0_hat) / s_t, so the pair stays consistent
with x_t (guided-diffusion's choice; diffusers' `use_clipped_model_output=True`).

DDPM, ancestral sampling [1]. The step from t to t' samples the posterior q(x_{t'} | x_t, x_0)
of Eqs. 6-7 with x_0 replaced by x0_hat. With t' = t - 1 that is Ho et al.'s sampler; with a
stride it is the "respaced" sampler of Nichol & Dhariwal [4], which uses the beta of the big step:
    beta'  = 1 - abar_t / abar_{t'}
    x_{t'} = sqrt(abar_{t'}) beta' / (1 - abar_t) x0_hat
             + sqrt(1 - beta') (1 - abar_{t'}) / (1 - abar_t) x_t
             + sqrt(beta~) z,            beta~ = (1 - abar_{t'}) / (1 - abar_t) beta',   z ~ N(0, I)

DDIM [2], Eqs. 12 and 16: keep x0_hat, point back along eps_hat, and add some fresh noise:
    std    = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})
    x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - std^2) eps_hat + std z
eta = 0 is a deterministic solver of the probability-flow ODE; eta = 1 gives std^2 = beta~ and
is then the DDPM step above (the same samples from the same noise).

DPM-Solver++(2M) [3], Algorithm 2: an exponential integrator of the ODE in lambda for the data
prediction x0_hat, reusing the previous step's x0_hat to be second order. With h = lambda_{t'} - lambda_t:
    first order (= DDIM, eta = 0):  x_{t'} = (s_{t'} / s_t) x_t - a_{t'} (e^{-h} - 1) x0_hat
    second order:  r = (lambda_t - lambda_{t_last}) / h   (t_last: the step before t)
                   D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_{t_last}
                   x_{t'} = (s_{t'} / s_t) x_t - a_{t'} (e^{-h} - 1) D
The first step has no history and is first order. The last step lands on t' = -1, where
s = 0 and lambda = +inf: there the update is first order and gives x0_hat exactly (diffusers
does the same with final_sigmas_type="zero").

Consistency sampling ("lcm", course_lib.consistency): for a consistency-distilled student (course_lib.lcm), each
step maps x_t to the consistency output f = c_skip x_t + c_out x0_hat and re-noises it to the next time, visiting
only the times of the grid the student was distilled on (`distilled_steps`; more steps are refused).

DDIM inversion runs the eta = 0 update forwards (t' > t), so an image can be mapped to the
noise that DDIM turns back into it.

The loop, written out (what `sample` does for DDIM, less the bookkeeping):
    ts = timesteps(schedule, 20).tolist()
    x = torch.randn(shape)
    for t, t_next in zip(ts, ts[1:] + [-1]):
        x0_hat, eps_hat = denoise(model, schedule, x, t)
        x = ddim_step(schedule, x, t, t_next, x0_hat, eps_hat)
`reverse_process` runs the same loop and yields every intermediate state, for plots.

Classifier-free guidance (course_lib.guidance.GuidedModel) wraps a text-conditioned U-Net as a plain
model(x_t, t), so every sampler here serves text-to-image unchanged. course_lib.pipeline.SamplerSettings gathers
what a text-to-image pipeline samples with (sampler, steps, guidance scale, timesteps); SD 1.5's published
scheduler is one of its presets (course_lib.sd.SD15_SAMPLER).

References:
  [1] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020. https://arxiv.org/abs/2006.11239
  [2] Song, Meng, Ermon. Denoising Diffusion Implicit Models. 2021. https://arxiv.org/abs/2010.02502
  [3] Lu, Zhou, Bao, Chen, Li, Zhu. DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
      Probabilistic Models. 2022. https://arxiv.org/abs/2211.01095
  [4] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021. https://arxiv.org/abs/2102.09672
  [5] Lin, Liu, Li, Yang. Common Diffusion Noise Schedules and Sample Steps are Flawed (Table 2:
      timestep spacings). 2024. https://arxiv.org/abs/2305.08891
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .forward import check_images, x0_eps_from
from .guidance import GuidedModel, classifier_free_guidance, conditional  # noqa: F401  (also importable from here)
from .checks import check_choice
from .consistency import DISTILLED_STEPS, consistency_step, consistency_timesteps
from .schedules import FLOW, PREDICTIONS, SPACINGS, FlowSchedule, NoiseSchedule, timesteps  # noqa: F401  (timesteps: also from here)

SAMPLERS = ("ddpm", "ddim", "dpm++2m")    # sample along any path
CONTINUOUS = ("euler", "heun")            # integrate the ODE in the path's own time: a continuous path (FlowSchedule)
CONSISTENCY = ("lcm",)                    # a consistency-distilled student's multistep sampler (course_lib.consistency)
ALL_SAMPLERS = SAMPLERS + CONTINUOUS + CONSISTENCY
Path = NoiseSchedule | FlowSchedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- timesteps (course_lib.schedules.timesteps; a path's `grid`) -------------------------------------

def _check_order(t: float, t_next: float) -> None:
    if not t_next < t:
        raise ValueError(f"a sampling step goes down in time: need t_next < t (the clean end: -1 for a discrete "
                         f"schedule, 0 for a flow); got t={t}, t_next={t_next}")


# --- the model's estimate: the one place a prediction becomes (x0_hat, eps_hat) --------------------------

def check_prediction_on(schedule: Path, prediction: str) -> str:
    """prediction, if a model predicting it can be sampled along this path; else a ValueError naming both."""
    check_choice("prediction type", prediction, PREDICTIONS + (FLOW,))
    if prediction not in schedule.predictions:
        raise ValueError(f"a model predicting {prediction!r} cannot be sampled along {schedule!r}: it takes "
                         f"{', '.join(schedule.predictions)} (a rectified-flow model, prediction 'flow', goes with "
                         f"course_lib.schedules.FlowSchedule; epsilon, x0 and v with a NoiseSchedule)")
    return prediction


def denoise(model: Model, schedule: Path, x_t: torch.Tensor, t: float, *,
            prediction: str = "epsilon", clip_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the model at (x_t, t) and return (x0_hat, eps_hat) (course_lib.forward.x0_eps_from, for any
    prediction the path allows); with clip_x0, x0_hat in [-1, 1] and eps_hat recomputed from it."""
    check_prediction_on(schedule, prediction)
    a, s = schedule.scales(t)
    if prediction == "epsilon" and a == 0:
        raise ValueError(f"an epsilon model cannot be asked at t={t}: abar_t = 0 there (zero terminal SNR), and its "
                         f"x0 estimate (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by 0. Use a v (or x0) model, "
                         f"as Lin et al. 2024 do, or start below t={t} (start_t).")
    with torch.no_grad():
        out = model(x_t, schedule.model_time(t, x_t.shape[0], x_t.device))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor; got {type(out).__name__} (for a diffusers UNet, "
                        f"wrap it: lambda x, t: unet(x, t).sample)")
    if out.shape != x_t.shape:
        raise ValueError(f"the model's output has shape {tuple(out.shape)}; expected x_t's {tuple(x_t.shape)}")
    a_, s_ = (torch.tensor(v, dtype=x_t.dtype, device=x_t.device) for v in (a, s))
    x0, eps = x0_eps_from(prediction, out.to(x_t.dtype), x_t, a_, s_)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        if s > 0:                       # at the clean end (a flow's t = 0) eps_hat cannot be recomputed: kept
            eps = (x_t - a_ * x0) / s_
    return x0, eps


# --- one step of each sampler, in the path's (a, s) -------------------------------------------------------
# A step from t to t' < t sees x_t = a x0 + s eps and lands on x_{t'} = a' x0 + s' eps (primes: at t').
# The Markov chain behind both points: x_t = (a / a') x_{t'} + sqrt(v) z with v = s^2 - (a / a')^2 s'^2, the
# variance the step adds (beta' = 1 - abar_t / abar_{t'} on a discrete schedule).

def _step_variance(a: float, s: float, a_next: float, s_next: float) -> float:
    return max(s * s - (a / a_next) ** 2 * s_next * s_next, 0.0)


def noised(schedule: Path, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """x_t = a_t x0 + s_t noise: a clean x0 taken to time t in one jump (Eq. 4 on a discrete schedule)."""
    a, s = schedule.scales(t)
    return a * x0 + s * noise


def renoised(schedule: Path, x: torch.Tensor, t_from: float, t_to: float, noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(x_{t_to} | x_{t_from}) for t_to > t_from: x = (a / a') x_{t_from} + sqrt(v) noise, the chain's
    forward jump (RePaint's step back up; on a discrete schedule sqrt(abar_to / abar_from) x + sqrt(1 - ratio) z)."""
    _check_order(t_to, t_from)
    (a_to, s_to), (a_from, s_from) = schedule.scales(t_to), schedule.scales(t_from)
    return (a_to / a_from) * x + math.sqrt(_step_variance(a_to, s_to, a_from, s_from)) * noise


def ddpm_step(schedule: Path, x_t: torch.Tensor, t: float, t_next: float, x0_hat: torch.Tensor,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample q(x_{t_next} | x_t, x0_hat): Eqs. 6-7 of Ho et al. 2020 over a stride t -> t_next, in (a, s):
    mean = (a' v / s^2) x0_hat + ((a / a') s'^2 / s^2) x_t, variance v s'^2 / s^2."""
    _check_order(t, t_next)
    (a, s), (a_next, s_next) = schedule.scales(t), schedule.scales(t_next)
    v = _step_variance(a, s, a_next, s_next)                    # beta' of the whole stride
    coef_x0 = a_next * v / (s * s)                              # posterior_mean_coef1
    coef_xt = (a / a_next) * s_next * s_next / (s * s)          # posterior_mean_coef2
    variance = v * s_next * s_next / (s * s)                    # beta~
    mean = coef_x0 * x0_hat + coef_xt * x_t
    if variance == 0:
        return mean
    if noise is None:
        raise ValueError(f"ddpm_step from t={t} to t_next={t_next} adds noise: pass noise=torch.randn_like(x_t)")
    return mean + math.sqrt(variance) * noise


def ddim_step(schedule: Path, x_t: torch.Tensor, t: float, t_next: float, x0_hat: torch.Tensor,
              eps_hat: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t_next} = a' x0_hat + sqrt(s'^2 - std^2) eps_hat + std z with std = eta sqrt(beta~): Eqs. 12, 16 of
    Song et al. (a' = sqrt(abar'), s' = sqrt(1 - abar')). At eta = 0 on a flow path: Euler's step."""
    _check_order(t, t_next)
    (a, s), (a_next, s_next) = schedule.scales(t), schedule.scales(t_next)
    std = eta * math.sqrt(_step_variance(a, s, a_next, s_next)) * s_next / s
    x = a_next * x0_hat + math.sqrt(max(s_next * s_next - std ** 2, 0.0)) * eps_hat
    if std == 0:
        return x
    if noise is None:
        raise ValueError(f"ddim_step with eta={eta} adds noise: pass noise=torch.randn_like(x_t)")
    return x + std * noise


def dpm_solver_step(schedule: Path, x_t: torch.Tensor, t: float, t_next: float, x0_hat: torch.Tensor,
                    last: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Algorithm 2 of Lu et al. 2022); `last` = (t_last, x0_hat there) or None
    for a first-order step."""
    _check_order(t, t_next)
    if t_next == schedule.clean:          # s = 0, lambda = +inf: the first-order step lands on x0_hat
        return x0_hat
    (_, s_t), (a_next, s_next) = schedule.scales(t), schedule.scales(t_next)
    lam_t, lam_next = schedule.half_log_snr(t), schedule.half_log_snr(t_next)
    h = lam_next - lam_t
    D = x0_hat
    if last is not None:
        t_last, x0_last = last
        if not t_last > t:
            raise ValueError(f"the previous step's timestep must be above t={t}; got t_last={t_last}")
        r = (lam_t - schedule.half_log_snr(t_last)) / h
        D = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_last
    return (s_next / s_t) * x_t - a_next * math.expm1(-h) * D


def _velocity(schedule: FlowSchedule, t: float, x0_hat: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """dx_t/dt = (da/dt) x0_hat + (ds/dt) eps_hat along a continuous path (a flow's: eps_hat - x0_hat)."""
    if not schedule.continuous:
        raise ValueError(f"Euler and Heun integrate the ODE in a continuous path's own time; {schedule!r} has "
                         f"integer timesteps: use 'ddim' (eta 0, the probability-flow ODE's own solver) or 'dpm++2m'")
    da, ds = schedule.derivative(t)
    return da * x0_hat + ds * eps_hat


def euler_step(schedule: FlowSchedule, x_t: torch.Tensor, t: float, t_next: float, x0_hat: torch.Tensor,
               eps_hat: torch.Tensor) -> torch.Tensor:
    """x_{t'} = x_t + (t' - t) dx/dt: Euler's step in the path's time (on a flow path, DDIM's at eta = 0)."""
    _check_order(t, t_next)
    return x_t + (t_next - t) * _velocity(schedule, t, x0_hat, eps_hat)


def heun_step(schedule: FlowSchedule, x_t: torch.Tensor, t: float, t_next: float, x0_hat: torch.Tensor,
              eps_hat: torch.Tensor, x0_end: torch.Tensor, eps_end: torch.Tensor) -> torch.Tensor:
    """Heun's step: the mean of dx/dt at t and at Euler's landing point (x0_end, eps_end: the model there)."""
    _check_order(t, t_next)
    v, v_end = _velocity(schedule, t, x0_hat, eps_hat), _velocity(schedule, t_next, x0_end, eps_end)
    return x_t + (t_next - t) * 0.5 * (v + v_end)


# --- the loop -------------------------------------------------------------------------------

@dataclass
class ReverseStep:
    """One moment of the reverse process: the state x_t before the update at timestep t, and the
    model's x_0 estimate there. The last one has index = steps, t = the clean end (-1, or a flow's 0) and
    x_t = x0_hat = the result."""
    index: int
    t: float            # an int timestep on a NoiseSchedule, a time in [0, 1] on a FlowSchedule
    x_t: torch.Tensor
    x0_hat: torch.Tensor


def check_sampler(sampler: str, eta: float, schedule: Path | None = None) -> None:
    """Refuse an unknown sampler, an eta it does not take, or Euler/Heun on a discrete schedule, by name."""
    check_choice("sampler", sampler, ALL_SAMPLERS)
    if sampler in CONTINUOUS and schedule is not None and not schedule.continuous:
        raise ValueError(f"sampler {sampler!r} integrates the ODE in a continuous path's own time (a rectified-flow "
                         f"model's FlowSchedule); this schedule has integer timesteps: use 'ddim' (eta 0: the "
                         f"probability-flow ODE's own solver) or 'dpm++2m'")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like); got {eta!r}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies to the 'ddim' sampler only; got eta={eta} with sampler {sampler!r}")


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(n, numbers.Integral) and n > 0 for n in shape):
        raise ValueError(f"shape must be 4 positive ints (B, C, H, W) = (batch, channels, height, width); "
                         f"got {shape}")
    return tuple(int(n) for n in shape)


def _default_device(model: Model) -> torch.device:
    """The device of the model's parameters, if it has any, else the CPU."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU seed gives the same numbers on a GPU)."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype).to(device)


def reverse_process(model: Model, schedule: Path, shape: Sequence[int], *, sampler: str = "ddim",
                    steps: int = 50, eta: float = 0.0, prediction: str = "epsilon",
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, x_T: torch.Tensor | None = None, clip_x0: bool = True,
                    spacing: str = "trailing", offset: int = 0, final_t: int = -1, start_t: int | None = None,
                    distilled_steps: int = DISTILLED_STEPS, progress: bool = False) -> Iterator[ReverseStep]:
    """Run a sampler, yielding a ReverseStep at every timestep and then the result (cf. guided-diffusion's
    p_sample_loop_progressive); `sample` keeps only the result.

    model        model(x_t, t) with t a (B,) tensor (schedule.model_time: the long timestep of a NoiseSchedule,
                 t * 1000 on a FlowSchedule); its output means `prediction` (epsilon, x0 or v; flow on a
                 FlowSchedule). Called under torch.no_grad(); put it in eval mode (and use its EMA weights) first.
    schedule     the path: a NoiseSchedule, or course_lib.schedules.FlowSchedule for a rectified-flow model
    shape        (B, C, H, W) = (batch, channels, height, width) of the result
    sampler      one of ALL_SAMPLERS: SAMPLERS (ddpm, ddim, dpm++2m) on either path; CONTINUOUS (euler, and
                 heun with two model calls a step) on a continuous one (a FlowSchedule); "lcm" for a consistency-
                 distilled student (course_lib.consistency: its own grid, `distilled_steps`, fresh noise each step)
    steps        how many steps; times from `schedule.grid(steps, spacing, offset, start_t)`
    eta          DDIM only: 0 deterministic, 1 as much noise as DDPM
    generator    seeds x_T and every fresh noise draw, so a seed reproduces a run exactly (noise is drawn
                 on the generator's device, so a CPU generator gives the same numbers on a GPU)
    device       default: x_T's device, else the model's, else the CPU
    x_T          the starting noise (cast to dtype and device); drawn from N(0, I) if None
    clip_x0      clamp each x0 estimate to [-1, 1] (turn off for latents or exact tests)
    spacing, offset   which timesteps (see `timesteps`)
    final_t      where the last step lands: -1 is the clean end (abar = 1); 0 stops at abar_0, as SD 1.5's
                 DDIM does (set_alpha_to_one=False), a difference of 1 - abar_0 = 0.00085 in the noise variance
    start_t      the first timestep (default T-1); x_T is then the image at that noise level, e.g.
                 q_sample(schedule, x0, start_t) for SDEdit, or ddim_invert(..., start_t=start_t)
    distilled_steps  "lcm" only: the grid the student was distilled on (LCM: 50); steps must not exceed it
    progress     show a tqdm progress bar
    """
    check_sampler(sampler, eta, schedule)
    check_prediction_on(schedule, prediction)
    shape = _check_shape(shape)
    ts = (consistency_timesteps(schedule, steps, distilled_steps, spacing=spacing, offset=offset, start=start_t,
                                final_t=final_t) if sampler == "lcm" else schedule.grid(steps, spacing, offset, start_t))
    end = schedule.end(final_t, ts[-1])
    if x_T is not None:
        check_images(x_T, "x_T", data_range=False)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}")
        device = torch.device(device) if device is not None else x_T.device
        x = x_T.detach().to(device=device, dtype=dtype)
    else:
        device = torch.device(device) if device is not None else _default_device(model)
        x = _randn(shape, generator, device, dtype)

    last = None  # DPM-Solver++'s memory: (timestep, x0_hat) of the previous step
    pairs = zip(ts, ts[1:] + [end])
    for i, (t, t_next) in enumerate(tqdm(pairs, total=len(ts), desc=sampler, disable=not progress)):
        x0, eps = denoise(model, schedule, x, t, prediction=prediction, clip_x0=clip_x0)
        yield ReverseStep(i, t, x, x0)
        fresh = t_next != schedule.clean          # no fresh noise on the step that lands on the clean end
        if sampler == "ddpm":
            x = ddpm_step(schedule, x, t, t_next, x0, _randn(shape, generator, device, dtype) if fresh else None)
        elif sampler == "ddim":
            noise = _randn(shape, generator, device, dtype) if eta > 0 and fresh else None
            x = ddim_step(schedule, x, t, t_next, x0, eps, eta, noise)
        elif sampler == "dpm++2m":
            x = dpm_solver_step(schedule, x, t, t_next, x0, last)
            last = (t, x0)
        elif sampler == "euler":
            x = euler_step(schedule, x, t, t_next, x0, eps)
        elif sampler == "lcm":                    # the consistency output, then fresh noise to the next time
            last_step = i == len(ts) - 1
            x, _ = consistency_step(schedule, x, t, x0, None if last_step else t_next,
                                    None if last_step else _randn(shape, generator, device, dtype))
        else:                                     # heun: a second model call at Euler's landing point
            x0_end, eps_end = denoise(model, schedule, euler_step(schedule, x, t, t_next, x0, eps), t_next,
                                      prediction=prediction, clip_x0=clip_x0)
            x = heun_step(schedule, x, t, t_next, x0, eps, x0_end, eps_end)
    yield ReverseStep(len(ts), end, x, x)


def sample(model: Model, schedule: Path, shape: Sequence[int], **options) -> torch.Tensor:
    """Generate a batch x_0 of `shape` (B, C, H, W) with one of ALL_SAMPLERS: the last state of `reverse_process`,
    whose keywords (sampler, steps, eta, prediction, generator, device, dtype, x_T, clip_x0, spacing, offset,
    final_t, start_t, distilled_steps, progress) it takes and documents."""
    for step in reverse_process(model, schedule, shape, **options):
        pass
    return step.x_t


def ddpm_sample(model: Model, schedule: NoiseSchedule, shape: Sequence[int], **options) -> torch.Tensor:
    """Ancestral sampling (Algorithm 2 of Ho et al. 2020; respaced when steps < T). Keywords as `sample`."""
    return sample(model, schedule, shape, sampler="ddpm", **options)


def ddim_sample(model: Model, schedule: NoiseSchedule, shape: Sequence[int], **options) -> torch.Tensor:
    """DDIM (Eq. 12 of Song et al. 2021), deterministic at eta=0. Keywords as `sample`."""
    return sample(model, schedule, shape, sampler="ddim", **options)


def dpm_solver_sample(model: Model, schedule: NoiseSchedule, shape: Sequence[int], **options) -> torch.Tensor:
    """DPM-Solver++(2M) (Algorithm 2 of Lu et al. 2022). Keywords as `sample`."""
    return sample(model, schedule, shape, sampler="dpm++2m", **options)


def ddim_invert(model: Model, schedule: Path, x0: torch.Tensor, *, steps: int = 50,
                prediction: str = "epsilon", spacing: str = "trailing", start_t: float | None = None) -> torch.Tensor:
    """DDIM inversion: the eta=0 update run from x_0 up to the first sampling timestep, giving the x_T that
    `ddim_sample(..., eta=0, x_T=x_T, clip_x0=False)` maps back to (about) x0.

    Going up from t to t' > t, the model is asked at (x_t, t') (the step that sampling will undo is
    evaluated at t' too), and x_{t'} = a_{t'} x0_hat + s_{t'} eps_hat with x0_hat = (x_t - s_t eps_hat) / a_t.
    No clipping: clipping would make the map lossy.

    Caveat: the first sampling step divides by sqrt(abar) at the top timestep. Where that is almost zero
    (the cosine schedule's abar at t = T-1 is about 2e-9), any error in the model's noise estimate is
    amplified by about 1 / sqrt(abar) and a trained model's round trip does not reconstruct (the exact
    denoiser of the tests has no error, so it does). start_t inverts only up to that timestep (the grid of
    `timesteps(..., start=start_t)`); sample back with the same start_t. On a FlowSchedule the same update
    is Euler's step of the flow run forwards, from t = 0 up to start_t (default 1)."""
    check_images(x0, "x0", data_range=False)
    check_prediction_on(schedule, prediction)
    x, t = x0.detach(), schedule.clean
    for t_up in reversed(schedule.grid(steps, spacing, 0, start_t)):
        _, eps = denoise(model, schedule, x, t_up, prediction=prediction, clip_x0=False)
        (a, s), (a_up, s_up) = schedule.scales(t), schedule.scales(t_up)
        x0_hat = (x - s * eps) / a
        x = a_up * x0_hat + s_up * eps
        t = t_up
    return x
