r"""The consistency function and its few-step sampler (Latent Consistency Models; the few-steps notebook).

A diffusion model's probability-flow ODE carries every noisy point x_t along one trajectory down to the data. A
consistency model [1] learns the map from any point of a trajectory to the trajectory's end, f(x_t, t), so one
model call turns noise into an image; a few calls, each followed by fresh noise, refine it. Latent Consistency
Models [2] distil one from Stable Diffusion in its latent space (course_lib.lcm trains one; this module holds the
function and the sampler, which the one sampling path, course_lib.sampling, uses as its "lcm" sampler).

Notation (timesteps as in course_lib.schedules; tau is the network's time, `schedule.model_time(t)`: the integer
timestep itself on a NoiseSchedule, t * 1000 on a rectified flow's FlowSchedule):
    x_t = a_t x0 + s_t eps      a point of the path (a = sqrt(abar_t), s = sqrt(1 - abar_t))
    F(x_t, t)                   the network's estimate of x0 from its epsilon, x0 or v output
                                (course_lib.forward.x0_eps_from, unclipped)
    f(x_t, t)                   the consistency function
    sigma_data = 0.5            the data's standard deviation assumed by the boundary coefficients
    timestep_scaling = 10       LCM's stretch of tau before the coefficients see it

The parametrisation ([1], Sec. 3; LCM's form [2], with diffusers' LCMScheduler's constants):
    f(x, t)   = c_skip(tau) x + c_out(tau) F(x, t)
    c_skip(tau) = sigma_data^2 / ((timestep_scaling tau)^2 + sigma_data^2)
    c_out(tau)  = (timestep_scaling tau) / sqrt((timestep_scaling tau)^2 + sigma_data^2)
At tau = 0, c_skip = 1 and c_out = 0: f(x, 0) = x, the boundary condition a consistency function must meet
(the trajectory's end is where it already is). Already at tau = 19 (the first step of LCM's grid), c_skip is
7e-6: away from the boundary f is the network's x0 estimate, and the boundary holds by construction.

The skipping grid ([2], Sec. 4): distillation visits N = distilled_steps timesteps k, 2k, ..., N k less 1 (k = T / N:
20 of 1000 for N = 50, LCM's), the course's "trailing" grid of N steps, and the boundary at tau = 0. A sampler of
`steps` <= N steps visits the grid points at indices floor(i N / steps), i = 0..steps-1 (LCMScheduler's choice),
so every time it asks about is one the student was trained at; more steps than N are refused by name.

Multistep consistency sampling (Algorithm 1 of [1]):
    x = z ~ N(0, I) at tau_0 (the grid's first time)
    for each time t_i:    x0_hat = f(x, t_i)
                          x = a_{t_{i+1}} x0_hat + s_{t_{i+1}} z_i,   z_i ~ N(0, I)   (the forward jump, `noised`)
    the last step keeps x0_hat.
One step is the consistency model's one-shot generation; each further step trades a model call for detail.

References:
  [1] Song, Dhariwal, Chen, Sutskever. Consistency Models. 2023. https://arxiv.org/abs/2303.01469
  [2] Luo, Tan, Huang, Li, Zhao. Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
      Inference. 2023. https://arxiv.org/abs/2310.04378
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from .checks import check_int
from .forward import x0_eps_from
from .schedules import FlowSchedule, NoiseSchedule

TIMESTEP_SCALING = 10.0        # LCM's (and diffusers' LCMScheduler's timestep_scaling)
SIGMA_DATA = 0.5               # the data's standard deviation the boundary coefficients assume (EDM's, [1]'s)
DISTILLED_STEPS = 50           # LCM's skipping grid: 50 of SD's 1000 timesteps (k = 20)

Path = NoiseSchedule | FlowSchedule


def check_positive(name: str, value: float) -> float:
    """value as a float if it is a finite number > 0; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def boundary_scalings(tau: float | torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING,
                      sigma_data: float = SIGMA_DATA) -> tuple:
    r"""(c_skip, c_out) at network time tau (LCM's coefficients; see the module's docstring): c_skip = sigma_data^2 /
    ((scaling tau)^2 + sigma_data^2), c_out = scaling tau / sqrt((scaling tau)^2 + sigma_data^2). (1, 0) at tau = 0."""
    scaling, sigma = check_positive("timestep_scaling", timestep_scaling), check_positive("sigma_data", sigma_data)
    scaled = tau * scaling
    c_skip = sigma ** 2 / (scaled ** 2 + sigma ** 2)
    c_out = scaled / (scaled ** 2 + sigma ** 2) ** 0.5
    return c_skip, c_out


def consistency_function(model: Callable[..., torch.Tensor], path: Path, x_t: torch.Tensor, t: torch.Tensor, *,
                         prediction: str = "epsilon", cond: tuple = (), timestep_scaling: float = TIMESTEP_SCALING,
                         sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out F(x_t, t) for a batch: t (B,) path times, F the x0 estimate of
    model(x_t, tau, *cond) (Song et al. 2023's parametrisation with LCM's coefficients). Differentiable: distillation
    trains through it."""
    t = torch.as_tensor(t)
    if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"give one time per image, shape ({x_t.shape[0]},); got {tuple(t.shape)}")
    t = t.to(x_t.device)
    a, s, _ = path.scales_at(t, x_t)
    tau = path.model_times(t)
    out = model(x_t, tau, *cond)
    x0_hat, _ = x0_eps_from(prediction, out.to(x_t.dtype), x_t, a, s)
    c_skip, c_out = boundary_scalings(tau.to(torch.float64).view(-1, *([1] * (x_t.ndim - 1))), timestep_scaling,
                                      sigma_data)
    return c_skip.to(x_t.dtype) * x_t + c_out.to(x_t.dtype) * x0_hat


def skipping_grid(path: Path, distilled_steps: int = DISTILLED_STEPS) -> list:
    """The N = distilled_steps times distillation visits, descending (LCM: k n - 1 for n = N..1, k = T / N; the
    "trailing" grid of N steps), then the boundary time 0 where f is the identity."""
    distilled_steps = check_int("distilled_steps", distilled_steps, 1,
                                hint=" (the number of timesteps on the grid the student is distilled on)")
    return path.grid(distilled_steps, "trailing") + [0]


def consistency_timesteps(path: Path, steps: int, distilled_steps: int = DISTILLED_STEPS, *,
                          spacing: str = "trailing", offset: int = 0, start: float | None = None,
                          final_t: int = -1) -> list:
    """The `steps` descending times a consistency sampler visits: the skipping grid's points at indices
    floor(i N / steps) (LCMScheduler's choice). Refuses, by name, more steps than the student's grid holds and the
    other samplers' timestep options (a consistency model is asked only where it was trained)."""
    steps = check_int("steps", steps, 1)
    if steps > distilled_steps:
        raise ValueError(f"the 'lcm' sampler takes at most distilled_steps={distilled_steps} steps, the grid the "
                         f"student was distilled on (it has never been asked between those times); got steps={steps}. "
                         f"Use fewer steps (1, 2, 4 or 8 are the usual), or distil on a finer grid")
    if spacing != "trailing" or offset != 0 or start is not None or final_t != -1:
        raise ValueError(f"the 'lcm' sampler visits the student's own skipping grid and ends on its consistency "
                         f"output: leave spacing 'trailing', offset 0, start_t None and final_t -1; got spacing "
                         f"{spacing!r}, offset {offset!r}, start_t {start!r}, final_t {final_t!r}")
    grid = skipping_grid(path, distilled_steps)[:-1]
    return [grid[(i * distilled_steps) // steps] for i in range(steps)]


def consistency_step(path: Path, x_t: torch.Tensor, t: float, x0_hat: torch.Tensor, t_next: float | None = None,
                     noise: torch.Tensor | None = None, timestep_scaling: float = TIMESTEP_SCALING,
                     sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of multistep consistency sampling (Algorithm 1 of Song et al. 2023): (x_{t_next}, f) with
    f = c_skip x_t + c_out x0_hat and x_{t_next} = a' f + s' noise; the last step (t_next None) gives (f, f)."""
    tau = float(path.model_time(t, 1)[0])
    c_skip, c_out = boundary_scalings(tau, timestep_scaling, sigma_data)
    f = c_skip * x_t + c_out * x0_hat
    if t_next is None:
        return f, f
    if noise is None:
        raise ValueError(f"a consistency step to t_next={t_next} adds fresh noise: pass noise=torch.randn_like(x_t)")
    a, s = path.scales(t_next)
    return a * f + s * noise, f


__all__ = ["TIMESTEP_SCALING", "SIGMA_DATA", "DISTILLED_STEPS", "check_positive", "boundary_scalings",
           "consistency_function", "skipping_grid", "consistency_timesteps", "consistency_step"]
