r"""The forward (noising) process of a diffusion model, and its posterior.

Notation (Ho et al. 2020 [1]; timestep convention of course_lib.schedules: t = 0 .. T-1):
    x0          x_0             a clean image, scaled to [-1, 1]
    x_prev      x_{t-1}         the image one step earlier (x_0 itself when t = 0)
    x_t         x_t             the noisy image at step t
    alpha_bar   \bar\alpha_t    signal power left at step t, schedule.alphas_cumprod[t]; abar_t in formulas
    noise       \epsilon        standard Gaussian noise, N(0, I)

Equations (and, at the end of this file, the training objective built on them):
    one Markov step      q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)                    (Eq. 2)
    closed form          q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)                   (Eq. 4)
    posterior            q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)                               (Eqs. 6-7)
        mu~_t   = coef1_t x_0 + coef2_t x_t
        coef1_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t),  coef2_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)
        beta~_t = (1 - abar_{t-1}) beta_t / (1 - abar_t)

The mix in Eq. 4 is variance preserving: if x_0 has unit variance and is independent
of the noise, Var(x_t) = abar_t + (1 - abar_t) = 1 at every t.

References:
  [1] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020. https://arxiv.org/abs/2006.11239
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .checks import check_choice, has_values
from .schedules import FLOW, PREDICTIONS, FlowSchedule, NoiseSchedule

RANGE_TOLERANCE = 1e-3


def check_images(x: torch.Tensor, name: str = "x0", data_range: bool = True) -> None:
    """Raise a clear error unless x is a finite float (B, C, H, W) batch (and, for data, within [-1, 1])."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W); got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a batch axis with x[None])" if x.ndim == 3 else ""
        raise ValueError(f"{name} must have shape (B, C, H, W) = (batch, channels, height, width); "
                         f"got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [-1, 1]; got dtype {x.dtype} "
                        f"(convert uint8 images with course_lib.data.to_model_range)")
    if not has_values(x):       # a fake tensor (course_lib.memory's accounting): no values to check
        return
    if x.numel() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        rows = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        raise ValueError(f"{name} holds {bad} NaN or infinite value(s) of {x.numel()}, in image(s) {shown}; every "
                         f"value must be a finite number (in [-1, 1] for images). Check what produced them (a "
                         f"damaged file, a diverged model, a division by zero) before training or sampling.")
    if data_range and x.numel():
        lo, hi = x.min().item(), x.max().item()
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"{name} must hold values in [-1, 1]; got min {lo:.3g}, max {hi:.3g} "
                             f"(scale 0..255 images with x / 127.5 - 1, 0..1 images with 2 * x - 1)")


def _noise_like(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if noise is None:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the image's shape {tuple(x.shape)}; got {tuple(noise.shape)}")
    return noise


def vp_mix(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Variance-preserving mix sqrt(abar) x0 + sqrt(1 - abar) noise (the right side of Eq. 4)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    if has_values(alpha_bar) and ((alpha_bar < 0).any() or (alpha_bar > 1).any()):
        raise ValueError("alpha_bar must lie in [0, 1]")
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def linear_mix(x0: torch.Tensor, noise: torch.Tensor, level: float | torch.Tensor) -> torch.Tensor:
    """The linear mix x0 (1 - level) + noise level: NOT variance preserving (kept to show why)."""
    level = torch.as_tensor(level, dtype=x0.dtype, device=x0.device)
    return x0 * (1 - level) + noise * level


def q_step(schedule: NoiseSchedule, x_prev: torch.Tensor, t: torch.Tensor | int,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Markov step: sample x_t ~ q(x_t | x_{t-1}) (Eq. 2 of Ho et al.)."""
    check_images(x_prev, "x_prev", data_range=False)
    noise = _noise_like(x_prev, noise, generator)
    sqrt_alpha = schedule.extract(schedule.sqrt_alphas, t, x_prev)
    sqrt_beta = schedule.extract(schedule.betas, t, x_prev).sqrt()
    return sqrt_alpha * x_prev + sqrt_beta * noise


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor | int,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Closed form: sample x_t ~ q(x_t | x_0) in one step (Eq. 4 of Ho et al.)."""
    check_images(x0, "x0")
    noise = _noise_like(x0, noise, generator)
    return (schedule.extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + schedule.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_chain(schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator | None = None,
            ) -> Iterator[tuple[int, torch.Tensor]]:
    """Run the Markov chain from x_0, yielding (t, x_t) for t = 0 .. T-1."""
    check_images(x0, "x0")
    x = x0
    for t in range(schedule.T):
        x = q_step(schedule, x, t, generator=generator)
        yield t, x


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7 of Ho et al.)."""
    check_images(x0, "x0", data_range=False)  # a model's x0 estimate may leave [-1, 1]
    check_images(x_t, "x_t", data_range=False)
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 and x_t must have the same shape; got {tuple(x0.shape)} and {tuple(x_t.shape)}")
    mean = (schedule.extract(schedule.posterior_mean_coef1, t, x_t) * x0
            + schedule.extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
    variance = schedule.extract(schedule.posterior_variance, t, x_t)
    return mean, variance


# --- What the network predicts ------------------------------------------------------------------
# A denoiser sees x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and may be trained to output one of:
#     "epsilon"   the noise eps                                     (Ho et al. 2020)
#     "x0"        the clean image x0
#     "v"         v = sqrt(abar) eps - sqrt(1 - abar) x0            (Salimans & Ho 2022, arXiv 2202.00512)
# Given x_t and any one of them, the other two follow; `predicted_x0_eps` does that conversion
# for the samplers, `prediction_target` gives the training target.



def check_prediction(prediction: str) -> str:
    return check_choice("prediction type", prediction, PREDICTIONS)


def target_of(prediction: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """What a network of this prediction type should output for x_t = a x0 + s noise (`x0_eps_from` inverts it):
    epsilon: noise;  x0: x0;  v: a noise - s x0;  flow: noise - x0 (the straight path's velocity)."""
    if prediction == FLOW:
        return noise - x0
    check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    return a * noise - s * x0


def prediction_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor,
                      alpha_bar: torch.Tensor) -> torch.Tensor:
    """What a network of this prediction type should output for x_t made from (x0, noise) on a variance-
    preserving path. alpha_bar broadcasts against x0 (shape (B, 1, 1, 1) or a scalar)."""
    check_prediction(prediction)
    return target_of(prediction, x0, noise, alpha_bar.sqrt(), (1 - alpha_bar).sqrt())


def x0_eps_from(prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor,
                s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a network's output at x_t = a x0 + s eps: the one place that converts a
    prediction, for the samplers (course_lib.sampling.denoise) and the training losses.
        epsilon:  x0 = (x_t - s eps) / a
        x0:       eps = (x_t - a x0) / s
        v:        x0 = a x_t - s v,   eps = s x_t + a v     (a variance-preserving path, a^2 + s^2 = 1)
        flow:     x0 = x_t - s v,     eps = x_t + a v       (rectified flow's straight path, a + s = 1, whose
                  velocity v = dx_t/dt = eps - x0; course_lib.flow)
    """
    if prediction == FLOW:
        return x_t - s * model_output, x_t + a * model_output
    check_prediction(prediction)
    if prediction == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if prediction == "x0":
        return model_output, (x_t - a * model_output) / s
    return a * x_t - s * model_output, s * x_t + a * model_output


def predicted_x0_eps(prediction: str, model_output: torch.Tensor, x_t: torch.Tensor,
                     alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a network's output at x_t on a variance-preserving path, for any prediction type
    (`x0_eps_from` with a = sqrt(abar), s = sqrt(1 - abar))."""
    check_prediction(prediction)
    return x0_eps_from(prediction, model_output, x_t, alpha_bar.sqrt(), (1 - alpha_bar).sqrt())


# --- The training objective -------------------------------------------------------------------------------
# Written once; every model in the course that learns to denoise trains with it (the pixel and latent
# Trainer, the tiny SD, LoRA, DreamBooth, LiDB, HyperDreamBooth's fine-tuning, SD 1.5's LoRA, the memory
# measurement). Algorithm 1 of Ho et al. 2020, with the prediction types above:
#     t ~ Uniform{0..T-1},  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps      (Eq. 4)
#     loss = mean_i  w(t_i) || model(x_t, t)_i - target_i ||^2
# with w = 1 (the "simple" loss) or min-SNR-gamma weighting (Hang et al. 2023, arXiv 2303.09556): the
# loss of each sample, seen as an x0 error, is weighted by min(SNR(t), gamma); for an eps or v network
# that is  w = min(SNR, gamma) / SNR  (eps),  min(SNR, gamma) / (SNR + 1)  (v),  min(SNR, gamma)  (x0).

@dataclass
class LossTerms:
    """One evaluation of the objective: the loss and what it was made from (for logging and for the
    learned schedule, which needs the prediction)."""
    loss: torch.Tensor           # () the weighted mean over the batch
    per_sample: torch.Tensor     # (B,) each sample's weighted squared error, averaged over its pixels
    output: torch.Tensor         # the network's output, float32
    x_t: torch.Tensor            # the noisy input
    noise: torch.Tensor
    alpha_bar: torch.Tensor      # (B, 1, 1, 1)


def snr_weight(prediction: str, snr: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """min-SNR-gamma loss weight per sample (1 everywhere when gamma is None). At SNR = 0 (a zero-terminal-
    SNR schedule's last step) the eps weight min(SNR, gamma) / SNR is taken at its limit, 1."""
    check_prediction(prediction)
    if gamma is None:
        return torch.ones_like(snr)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 (5 in Hang et al.) or None for no weighting; got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def denoising_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, noise: torch.Tensor,
                   alpha_bar: torch.Tensor, t_model: torch.Tensor, *, prediction: str, cond: tuple = (),
                   min_snr_gamma: float | None = None) -> LossTerms:
    """The objective for given noise and noise levels (any alpha_bar in [0, 1], shape (B, 1, 1, 1)): noise
    x0 by Eq. 4, call model(x_t, t_model, *cond), compare with the prediction type's target."""
    x_t = vp_mix(x0, noise, alpha_bar)
    out = model(x_t, t_model, *cond).float()
    target = prediction_target(prediction, x0, noise, alpha_bar)
    per_sample = (out - target).pow(2).flatten(1).mean(1)                  # (B,)
    if min_snr_gamma is not None:
        alpha_bar64 = alpha_bar.flatten().double()
        per_sample = per_sample * snr_weight(prediction, alpha_bar64 / (1 - alpha_bar64), min_snr_gamma).to(per_sample)
    return LossTerms(per_sample.mean(), per_sample, out, x_t, noise, alpha_bar)


def path_loss(model: Callable[..., torch.Tensor], path: NoiseSchedule | FlowSchedule, x0: torch.Tensor, *,
              prediction: str, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, cond: tuple = (), min_snr_gamma: float | None = None) -> LossTerms:
    """The one training objective, on any path (course_lib.schedules): t from path.draw_times (a NoiseSchedule:
    uniform integers; a FlowSchedule: uniform or logit-normal in (0, 1)), then noise, both from `generator` on
    the CPU unless given; x_t = a_t x0 + s_t noise; model(x_t, the network's time, *cond) regresses the
    prediction's target (`target_of`). `diffusion_loss` and course_lib.flow.flow_loss are this on their path.
    x0 is any batch (B, ...): images, latents, or a flow's 2-D toy points."""
    if prediction not in path.predictions:
        raise ValueError(f"a model predicting {prediction!r} cannot train along {path!r}; it takes "
                         f"{', '.join(path.predictions)}")
    if t is None:
        t = path.draw_times(x0.shape[0], generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
    a, s, alpha_bar = path.scales_at(t, x0)
    x_t = a * x0 + s * noise
    out = model(x_t, path.model_times(t), *cond).float()
    per_sample = (out - target_of(prediction, x0, noise, a, s)).pow(2).flatten(1).mean(1)     # (B,)
    if min_snr_gamma is not None:
        alpha_bar64 = alpha_bar.flatten().double()
        per_sample = per_sample * snr_weight(prediction, alpha_bar64 / (1 - alpha_bar64), min_snr_gamma).to(per_sample)
    return LossTerms(per_sample.mean(), per_sample, out, x_t, noise, alpha_bar)


def diffusion_loss(model: Callable[..., torch.Tensor], schedule: NoiseSchedule, x0: torch.Tensor, *,
                   prediction: str = "epsilon", generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None, cond: tuple = (),
                   min_snr_gamma: float | None = None) -> LossTerms:
    """The training loss on clean data x0 (pixels, or a VAE's latents: any range) with a discrete schedule.

    t and noise are drawn from `generator` on the CPU (t first, then noise) unless given, so a run is
    the same on every device; cond is passed to the model after (x_t, t), e.g. (context, mask)."""
    check_images(x0, "x0", data_range=False)
    check_prediction(prediction)
    return path_loss(model, schedule, x0, prediction=prediction, generator=generator, t=t, noise=noise, cond=cond,
                     min_snr_gamma=min_snr_gamma)
