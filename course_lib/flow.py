r"""Rectified flow (flow matching): the objective of Stable Diffusion 3 and FLUX, next to DDPM's.

The path. Data x0 and noise eps ~ N(0, I) are joined by a straight line, t from 0 (data) to 1 (noise) [1, 2]:

    x_t = (1 - t) x0 + t eps,            dx_t / dt = eps - x0   (the velocity, the same all along the line)

A network v_theta(x_t, t) learns the velocity by regression, E || v_theta(x_t, t) - (eps - x0) ||^2. Its optimum
is the conditional mean v*(x, t) = E[eps - x0 | x_t = x]: many lines cross each point, so v* averages them, and the
ODE dx/dt = v*(x, t) carries the noise distribution at t = 1 to the data distribution at t = 0 (it has the
same marginals as the lines [1, Thm. 3.3]). Sampling integrates that ODE backwards with Euler or Heun steps.

How it relates to DDPM. A variance-preserving point x = a x0 + s eps (a^2 + s^2 = 1, a = sqrt(alpha_bar)) is the
rectified-flow point at t = s / (a + s), scaled by 1 / (a + s): the two paths visit the same directions, at other
speeds and scales, so DDPM's probability-flow ODE and the flow ODE differ in parametrisation, not in kind
(`vp_to_flow`). v-prediction's target a eps - s x0 is the VP path's own velocity d x / d phi at angle phi
(a = cos phi, s = sin phi); the flow velocity eps - x0 is that of the straight path.

Timesteps. SD 3 does not draw t uniformly: it found logit-normal sampling best, t = sigmoid(n) with
n ~ N(m, s^2), which puts more training on the middle of the path, where the velocity is hardest to predict
([3], Sec. 3.1 and Table 1; m = 0, s = 1 is their choice).

Reflow [1]. The first flow's lines cross, so its ODE paths curve and few-step sampling errs. Reflow pairs each
noise eps with the data point the *trained* flow's ODE takes it to, x0 = ODE(eps), and trains a second flow on
those pairs: their lines no longer cross as much, the new paths are straighter, and one Euler step gets closer.
`straightness` measures it: E over paths of the mean over t of || (x_1 - x_0) - v(x_t, t) ||^2, zero when every
path is a straight line run at constant speed.

For Gaussian data the optimal velocity is known in closed form (`gaussian_velocity`); the tests integrate it and
recover the data's mean and variance.

References:
  [1] Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow. 2022.
      https://arxiv.org/abs/2209.03003
  [2] Lipman et al. Flow Matching for Generative Modeling. 2023. https://arxiv.org/abs/2210.02747
  [3] Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (SD 3). 2024.
      https://arxiv.org/abs/2403.03206
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_choice, check_int
from .forward import path_loss
from .schedules import FLOW, TIME_SCALE, TIMESTEP_SAMPLING, FlowSchedule, sample_timesteps  # noqa: F401  (also from here)

SOLVERS = ("euler", "heun")   # `sample_flow`'s; a network is sampled with course_lib.sampling (FlowSchedule)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x, t of shape (B,)) -> dx/dt


def _per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t as (B, 1, ..., 1) in x's dtype and device, from a float or a (B,) tensor."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a number or one value per sample, shape ({x.shape[0]},); got {tuple(t.shape)}")
    if (t < 0).any() or (t > 1).any():
        raise ValueError("t must lie in [0, 1] (0: data, 1: noise)")
    return t.view(-1, *([1] * (x.ndim - 1)))


def flow_path(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise: the straight line from the data (t = 0) to the noise (t = 1)."""
    tt = _per_sample(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the straight path: noise - x0."""
    return noise - x0


def vp_to_flow(x_vp: torch.Tensor, alpha_bar: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """A variance-preserving point a x0 + s noise (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)) as a point of the
    straight path: (x_vp / (a + s), t = s / (a + s)). Per sample when alpha_bar has one value per sample."""
    alpha_bar = _per_sample(alpha_bar, x_vp)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return x_vp / (a + s), (s / (a + s)).flatten()


@dataclass
class FlowTerms:
    """One evaluation of the flow objective."""
    loss: torch.Tensor           # () the mean over the batch
    per_sample: torch.Tensor     # (B,) each sample's squared error, averaged over its elements
    output: torch.Tensor         # the network's velocity, float32
    x_t: torch.Tensor            # the point on the path
    target: torch.Tensor         # noise - x0
    t: torch.Tensor              # (B,) in (0, 1)


def flow_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, *, generator: torch.Generator | None = None,
              t: torch.Tensor | None = None, noise: torch.Tensor | None = None, sampling: str = "uniform",
              cond: tuple = (), time_scale: float = TIME_SCALE) -> FlowTerms:
    """The rectified-flow loss on clean data x0: t (from `sampling`, unless given) then noise are drawn from
    `generator` on the CPU, x_t = flow_path(x0, noise, t), and model(x_t, t * time_scale, *cond) regresses
    noise - x0. It is the course's one objective (course_lib.forward.path_loss) on the straight path."""
    check_choice("timestep sampling", sampling, TIMESTEP_SAMPLING)
    if t is None:
        t = sample_timesteps(x0.shape[0], sampling, generator=generator)
    t = torch.as_tensor(t).to(x0.device, torch.float32)
    terms = path_loss(model, FlowSchedule(sampling, time_scale), x0, prediction=FLOW, t=t, noise=noise,
                      generator=generator, cond=cond)
    return FlowTerms(terms.loss, terms.per_sample, terms.output, terms.x_t, velocity_target(x0, terms.noise), t)


def model_velocity(model: Callable[..., torch.Tensor], cond: tuple = (), time_scale: float = TIME_SCALE) -> Velocity:
    """A network trained by `flow_loss` as a velocity field v(x, t) for `sample_flow`."""
    return lambda x, t: model(x, t * time_scale, *cond).float()


@torch.no_grad()
def sample_flow(velocity: Velocity, noise: torch.Tensor, steps: int, solver: str = "euler",
                return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate dx/dt = velocity(x, t) from t = 1 (x = noise) to t = 0 in `steps` equal steps.

    "euler": x <- x - dt v(x, t), one velocity evaluation a step. "heun": Euler's step, then the mean of the
    velocities at both ends (a second-order method; two evaluations every step, the last one included: the
    velocity is defined at t = 0, unlike a diffusion model's noise estimate at sigma = 0).
    return_path: also the list of states, noise first."""
    check_choice("solver", solver, SOLVERS)
    steps = check_int("steps", steps, 1)
    if not torch.isfinite(noise).all():
        raise ValueError(f"noise holds {(~torch.isfinite(noise)).sum().item()} NaN or infinite value(s); the flow "
                         f"starts from finite Gaussian noise (torch.randn)")
    grid = torch.linspace(1.0, 0.0, steps + 1)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))       # float32, or float64 if given
    path = [x]
    for k in range(steps):
        t, t_next = grid[k].item(), grid[k + 1].item()
        dt = t - t_next
        tt = torch.full((x.shape[0],), t, device=x.device)
        v = velocity(x, tt)
        x_euler = x - dt * v
        if solver == "heun":
            v_next = velocity(x_euler, torch.full((x.shape[0],), t_next, device=x.device))
            x = x - dt * 0.5 * (v + v_next)
        else:
            x = x_euler
        path.append(x)
    return (x, path) if return_path else x


def reflow_pairs(velocity: Velocity, noise: torch.Tensor, steps: int = 100,
                 solver: str = "heun") -> tuple[torch.Tensor, torch.Tensor]:
    """Reflow's training pairs: (ODE(noise), noise), the data point the flow's own ODE takes each noise to."""
    return sample_flow(velocity, noise, steps, solver), noise


@torch.no_grad()
def straightness(velocity: Velocity, noise: torch.Tensor, steps: int = 100) -> float:
    """Liu et al.'s straightness of the ODE paths from `noise`: the mean over paths and over t of
    || (x_1 - x_0) - v(x_t, t) ||^2 (per element), along Euler paths of `steps` steps. 0 for straight paths."""
    end, path = sample_flow(velocity, noise, steps, "euler", return_path=True)
    chord = (path[0] - end).flatten(1)                                   # x_1 - x_0 of each path
    grid = torch.linspace(1.0, 0.0, steps + 1)
    total = 0.0
    for k in range(steps):
        v = velocity(path[k], torch.full((noise.shape[0],), grid[k].item(), device=noise.device)).flatten(1)
        total += (chord - v).pow(2).mean(1).mean().item()
    return total / steps


def gaussian_velocity(mean: torch.Tensor, var: torch.Tensor) -> Velocity:
    """The optimal velocity E[noise - x0 | x_t = x] when x0 ~ N(mean, diag(var)) and noise ~ N(0, I), in closed
    form. With V = (1 - t)^2 var + t^2 (the variance of x_t) and r = x - (1 - t) mean:
    E[x0 | x] = mean + (1 - t) var r / V and E[noise | x] = t r / V."""
    mean, var = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(var, dtype=torch.float64)
    if (var <= 0).any():
        raise ValueError("var must be positive")

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double().view(-1, *([1] * (x.ndim - 1)))
        m, s2 = mean.to(x.device), var.to(x.device)
        V = (1 - tt) ** 2 * s2 + tt ** 2
        r = x.double() - (1 - tt) * m
        return (tt * r / V - (m + (1 - tt) * s2 * r / V)).to(x.dtype)
    return v


__all__ = ["TIMESTEP_SAMPLING", "SOLVERS", "TIME_SCALE", "flow_path", "velocity_target", "vp_to_flow",
           "sample_timesteps", "FlowTerms", "flow_loss", "model_velocity", "sample_flow", "reflow_pairs",
           "straightness", "gaussian_velocity"]
