r"""Noise schedules: how much noise the forward process adds at each step.

A schedule is a table over T steps. Every quantity is computed once in float64
and stored in float64; `extract` casts to the dtype of the tensor it is used with.

Notation (Ho et al. 2020 [1]):
    betas[t]            \beta_t        variance added at step t
    alphas[t]           \alpha_t       = 1 - \beta_t
    alphas_cumprod[t]   \bar\alpha_t   = \prod_{s<=t} \alpha_s   (signal power left; abar_t in formulas, and
                                       alpha_bar in code for one value or a batch of them)
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

A schedule as the samplers see it. Every sampler (course_lib.sampling) writes a noisy point as
x_t = a_t x0 + s_t eps and asks its path for four things only: a_t and s_t (`scales`), the times to visit
(`grid`), the value the network was trained to see for a time (`model_time`), and where the clean end is
(`clean`). Two paths answer them:
    NoiseSchedule   a = sqrt(abar_t), s = sqrt(1 - abar_t), integer timesteps 0..T-1, clean end t = -1
    FlowSchedule    a = 1 - t, s = t (rectified flow's straight path, course_lib.flow), t in [0, 1], clean
                    end t = 0; the network sees t * 1000
so DDIM, DPM-Solver++ and DDPM's ancestral step, written once in (a, s), sample a rectified-flow model too, and
Euler or Heun (which need a path continuous in time, with da/dt and ds/dt) sample it in its own time.

SD 3's timestep shift ([6], Sec. 5.3.2; `time_shift`): FlowSchedule(shift=s) visits t' = s t / (1 + (s - 1) t)
in place of t, in its sampling grid and its training draws (s > 1: more of both near the noise; 1: no change).
A larger image needs more noise: its n values carry much the same information, so they average the noise down.
An image of n values all equal to c seen as x_t = (1 - t) c + t eps gives n looks at c, leaving an uncertainty
(t / (1 - t)) / sqrt(n); the same uncertainty with m values needs t_m / (1 - t_m) = sqrt(m / n) t / (1 - t): the
shift with s = sqrt(m / n). SD 3 found s = 3 best at 1024^2 pixels (128^2 latents).

References:
  [1] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020. https://arxiv.org/abs/2006.11239
  [2] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models. 2022. https://arxiv.org/abs/2112.10752
  [3] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021. https://arxiv.org/abs/2102.09672
  [4] Jabri, Fleet, Chen. Scalable Adaptive Computation for Iterative Generation. 2023, and
      Chen. On the Importance of Noise Scheduling for Diffusion Models. 2023. https://arxiv.org/abs/2301.10972
  [5] Lin, Liu, Li, Yang. Common Diffusion Noise Schedules and Sample Steps are Flawed. 2024.
      https://arxiv.org/abs/2305.08891
  [6] Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (SD 3). 2024.
      https://arxiv.org/abs/2403.03206
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from .checks import check_choice, check_int, has_values

KINDS = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("trailing", "leading", "linspace")
PREDICTIONS = ("epsilon", "x0", "v")   # what a network on a NoiseSchedule may predict (course_lib.forward)
FLOW = "flow"                          # the prediction of a rectified-flow network: the velocity eps - x0
TIME_SCALE = 1000.0                    # a flow network sees t * TIME_SCALE, the range the time embedding was built for
TIMESTEP_SAMPLING = ("uniform", "logit_normal")   # how a flow's training times are drawn (course_lib.flow)


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
        alpha_bar = self.alphas_cumprod
        return (f"NoiseSchedule({self.name!r}, T={self.T}, beta {self.betas[0].item():.3g}->"
                f"{self.betas[-1].item():.3g}, alpha_bar {alpha_bar[0].item():.4f}->{alpha_bar[-1].item():.2e})")

    # --- as a path for the samplers (see the module's docstring) ---------------------------------------------
    continuous = False             # integer timesteps: no Euler or Heun in its own time
    predictions = PREDICTIONS
    clean = -1                     # the timestep of the clean end, where abar = 1

    def scales(self, t: int) -> tuple[float, float]:
        """(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) as Python floats; (1, 0) at t = -1, the clean end."""
        if t == -1:
            return 1.0, 0.0
        t = check_int("timestep", t, 0, self.T - 1, hint=" (or -1, the clean end)")
        alpha_bar = self.alphas_cumprod[t].item()
        return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)

    def half_log_snr(self, t: int) -> float:
        """lambda_t = log(a_t / s_t) = log_snr[t] / 2: +inf at the clean end, -inf where abar = 0."""
        return math.inf if t == -1 else 0.5 * self.log_snr[t].item()

    def grid(self, steps: int, spacing: str = "trailing", offset: int = 0, start: int | None = None) -> list[int]:
        """The descending timesteps a `steps`-step sampler visits (see `timesteps`)."""
        return timesteps(self, steps, spacing, offset, start).tolist()

    def end(self, final_t: int, last: int) -> int:
        """Where the last step lands: -1 (the clean end) or a timestep below `last`, the last one visited."""
        return check_int("final_t", final_t, -1, last - 1, hint=f" (where the last step lands: -1 the clean end, "
                         f"abar = 1, or a timestep below the last one visited, {last})")

    def model_time(self, t: int, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """What the network is given for timestep t: the integer itself, (batch,) int64."""
        return torch.full((batch,), t, dtype=torch.long, device=device)

    # --- as a path for the training loss (course_lib.forward.path_loss) ----------------------------------------
    def draw_times(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training timesteps, uniform over 0..T-1 (Algorithm 1 of Ho et al.), drawn on the CPU."""
        return torch.randint(0, self.T, (n,), generator=generator)

    def scales_at(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, s, alpha_bar) at a batch of timesteps, each (B, 1, 1, 1) in x's dtype and device."""
        alpha_bar = self.extract(self.alphas_cumprod, t, x)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), alpha_bar

    def model_times(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given for a batch of timesteps: the timesteps themselves."""
        return t

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


class FlowSchedule:
    """Rectified flow's straight path x_t = (1 - t) x0 + t eps, t from 0 (data) to 1 (noise), as the samplers
    see a schedule (course_lib.flow teaches the path and its loss). The velocity a flow network predicts is
    dx_t/dt = eps - x0 = (da/dt) x0 + (ds/dt) eps with da/dt = -1, ds/dt = 1."""

    continuous = True
    predictions = (FLOW,)
    clean = 0.0
    name = "flow"

    def __init__(self, timestep_sampling: str = "uniform", time_scale: float = TIME_SCALE, shift: float = 1.0):
        self.timestep_sampling = check_choice("timestep sampling", timestep_sampling, TIMESTEP_SAMPLING)
        if isinstance(time_scale, bool) or not isinstance(time_scale, numbers.Real) or not 0 < time_scale < math.inf:
            raise ValueError(f"time_scale must be a positive number (the network sees t * time_scale); got "
                             f"{time_scale!r}")
        self.time_scale = float(time_scale)
        self.shift = check_shift(shift)           # SD 3's timestep shift of the grid and the training times

    def __repr__(self) -> str:
        shifted = f", times shifted by {self.shift:g}" if self.shift != 1 else ""
        return f"FlowSchedule(x_t = (1 - t) x0 + t eps, network time t * {self.time_scale:g}{shifted})"

    @staticmethod
    def _check(t: float) -> float:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t <= 1:
            raise ValueError(f"a flow time must be a number in [0, 1] (0: data, 1: noise); got {t!r}")
        return float(t)

    def scales(self, t: float) -> tuple[float, float]:
        """(a_t, s_t) = (1 - t, t)."""
        t = self._check(t)
        return 1.0 - t, t

    def derivative(self, t: float) -> tuple[float, float]:
        """(da/dt, ds/dt) = (-1, 1): the straight path runs at constant speed."""
        self._check(t)
        return -1.0, 1.0

    def half_log_snr(self, t: float) -> float:
        """lambda_t = log((1 - t) / t): +inf at t = 0, -inf at t = 1."""
        a, s = self.scales(t)
        return math.inf if s == 0 else -math.inf if a == 0 else math.log(a / s)

    def grid(self, steps: int, spacing: str = "trailing", offset: int = 0, start: float | None = None) -> list[float]:
        """`steps` equal steps from t = start (default 1, the noise) towards 0: linspace(start, 0, steps + 1)
        without its end (float32, as torch.linspace gives them); with a shift, even in the unshifted time, then
        moved by `time_shift`. Only the even "trailing" grid exists here, and no offset (a discrete schedule's)."""
        steps = check_int("steps", steps, 1)
        if spacing != "trailing" or offset != 0:
            raise ValueError(f"a flow path is sampled on an even grid from t = 1: spacing 'trailing' and offset 0 "
                             f"only (the others are a discrete schedule's); got spacing {spacing!r}, offset {offset!r}")
        first = 1.0 if start is None else self._check(start)
        if first == 0:
            raise ValueError("start must be above 0 (t = 0 is the data itself)")
        if self.shift == 1:
            return torch.linspace(first, 0.0, int(steps) + 1)[:-1].tolist()
        even = torch.linspace(time_shift(first, 1 / self.shift), 0.0, int(steps) + 1, dtype=torch.float64)[:-1]
        return time_shift(even, self.shift).float().tolist()

    def end(self, final_t: int, last: float) -> float:
        """The last step lands on the data, t = 0 (final_t -1, the samplers' name for the clean end)."""
        if final_t != -1:
            raise ValueError(f"a flow path's sampling ends at its clean end, t = 0 (final_t=-1); got {final_t!r}")
        return self.clean

    def model_time(self, t: float, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """What the network is given for time t: t * time_scale, (batch,) float32."""
        return torch.full((batch,), self._check(t), device=device) * self.time_scale

    def draw_times(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training times in (0, 1), drawn on the CPU by `sample_timesteps`, then moved by the path's shift."""
        t = sample_timesteps(n, self.timestep_sampling, generator=generator)
        return t if self.shift == 1 else time_shift(t, self.shift)

    def scales_at(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, s, alpha_bar) at a batch of times, each (B, 1, 1, 1) in x's dtype and device; alpha_bar =
        a^2 / (a^2 + s^2) is the variance-preserving alpha-bar with the same signal-to-noise ratio."""
        t = torch.as_tensor(t).to(device=x.device, dtype=x.dtype)
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"give one time per image, shape ({x.shape[0]},); got {tuple(t.shape)}")
        if (t < 0).any() or (t > 1).any():
            raise ValueError("flow times must lie in [0, 1] (0: data, 1: noise)")
        s = t.view(-1, *([1] * (x.ndim - 1)))
        a = 1 - s
        return a, s, a * a / (a * a + s * s)

    def model_times(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given for a batch of times: t * time_scale."""
        return t * self.time_scale


def check_shift(shift: float) -> float:
    """shift as a float if it is a finite number > 0 (1: no shift); else a ValueError naming it."""
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < math.inf:
        raise ValueError(f"the timestep shift must be a finite number > 0 (1: no shift; SD 3 uses 3 at 1024 px, "
                         f"sqrt(m / n) for m values where n had the right noise); got {shift!r}")
    return float(shift)


def time_shift(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    r"""SD 3's timestep shift (Esser et al. 2024, Sec. 5.3.2): t' = s t / (1 + (s - 1) t), flow time t in [0, 1]
    (0 data, 1 noise), s = shift. Both ends stay; the noise-to-signal ratio scales, t' / (1 - t') = s t / (1 - t),
    so shift 1 / s undoes shift s. Why a larger image wants s = sqrt(m / n): the module's docstring."""
    s = check_shift(shift)
    return s * t / (1 + (s - 1) * t)


def sample_timesteps(n: int, sampling: str = "uniform", *, mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times in (0, 1): "uniform", or "logit_normal" (SD 3: t = sigmoid(z), z ~ N(mean, std^2))."""
    check_choice("timestep sampling", sampling, TIMESTEP_SAMPLING)
    n = check_int("n", n, 1)
    if std <= 0:
        raise ValueError(f"std must be > 0; got {std}")
    if sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def path_for(prediction: str, schedule: NoiseSchedule | FlowSchedule, timestep_sampling: str = "uniform",
             shift: float = 1.0) -> NoiseSchedule | FlowSchedule:
    """The path a model trains and samples along: a FlowSchedule (with its timestep shift) for a rectified-flow
    model (prediction "flow", whose file also carries an unused discrete table), else its own schedule."""
    if prediction != FLOW and check_shift(shift) != 1:
        raise ValueError(f"a timestep shift moves a flow's times (prediction 'flow'); a {prediction!r} model samples "
                         f"its schedule's own timesteps: leave shift at 1; got {shift!r}")
    return FlowSchedule(timestep_sampling, shift=shift) if prediction == FLOW and not schedule.continuous else schedule


def timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing", offset: int = 0,
              start: int | None = None) -> torch.Tensor:
    """The descending timesteps a `steps`-step sampler visits (the spacings of Lin et al. 2024, Table 2 [5],
    as in diffusers' DDIM).

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
        start = check_int("start", start, 0, T - 1, hint=f" (the first timestep, below T={T})")
        T = start + 1                            # the grid over 0..start
    steps = check_int("steps", steps, 1, T, hint=" (the schedule's length T)" if start is None else " (start + 1)")
    check_choice("timestep spacing", spacing, SPACINGS)
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        # numpy's arange(T, 0, -T/steps) computes T + i * ((T - T/steps) - T); the same rounding here
        # keeps ties (x.5) going the same way as in diffusers.
        ts = torch.round(T + i * ((T - T / steps) - T)) - 1
    elif spacing == "leading":
        ts = (i * (T // steps)).flip(0)
    else:                                        # "linspace"
        ts = i * ((T - 1) / (steps - 1)) if steps > 1 else i
        ts[-1] = T - 1
        ts = torch.round(ts).flip(0)
    ts = ts.long()
    largest = ts.max().item()
    return ts + check_int("offset", offset, 0, schedule.T - 1 - largest,
                          hint=f" (keeps the largest timestep, {largest}, below T={schedule.T})")


def _betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], T: int,
                          max_beta: float) -> torch.Tensor:
    """beta_t = 1 - abar(t/T) / abar((t-1)/T), clipped at max_beta (Eq. 17 of Nichol & Dhariwal)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar_t = alpha_bar(t)
    return (1.0 - alpha_bar_t[1:] / alpha_bar_t[:-1]).clamp(max=max_beta)


def _check_T(T: int) -> None:
    check_int("T (number of steps)", T, 1)


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
    alpha_bar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if (alpha_bar.numel() < 1 or (alpha_bar[:-1] <= 0).any() or alpha_bar[-1] < 0 or (alpha_bar >= 1).any()
            or (alpha_bar[1:] > alpha_bar[:-1]).any()):
        raise ValueError("alphas_cumprod must be non-increasing and inside (0, 1) (the last value may be 0)")
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return NoiseSchedule(1.0 - alpha_bar / prev, "from_alphas_cumprod")


_BUILDERS = {
    "linear": linear_schedule,
    "scaled_linear": scaled_linear_schedule,
    "cosine": cosine_schedule,
    "sigmoid": sigmoid_schedule,
}


def make_schedule(kind: str, T: int = 1000, *, zero_terminal_snr: bool = False, **kwargs) -> NoiseSchedule:
    """Build a schedule by name: one of KINDS, with that builder's keyword arguments; zero_terminal_snr=True
    rescales it (`rescale_zero_terminal_snr`)."""
    check_choice("schedule", kind, KINDS)
    schedule = _BUILDERS[kind](T, **kwargs)
    return rescale_zero_terminal_snr(schedule) if zero_terminal_snr else schedule
