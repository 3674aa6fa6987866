r"""Noise schedules: how much noise the forward process adds at each step.

A schedule is a table over T steps. Every quantity is computed once in float64
and stored in float64; `extract` casts to the dtype of the tensor it is used with.

Notation (Ho et al. 2020 [1]):
    betas[t]            \beta_t        variance added at step t
    alphas[t]           \alpha_t       = 1 - \beta_t
    alphas_cumprod[t]   \bar\alpha_t   = \prod_{s<=t} \alpha_s   (signal power left)
    snr[t]              SNR(t)         = \bar\alpha_t / (1 - \bar\alpha_t)
    log_snr[t]          \lambda_t      = log SNR(t)

Timestep convention: integers t = 0 .. T-1, as in diffusers. Index t holds the
paper's step t+1, so alphas_cumprod[0] = \alpha_1 (almost no noise) and
alphas_cumprod[T-1] = \bar\alpha_T (almost pure noise). x_0 is the clean image.

Schedules:
    linear          betas evenly spaced from 1e-4 to 0.02 [1]
    scaled_linear   square roots of betas evenly spaced, 0.00085 -> 0.012 (Stable Diffusion [2])
    cosine          \bar\alpha(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas clipped at 0.999 [3]
    sigmoid         \bar\alpha(t) from a sigmoid over [start, end] with temperature tau [4]

Zero terminal SNR (Lin et al. 2024 [5], Algorithm 1): any of these, rescaled so that sqrt(abar) falls
linearly onto exactly 0 at t = T-1 (the last beta becomes 1): the last step is pure noise, as sampling
from N(0, I) assumes. An epsilon model cannot be sampled from there (x0 = (x_t - s eps) / sqrt(abar)
divides by 0), so such a schedule goes with v-prediction.

References:
  [1] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020. https://arxiv.org/abs/2006.11239
  [2] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models. 2022. https://arxiv.org/abs/2112.10752
  [3] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021. https://arxiv.org/abs/2102.09672
  [4] Jabri, Fleet, Chen. Scalable Adaptive Computation for Iterative Generation. 2023, and
      Chen. On the Importance of Noise Scheduling for Diffusion Models. 2023. https://arxiv.org/abs/2301.10972
  [5] Lin, Liu, Li, Yang. Common Diffusion Noise Schedules and Sample Steps are Flawed. 2024.
      https://arxiv.org/abs/2305.08891
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .checks import has_values

KINDS = ("linear", "scaled_linear", "cosine", "sigmoid")


class NoiseSchedule:
    """Per-timestep tables of a discrete variance-preserving diffusion, built from betas."""

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1:
            raise ValueError("a schedule needs at least one step (got no betas)")
        if has_values(betas) and (not torch.isfinite(betas).all() or (betas <= 0).any() or (betas[:-1] >= 1).any()
                                  or betas[-1] > 1):
            raise ValueError(f"betas must lie in the open interval (0, 1) (the last may be exactly 1: zero terminal "
                             f"SNR); got min {betas.min().item():.3g}, max {betas.max().item():.3g}")
        self.name = name
        self.T = betas.numel()
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas = self.alphas.sqrt()
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.log_snr = self.snr.log()                   # -inf at a zero-terminal-SNR schedule's last step
        # Posterior q(x_{t-1} | x_t, x_0), Eqs. 6-7 of [1]; at t = 0 it is centred on x_0 with zero variance.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    def __len__(self) -> int:
        return self.T

    @property
    def zero_terminal_snr(self) -> bool:
        """True when the last step is pure noise (abar_{T-1} = 0 exactly)."""
        return bool(self.alphas_cumprod[-1] == 0)

    def __repr__(self) -> str:
        ab = self.alphas_cumprod
        return (f"NoiseSchedule({self.name!r}, T={self.T}, beta {self.betas[0].item():.3g}->"
                f"{self.betas[-1].item():.3g}, alpha_bar {ab[0].item():.4f}->{ab[-1].item():.2e})")

    def check_timesteps(self, t: torch.Tensor | int) -> torch.Tensor:
        """t as an int64 tensor, after checking every entry is in 0..T-1."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"timesteps must be integers 0..{self.T - 1}; got dtype {t.dtype}")
        if t.numel() and has_values(t) and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"timestep out of range: got values in [{t.min().item()}, {t.max().item()}], "
                             f"valid are integers 0..{self.T - 1} for this {self.T}-step schedule")
        return t.long()

    def extract(self, table: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped to broadcast against x: (B,) -> (B, 1, 1, 1), in x's dtype and device."""
        t = self.check_timesteps(t).to(table.device)
        values = table[t].to(device=x.device, dtype=x.dtype)
        if values.ndim == 0:
            return values
        if values.shape[0] != x.shape[0]:
            raise ValueError(f"got {values.shape[0]} timesteps for a batch of {x.shape[0]}; "
                             f"give one timestep per image or a single int")
        return values.reshape(-1, *([1] * (x.ndim - 1)))


def _betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], T: int,
                          max_beta: float) -> torch.Tensor:
    """beta_t = 1 - abar(t/T) / abar((t-1)/T), clipped at max_beta (Eq. 17 of Nichol & Dhariwal)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar(t)
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T (number of steps) must be a positive int; got {T!r}")


def _check_range(beta_start: float, beta_end: float) -> None:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}")


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Linear betas (Section 4 of Ho et al. 2020)."""
    _check_T(T)
    _check_range(beta_start, beta_end)
    return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def scaled_linear_schedule(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
    """Betas whose square roots are linear (Stable Diffusion's schedule)."""
    _check_T(T)
    _check_range(beta_start, beta_end)
    return NoiseSchedule(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2,
                         "scaled_linear")


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Cosine alpha-bar (Eq. 17 of Nichol & Dhariwal 2021)."""
    _check_T(T)

    def alpha_bar(t):
        return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return NoiseSchedule(_betas_from_alpha_bar(alpha_bar, T, max_beta), "cosine")


def sigmoid_schedule(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                     max_beta: float = 0.999) -> NoiseSchedule:
    """Sigmoid alpha-bar (Algorithm 1 of Chen 2023): abar(t) falls along a sigmoid from `start` to `end`."""
    _check_T(T)
    if not start < end or tau <= 0:
        raise ValueError(f"need start < end and tau > 0; got start={start}, end={end}, tau={tau}")
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def alpha_bar(t):
        return (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)

    return NoiseSchedule(_betas_from_alpha_bar(alpha_bar, T, max_beta), "sigmoid")


def rescale_zero_terminal_snr(schedule: NoiseSchedule) -> NoiseSchedule:
    r"""The schedule with zero terminal SNR (Algorithm 1 of Lin et al. 2024).

    Notation: a_t = sqrt(abar_t). Shift a so that its last value is 0, then scale it so that its first
    value is unchanged:  a'_t = (a_t - a_{T-1}) * a_0 / (a_0 - a_{T-1}).  Then abar'_t = a'_t^2 and
    beta'_t = 1 - abar'_t / abar'_{t-1}, so beta'_{T-1} = 1."""
    a = schedule.sqrt_alphas_cumprod
    a0, aT = a[0].clone(), a[-1].clone()
    if schedule.T < 2 or a0 <= aT:
        raise ValueError("rescaling to zero terminal SNR needs a schedule of at least 2 steps whose abar falls")
    a = (a - aT) * a0 / (a0 - aT)
    rescaled = schedule_from_alphas_cumprod(a ** 2)
    rescaled.name = f"{schedule.name}_zero_snr"
    return rescaled


def schedule_from_betas(betas) -> NoiseSchedule:
    """A schedule from any given betas (each in (0, 1))."""
    return NoiseSchedule(torch.as_tensor(betas, dtype=torch.float64), "from_betas")


def schedule_from_alphas_cumprod(alphas_cumprod) -> NoiseSchedule:
    """A schedule from a given alpha-bar curve: beta_t = 1 - abar_t / abar_{t-1}, abar_{-1} = 1.
    The last value may be exactly 0 (zero terminal SNR)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if ab.numel() < 1 or (ab[:-1] <= 0).any() or ab[-1] < 0 or (ab >= 1).any() or (ab[1:] > ab[:-1]).any():
        raise ValueError("alphas_cumprod must be non-increasing and inside (0, 1) (the last value may be 0)")
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return NoiseSchedule(1.0 - ab / prev, "from_alphas_cumprod")


_BUILDERS = {
    "linear": linear_schedule,
    "scaled_linear": scaled_linear_schedule,
    "cosine": cosine_schedule,
    "sigmoid": sigmoid_schedule,
}


def make_schedule(kind: str, T: int = 1000, *, zero_terminal_snr: bool = False, **kwargs) -> NoiseSchedule:
    """Build a schedule by name: one of KINDS, with that builder's keyword arguments; zero_terminal_snr=True
    rescales it (`rescale_zero_terminal_snr`)."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown schedule {kind!r}; choose from {list(KINDS)}")
    schedule = _BUILDERS[kind](T, **kwargs)
    return rescale_zero_terminal_snr(schedule) if zero_terminal_snr else schedule
