r"""Samplers: turning a trained denoiser and pure noise into images.

Every sampler walks down a short list of timesteps t_0 > t_1 > ... > t_{N-1} (see `timesteps`)
and then lands on the clean image. At each timestep t it asks the model for its estimate of
the clean image and of the noise, then moves x_t to x_{t'} at the next timestep t' < t. The
samplers differ only in that move.

Notation (course_lib.schedules; timesteps are integers 0..T-1, and t' = -1 stands for the clean
end of the chain, where abar = 1):
    abar_t                      \bar\alpha_t                signal power left at step t
    a_t = sqrt(abar_t)          \alpha_t in DPM-Solver      signal scale
    s_t = sqrt(1 - abar_t)      \sigma_t in DPM-Solver      noise scale
    lambda_t = log(a_t / s_t)   \lambda_t                   half the log signal-to-noise ratio
    x0_hat, eps_hat             the model's estimate of x_0 and of the noise at (x_t, t)

The model may predict epsilon, x0 or v (course_lib.forward.PREDICTIONS); `denoise`
turns its output into (x0_hat, eps_hat). With clip_x0, x0_hat is clamped to [-1, 1] and
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
model(x_t, t), so every sampler here serves text-to-image unchanged. `SamplerSettings` gathers what a
text-to-image pipeline samples with (sampler, steps, guidance scale, timesteps); SD 1.5's published
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

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .flow import SOLVERS as FLOW_SOLVERS
from .forward import check_images, check_prediction, predicted_x0_eps
from .guidance import GuidedModel, check_rescale, classifier_free_guidance, conditional  # noqa: F401  (also importable from here)
from .schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SPACINGS = ("trailing", "leading", "linspace")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- timesteps -----------------------------------------------------------------------------

def timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing", offset: int = 0,
              start: int | None = None) -> torch.Tensor:
    """The descending timesteps a `steps`-step sampler visits (the spacings of [5], as in diffusers' DDIM).

    trailing   round(T - i T/steps) - 1: starts at T-1, the noisiest step   (default)
    leading    i * (T // steps), reversed: ends at 0                        (Stable Diffusion's, less its +1)
    linspace   round(linspace(0, T-1, steps)), reversed: both ends          (steps=1: T-1; diffusers: 0)

    offset is added to every timestep (SD 1.5's scheduler config: "leading" with steps_offset=1, so 50 steps
    visit 981, 961, ..., 1); the largest must stay below T.
    start: the noisiest timestep (default T-1): the grid is laid over 0..start instead of 0..T-1, so sampling
    can begin from a partly noised image (SDEdit's strength, image editing) or stop inverting there.
    """
    T = schedule.T
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start < T:
            raise ValueError(f"start, the first timestep, must be an int from 0 to T-1={T - 1}; got {start!r}")
        T = int(start) + 1                       # the grid over 0..start
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
        limit = f"T={T} (the schedule's length)" if start is None else f"start + 1 = {T}"
        raise ValueError(f"steps must be an int from 1 to {limit}; got {steps!r}")
    steps = int(steps)
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        # numpy's arange(T, 0, -T/steps) computes T + i * ((T - T/steps) - T); the same rounding here
        # keeps ties (x.5) going the same way as in diffusers.
        ts = torch.round(T + i * ((T - T / steps) - T)) - 1
    elif spacing == "leading":
        ts = (i * (T // steps)).flip(0)
    elif spacing == "linspace":
        ts = i * ((T - 1) / (steps - 1)) if steps > 1 else i
        ts[-1] = T - 1
        ts = torch.round(ts).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {list(SPACINGS)}")
    ts = ts.long()
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0 \
            or ts.max() + offset >= schedule.T:
        raise ValueError(f"offset must be an int >= 0 that keeps the largest timestep ({ts.max().item()}) below "
                         f"T={schedule.T}; got {offset!r}")
    return ts + int(offset)


def alpha_bar_at(schedule: NoiseSchedule, t: int) -> float:
    """abar_t as a Python float (float64), with abar = 1 at t = -1, the clean end."""
    if t == -1:
        return 1.0
    if not 0 <= t < schedule.T:
        raise ValueError(f"timestep {t} out of range; valid are -1 (clean) and 0..{schedule.T - 1}")
    return schedule.alphas_cumprod[t].item()


def _check_order(t: int, t_next: int) -> None:
    if not -1 <= t_next < t:
        raise ValueError(f"a sampling step goes down in time: need -1 <= t_next < t; got t={t}, t_next={t_next}")


# --- the model's estimate ----------------------------------------------------------------------

def denoise(model: Model, schedule: NoiseSchedule, x_t: torch.Tensor, t: int, *,
            prediction: str = "epsilon", clip_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the model at (x_t, t) and return (x0_hat, eps_hat); with clip_x0, x0_hat in [-1, 1] and eps_hat
    recomputed from it."""
    B = x_t.shape[0]
    t_batch = torch.full((B,), t, dtype=torch.long, device=x_t.device)
    with torch.no_grad():
        out = model(x_t, t_batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor; got {type(out).__name__} (for a diffusers UNet, "
                        f"wrap it: lambda x, t: unet(x, t).sample)")
    if out.shape != x_t.shape:
        raise ValueError(f"the model's output has shape {tuple(out.shape)}; expected x_t's {tuple(x_t.shape)}")
    out = out.to(x_t.dtype)
    abar = torch.tensor(alpha_bar_at(schedule, t), dtype=x_t.dtype, device=x_t.device)
    if prediction == "epsilon" and abar == 0:
        raise ValueError(f"an epsilon model cannot be asked at t={t}: abar_t = 0 there (zero terminal SNR), and its "
                         f"x0 estimate (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by 0. Use a v (or x0) model, "
                         f"as Lin et al. 2024 do, or start below t={t} (start_t).")
    x0, eps = predicted_x0_eps(prediction, out, x_t, abar)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    return x0, eps


# --- one step of each sampler -------------------------------------------------------------------

def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_next: int, x0_pred: torch.Tensor,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample q(x_{t_next} | x_t, x0_hat): Eqs. 6-7 of Ho et al. 2020 over a stride t -> t_next."""
    _check_order(t, t_next)
    ab_t, ab_next = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_next)
    beta = 1 - ab_t / ab_next                                   # beta' of the whole stride
    coef_x0 = math.sqrt(ab_next) * beta / (1 - ab_t)            # posterior_mean_coef1
    coef_xt = math.sqrt(1 - beta) * (1 - ab_next) / (1 - ab_t)  # posterior_mean_coef2
    variance = (1 - ab_next) / (1 - ab_t) * beta                # beta~
    mean = coef_x0 * x0_pred + coef_xt * x_t
    if variance == 0:
        return mean
    if noise is None:
        raise ValueError(f"ddpm_step from t={t} to t_next={t_next} adds noise: pass noise=torch.randn_like(x_t)")
    return mean + math.sqrt(variance) * noise


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_next: int, x0_pred: torch.Tensor,
              eps_pred: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t_next} = sqrt(abar') x0_hat + sqrt(1 - abar' - std^2) eps_hat + std z: Eqs. 12, 16 of Song et al."""
    _check_order(t, t_next)
    ab_t, ab_next = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_next)
    std = eta * math.sqrt((1 - ab_next) / (1 - ab_t) * (1 - ab_t / ab_next))
    x = math.sqrt(ab_next) * x0_pred + math.sqrt(max(1 - ab_next - std ** 2, 0.0)) * eps_pred
    if std == 0:
        return x
    if noise is None:
        raise ValueError(f"ddim_step with eta={eta} adds noise: pass noise=torch.randn_like(x_t)")
    return x + std * noise


def dpm_solver_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_next: int, x0_pred: torch.Tensor,
                    last: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Algorithm 2 of Lu et al. 2022); `last` = (t_last, x0_hat there) or None
    for a first-order step."""
    _check_order(t, t_next)
    if t_next == -1:          # s = 0, lambda = +inf: the first-order step lands on x0_hat
        return x0_pred
    ab_t, ab_next = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_next)
    a_next, s_t, s_next = math.sqrt(ab_next), math.sqrt(1 - ab_t), math.sqrt(1 - ab_next)
    lam_t, lam_next = 0.5 * schedule.log_snr[t].item(), 0.5 * schedule.log_snr[t_next].item()
    h = lam_next - lam_t
    D = x0_pred
    if last is not None:
        t_last, x0_last = last
        if not t_last > t:
            raise ValueError(f"the previous step's timestep must be above t={t}; got t_last={t_last}")
        r = (lam_t - 0.5 * schedule.log_snr[t_last].item()) / h
        D = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * x0_last
    return (s_next / s_t) * x_t - a_next * math.expm1(-h) * D


# --- the loop -------------------------------------------------------------------------------

@dataclass
class ReverseStep:
    """One moment of the reverse process: the state x_t before the update at timestep t, and the
    model's x_0 estimate there. The last one has index = steps, t = -1 and x_t = x0_pred = the result."""
    index: int
    t: int
    x_t: torch.Tensor
    x0_pred: torch.Tensor


def _check_sampler(sampler: str, eta: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
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


def reverse_process(model: Model, schedule: NoiseSchedule, shape: Sequence[int], *, sampler: str = "ddim",
                    steps: int = 50, eta: float = 0.0, prediction: str = "epsilon",
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, x_T: torch.Tensor | None = None, clip_x0: bool = True,
                    spacing: str = "trailing", offset: int = 0, final_t: int = -1, start_t: int | None = None,
                    progress: bool = False) -> Iterator[ReverseStep]:
    """Run a sampler, yielding a ReverseStep at every timestep and then the result (cf. guided-diffusion's
    p_sample_loop_progressive); `sample` keeps only the result.

    model        model(x_t, t) with t a (B,) long tensor; its output means `prediction` (epsilon, x0 or v).
                 Called under torch.no_grad(); put it in eval mode (and use its EMA weights) first.
    shape        (B, C, H, W) = (batch, channels, height, width) of the result
    sampler      one of SAMPLERS
    steps        how many model calls; timesteps from `timesteps(schedule, steps, spacing, offset)`
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
    progress     show a tqdm progress bar
    """
    _check_sampler(sampler, eta)
    check_prediction(prediction)
    shape = _check_shape(shape)
    ts = timesteps(schedule, steps, spacing, offset, start=start_t).tolist()
    if isinstance(final_t, bool) or not isinstance(final_t, numbers.Integral) or not -1 <= final_t < ts[-1]:
        raise ValueError(f"final_t, where the last step lands, must be -1 (clean, abar = 1) or a timestep below "
                         f"the last one visited ({ts[-1]}); got {final_t!r}")
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
    pairs = zip(ts, ts[1:] + [int(final_t)])
    for i, (t, t_next) in enumerate(tqdm(pairs, total=len(ts), desc=sampler, disable=not progress)):
        x0, eps = denoise(model, schedule, x, t, prediction=prediction, clip_x0=clip_x0)
        yield ReverseStep(i, t, x, x0)
        if sampler == "ddpm":
            noise = _randn(shape, generator, device, dtype) if t_next >= 0 else None
            x = ddpm_step(schedule, x, t, t_next, x0, noise)
        elif sampler == "ddim":
            noise = _randn(shape, generator, device, dtype) if eta > 0 and t_next >= 0 else None
            x = ddim_step(schedule, x, t, t_next, x0, eps, eta, noise)
        else:
            x = dpm_solver_step(schedule, x, t, t_next, x0, last)
            last = (t, x0)
    yield ReverseStep(len(ts), int(final_t), x, x)


def sample(model: Model, schedule: NoiseSchedule, shape: Sequence[int], **options) -> torch.Tensor:
    """Generate a batch x_0 of `shape` (B, C, H, W) with one of SAMPLERS: the last state of `reverse_process`,
    whose keywords (sampler, steps, eta, prediction, generator, device, dtype, x_T, clip_x0, spacing, offset,
    final_t, start_t, progress) it takes and documents."""
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


def ddim_invert(model: Model, schedule: NoiseSchedule, x0: torch.Tensor, *, steps: int = 50,
                prediction: str = "epsilon", spacing: str = "trailing", start_t: int | None = None) -> torch.Tensor:
    """DDIM inversion: the eta=0 update run from x_0 up to the first sampling timestep, giving the x_T that
    `ddim_sample(..., eta=0, x_T=x_T, clip_x0=False)` maps back to (about) x0.

    Going up from t to t' > t, the model is asked at (x_t, t') (the step that sampling will undo is
    evaluated at t' too), and x_{t'} = a_{t'} x0_hat + s_{t'} eps_hat with x0_hat = (x_t - s_t eps_hat) / a_t.
    No clipping: clipping would make the map lossy.

    Caveat: the first sampling step divides by sqrt(abar) at the top timestep. Where that is almost zero
    (the cosine schedule's abar at t = T-1 is about 2e-9), any error in the model's noise estimate is
    amplified by about 1 / sqrt(abar) and a trained model's round trip does not reconstruct (the exact
    denoiser of the tests has no error, so it does). start_t inverts only up to that timestep (the grid of
    `timesteps(..., start=start_t)`); sample back with the same start_t."""
    check_images(x0, "x0", data_range=False)
    check_prediction(prediction)
    x, t = x0.detach(), -1
    for t_up in timesteps(schedule, steps, spacing, start=start_t).flip(0).tolist():
        _, eps = denoise(model, schedule, x, t_up, prediction=prediction, clip_x0=False)
        ab_t, ab_up = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_up)
        x0_hat = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        x = math.sqrt(ab_up) * x0_hat + math.sqrt(1 - ab_up) * eps
        t = t_up
    return x


# --- what a text-to-image pipeline samples with ---------------------------------------------------

@dataclass(frozen=True)
class SamplerSettings:
    """A pipeline's sampler, as one value: course_lib.pipeline.TextToImage and course_lib.sd.StableDiffusion
    keep one (the tiny SD's: TINY_SD_SAMPLER; SD 1.5's scheduler: course_lib.sd.SD15_SAMPLER), and a call's
    keywords replace fields of it: `settings.replace(steps=50)`."""
    sampler: str = "ddim"           # one of SAMPLERS; for a rectified-flow model one of course_lib.flow.SOLVERS
    steps: int = 20                 # model calls (twice the batch each with guidance), 1..T
    guidance_scale: float = 4.0     # 0: ignore the prompt; 1: plain conditional model; > 1: follow it harder
    guidance_rescale: float = 0.0   # phi of rescaled guidance (Lin et al. 2024), in [0, 1]; 0: plain guidance
    eta: float = 0.0                # DDIM's fresh noise: 0 deterministic, 1 as much as DDPM
    spacing: str = "trailing"       # which timesteps (see `timesteps`): one of SPACINGS
    offset: int = 0                 # added to every timestep (SD 1.5: 1)
    final_t: int = -1               # where the last step lands: -1 the clean end, 0 abar_0 (SD 1.5)
    start_t: int | None = None      # the first timestep (None: T-1); below it to edit a partly noised image

    def __post_init__(self):
        if self.sampler not in SAMPLERS + FLOW_SOLVERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid are {', '.join(SAMPLERS)} (a diffusion "
                             f"model's) and {', '.join(FLOW_SOLVERS)} (a rectified-flow model's)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"steps must be an integer from 1 to the schedule's length T; got {self.steps!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not 0 <= g < math.inf:
            raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance); got {g!r}")
        check_rescale(self.guidance_rescale, "guidance_rescale")
        if self.sampler in SAMPLERS:
            _check_sampler(self.sampler, self.eta)
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r}; valid are {', '.join(SPACINGS)}")
        for name, low in (("offset", 0), ("final_t", -1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")

    def replace(self, **changes) -> "SamplerSettings":
        """A copy with the fields given changed (and checked again); a field given as None keeps its value, so a
        pipeline's call can pass its keywords straight through."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def options(self) -> dict:
        """The keywords of `sample` / `reverse_process` these settings give (all but the guidance fields)."""
        options = {"sampler": self.sampler, "steps": int(self.steps), "eta": self.eta, "spacing": self.spacing,
                   "offset": int(self.offset), "final_t": int(self.final_t)}
        return options if self.start_t is None else {**options, "start_t": int(self.start_t)}


TINY_SD_SAMPLER = SamplerSettings()     # the course's tiny SD (notebook 09): DDIM, 20 trailing steps, guidance 4
