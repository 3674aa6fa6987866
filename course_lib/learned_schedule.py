r"""A noise schedule learned during training, as in Variational Diffusion Models (Kingma et al. 2021).

Continuous time u in [0, 1]. The schedule is a monotonic network for
    gamma(u) = -log SNR(u),      alpha_bar(u) = sigmoid(-gamma(u)),
increasing from gamma_min at u = 0 (almost clean) to gamma_max at u = 1 (almost pure noise).

The network (our own small version of VDM's monotonic MLP, Appendix H of [1]):
    g(u) = w u + sum_k a_k sigmoid(b_k u + c_k),   w, a_k, b_k > 0 (softplus of free parameters)
is increasing in u because every term is. It is then pinned to the chosen end points:
    gamma(u) = gamma_min + (gamma_max - gamma_min) (g(u) - g(0)) / (g(1) - g(0)).

Why the shape can be learned at all. In continuous time the diffusion part of the variational bound is
    L = E_{u ~ U(0,1)} [ 1/2 gamma'(u) || eps - eps_hat(x_u, u) ||^2 ]                 (Eq. 17 of [1])
and its expected value depends only on the end points, not on the shape in between ([1], Sec. 5.1): the
shape decides where in noise level the Monte Carlo estimate spends its samples. So VDM learns the shape
by minimising the *variance* of the per-sample estimate, i.e. E[L_i^2], with the denoiser fixed
(Sec. 5.2, Appendix I.2). `schedule_loss_surrogate` builds the quantity whose gradient with respect to the
schedule's parameters is the gradient of E[L_i^2]. Training the denoiser with the simple epsilon loss
at u ~ U(0, 1) then means the learned schedule also decides which noise levels the denoiser practises on.

What we simplify: VDM also learns the two end points (through the prior and reconstruction terms of
the bound); here they are fixed, by default to the end points of the linear DDPM schedule at T = 1000
(log SNR from +9.21 to -10.13), so a comparison with the fixed schedules changes only the shape.

A trained schedule becomes an ordinary `NoiseSchedule` with `to_noise_schedule(T)`
(alpha_bar at u = (t + 1) / T for t = 0..T-1), so every sampler in course_lib works with it. The U-Net is
given the matching timestep index t = u T - 1 (a float during training).

References:
  [1] Kingma, Salimans, Poole, Ho. Variational Diffusion Models. 2021. https://arxiv.org/abs/2107.00630
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .schedules import NoiseSchedule, linear_schedule, schedule_from_alphas_cumprod


def linear_endpoints(T: int = 1000) -> tuple[float, float]:
    """(gamma_min, gamma_max) = -log SNR at the first and last step of the linear DDPM schedule."""
    log_snr = linear_schedule(T).log_snr
    return -log_snr[0].item(), -log_snr[-1].item()


class LearnedSchedule(nn.Module):
    """gamma(u) = -log SNR(u), monotonic in u, with fixed end points and a learned shape."""

    def __init__(self, gamma_min: float | None = None, gamma_max: float | None = None, hidden: int = 64):
        super().__init__()
        if gamma_min is None or gamma_max is None:
            default_min, default_max = linear_endpoints()
            gamma_min = default_min if gamma_min is None else gamma_min
            gamma_max = default_max if gamma_max is None else gamma_max
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max must exceed gamma_min (noise grows with u); got {gamma_min}, {gamma_max}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        # Free parameters; softplus makes the effective weights positive. Initialised so that the linear
        # term dominates: gamma starts close to linear in u, as VDM's does.
        self.w = nn.Parameter(torch.tensor(2.0))
        self.a = nn.Parameter(torch.full((hidden,), -4.0))
        self.b = nn.Parameter(torch.randn(hidden, generator=torch.Generator().manual_seed(0)).abs() + 2.0)
        self.c = nn.Parameter(torch.linspace(-6.0, 0.0, hidden))

    def _raw(self, u: torch.Tensor) -> torch.Tensor:
        u = u.float()[..., None]
        hidden = F.softplus(self.a) * torch.sigmoid(F.softplus(self.b) * u + self.c)
        return F.softplus(self.w) * u[..., 0] + hidden.sum(-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """gamma(u) for u in [0, 1] (any shape)."""
        ends = self._raw(torch.tensor([0.0, 1.0], device=u.device))
        shape = (self._raw(u) - ends[0]) / (ends[1] - ends[0])
        return self.gamma_min + (self.gamma_max - self.gamma_min) * shape

    def gamma_and_slope(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma(u) and d gamma / du, both differentiable with respect to the schedule's parameters."""
        u = u.detach().float().requires_grad_(True)
        with torch.enable_grad():
            gamma = self(u)
            (slope,) = torch.autograd.grad(gamma.sum(), u, create_graph=True)
        return gamma, slope

    def alpha_bar(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self(u))

    @torch.no_grad()
    def to_noise_schedule(self, T: int = 1000) -> NoiseSchedule:
        """The discrete schedule a sampler uses: alpha_bar at u = (t + 1) / T for t = 0..T-1."""
        u = torch.arange(1, T + 1, dtype=torch.float64) / T
        gamma = self(u.float()).double()
        schedule = schedule_from_alphas_cumprod(torch.sigmoid(-gamma))
        schedule.name = "learned"
        return schedule


def vlb_terms(slope: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """Per-image continuous-time diffusion loss 1/2 gamma'(u) ||eps - eps_hat||^2 (Eq. 17 of [1]), in nats."""
    return 0.5 * slope * (eps - eps_hat).pow(2).flatten(1).sum(1)


def schedule_loss_surrogate(gamma: torch.Tensor, slope: torch.Tensor, sse: torch.Tensor,
                            dsse_dgamma: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the schedule's parameters is that of mean_i L_i^2 (the variance).

    L_i = 1/2 gamma'_i sse_i depends on the schedule through gamma'_i directly and through gamma_i (which
    sets the noise level, hence sse_i). With sse_i and d sse_i / d gamma_i measured from the denoiser
    (held fixed), the chain rule gives
        d L_i^2 = 2 L_i (1/2 sse_i d gamma'_i + 1/2 gamma'_i (d sse_i / d gamma_i) d gamma_i)."""
    L = (0.5 * slope * sse).detach()
    linearised = 0.5 * slope * sse.detach() + 0.5 * slope.detach() * dsse_dgamma.detach() * gamma
    return (2 * L * linearised).mean()
