r"""Latent consistency distillation: a few-step student from the tiny SD, trained through the one loop (LCM, LCM-LoRA).

The teacher is the pipeline's U-Net with classifier-free guidance; its probability-flow ODE, solved with DDIM,
carries a noisy latent down its trajectory. The student learns the consistency function f of that guided ODE
(course_lib.consistency): the map from any point of a trajectory to its end, so 1 to 8 model calls make an image
(the "lcm" sampler of course_lib.sampling) where the teacher needs 20 or more, each doubled by guidance.

One distillation step (Algorithm 2 of [1], consistency distillation, in LCM's guided skipping-step form [2]):

    z0, c            a data latent and its caption's text states; null: the empty prompt's
    n ~ U{0..N-1}    a point of the skipping grid (course_lib.consistency.skipping_grid): t_{n+k} = grid[n], and
                     t_n = grid[n + 1], the next point below (k = T / N timesteps apart; the last pair ends at 0)
    x = a z0 + s eps                     x_{t_{n+k}}, the closed form q(x_t | x_0) (course_lib.forward)
    teacher, guided  e_w = e(x, null) + w (e(x, c) - e(x, null))      (course_lib.guidance's formula, scale w)
    one ODE step     x_{t_n} = a_n x0_hat + s_n eps_hat      (DDIM at eta 0, `guided_ddim_step`; x0_hat and eps_hat
                                                              from e_w by course_lib.forward.x0_eps_from)
    student          f_theta(x_{t_{n+k}}, t_{n+k})
    target           f_theta-(x_{t_n}, t_n), no gradient: theta- is an EMA of theta (LCM, decay mu = 0.95), or
                     theta itself (LCM-LoRA [3] keeps no EMA: target_ema=None)
    loss             mean of d(student, target): Huber sqrt((a - b)^2 + c^2) - c with c = 0.001 (LCM), or L2 (a - b)^2

Where the target's f is at t_n = 0 it is x_{t_n} itself (the boundary condition), which is what anchors the
chain of targets to the teacher's trajectories.

Guidance. Our scale w is the course's (uncond + w (cond - uncond), course_lib.guidance); LCM writes the same
combination as (1 + omega) cond - omega uncond, so omega = w - 1, and its range omega in [2, 14] is w in [3, 15].
LCM feeds omega to the student through an extra embedding; the course's U-Net has no such input, so a student here
learns one guidance scale: `guidance` fixes w (both ends equal, the default), or draws it uniformly per sample from
a range, when the student learns the average over that range (diffusers' LCM-LoRA training script draws w so,
with no embedding). A student is sampled without guidance (scale 1): the teacher's guidance is in its weights.

The student. `distill_lcm` trains a full copy of the U-Net (LCM); `distill_lcm_lora` trains LoRA adapters on the
pipeline's own U-Net (LCM-LoRA [3]), the teacher being the same network with its adapters at scale 0, so no second
copy is held. An LCM-LoRA is a file of adapters (course_lib.lora.save_lora) that turns the base model into a
few-step one; course_lib.lora.stack_lora combines it with another LoRA (a style), tau_LCM and tau_style added to the
base weights, each with its scale ([3], "LCM-LoRA as universal acceleration module"). Checkpoints hold the target's
weights too, so an interrupted distillation resumes bit for bit (the loop's promise, course_lib.loop).

References:
  [1] Song, Dhariwal, Chen, Sutskever. Consistency Models. 2023. https://arxiv.org/abs/2303.01469
  [2] Luo, Tan, Huang, Li, Zhao. Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
      Inference. 2023. https://arxiv.org/abs/2310.04378
  [3] Luo, Tan, Patil, Gu, von Platen, Passos, Huang, Li, Zhao. LCM-LoRA: A Universal Stable-Diffusion
      Acceleration Module. 2023. https://arxiv.org/abs/2311.05556
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .checks import check_choice, check_int
from .config import JSONConfig
from .consistency import (DISTILLED_STEPS, SIGMA_DATA, TIMESTEP_SCALING, check_positive, consistency_function,
                          skipping_grid)
from .finetune import FineTune, FineTuneLog, draw
from .forward import x0_eps_from
from .loop import FitConfig, ema_update
from .lora import DEFAULT_TARGETS, inject_lora, lora_layers, lora_parameters, lora_scale
from .pipeline import SamplerSettings
from .vae import encode_latents

if TYPE_CHECKING:
    from .pipeline import TextToImage

LOSSES = ("huber", "l2")


@dataclass(frozen=True)
class LCMConfig(JSONConfig):
    """What a consistency distillation distils (the loop's settings, steps and learning rate, are its own)."""
    distilled_steps: int = DISTILLED_STEPS        # N: the skipping grid's times (LCM: 50 of 1000, k = 20)
    guidance: tuple[float, float] = (4.0, 4.0)    # the teacher's guidance scale w, drawn uniformly in [low, high]
    loss: str = "huber"                           # "huber" (LCM) or "l2"
    huber_c: float = 0.001                        # Huber's c (LCM: 0.001)
    target_ema: float | None = 0.95               # the target's EMA decay mu (LCM: 0.95); None: the student itself
    timestep_scaling: float = TIMESTEP_SCALING    # the boundary coefficients' stretch of the time (LCM: 10)
    sigma_data: float = SIGMA_DATA                # the data's std the coefficients assume (0.5)

    def __post_init__(self):
        check_int("distilled_steps", self.distilled_steps, 1, hint=" (the skipping grid's number of timesteps)")
        g = self.guidance
        pair = (g, g) if isinstance(g, numbers.Real) and not isinstance(g, bool) else tuple(g)
        if len(pair) != 2 or not all(isinstance(w, numbers.Real) and not isinstance(w, bool)
                                     and 0 <= w < math.inf for w in pair) or pair[0] > pair[1]:
            raise ValueError(f"guidance must be a finite scale w >= 0 or a range (low, high) with 0 <= low <= high "
                             f"(the course's scale: 1 no guidance; LCM's omega in [2, 14] is w in [3, 15]); got {g!r}")
        object.__setattr__(self, "guidance", tuple(float(w) for w in pair))
        check_choice("consistency loss", self.loss, LOSSES)
        check_positive("huber_c", self.huber_c)
        if self.target_ema is not None and not (isinstance(self.target_ema, numbers.Real) and 0 <= self.target_ema < 1):
            raise ValueError(f"target_ema must be an EMA decay in [0, 1) (LCM: 0.95) or None (the student itself, "
                             f"as LCM-LoRA); got {self.target_ema!r}")
        check_positive("timestep_scaling", self.timestep_scaling)
        check_positive("sigma_data", self.sigma_data)

    def sampler(self, steps: int = 4) -> SamplerSettings:
        """The settings a student distilled with this config samples with: "lcm" on its grid, no guidance."""
        return SamplerSettings(sampler="lcm", steps=steps, guidance_scale=1.0, distilled_steps=self.distilled_steps)


def consistency_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "huber",
                     c: float = 0.001) -> torch.Tensor:
    """The distance LCM regresses with, averaged over every value: Huber sqrt((a - b)^2 + c^2) - c, or L2 (a - b)^2."""
    check_choice("consistency loss", kind, LOSSES)
    diff = (student.float() - target.float()) ** 2
    return (torch.sqrt(diff + c * c) - c).mean() if kind == "huber" else diff.mean()


def guided_ddim_step(teacher: Callable[..., torch.Tensor], path, x: torch.Tensor, t: torch.Tensor,
                     t_next: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None, null: torch.Tensor,
                     null_mask: torch.Tensor | None, scale: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
    """One step of the teacher's guided ODE solver, per sample: DDIM at eta 0 (Eq. 12 of Song et al. 2021) from
    t to t_next (B,) of the guided prediction uncond + scale (cond - uncond), scale (B,). null (1 or B, L, D)."""
    B = x.shape[0]
    null, null_mask = null.expand(B, -1, -1), None if null_mask is None else null_mask.expand(B, -1)
    tau = path.model_times(t.to(x.device))
    out = teacher(torch.cat([x, x]), torch.cat([tau, tau]), torch.cat([context, null.to(context)]),
                  None if mask is None else torch.cat([mask, null_mask.to(mask.device)]))
    cond, uncond = out.to(x.dtype).chunk(2)
    w = scale.to(x).view(-1, *([1] * (x.ndim - 1)))
    a, s, _ = path.scales_at(t, x)
    x0_hat, eps_hat = x0_eps_from(prediction, uncond + w * (cond - uncond), x, a, s)
    a_next, s_next, _ = path.scales_at(t_next, x)
    return a_next * x0_hat + s_next * eps_hat


class AdaptersOff(nn.Module):
    """A LoRA'd network called with its adapters at scale 0: the base model, the teacher of LCM-LoRA."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        with lora_scale(self.model, 0.0):
            return self.model(*args)


class ConsistencyDistillation(FineTune):
    """Latent consistency distillation as a course_lib.loop.Fit (see the module's docstring for the step).

    pipe       the teacher's pipeline: its schedule, prediction type and (by default) its U-Net as the teacher
    student    the network that learns f (a copy of the U-Net, or the U-Net with LoRA adapters)
    params     what trains (all of a copy's parameters; the adapters' A and B)
    z          data latents (N, C, h, w), scaled as the pipeline's; context, mask: their captions' text states
    null       the empty prompt's (states (1, L, D), mask (1, L)) for the teacher's guidance
    teacher    the teacher network (default pipe.unet; AdaptersOff(unet) for LCM-LoRA)
    info       more settings a resumed run must share (distill_lcm_lora records the adapters' rank and alpha)"""

    def __init__(self, pipe: "TextToImage", student: nn.Module, params: list[nn.Parameter], z: torch.Tensor,
                 context: torch.Tensor, mask: torch.Tensor, null: tuple[torch.Tensor, torch.Tensor], *,
                 config: LCMConfig = LCMConfig(), steps: int, lr: float, batch_size: int, seed: int = 0,
                 teacher: nn.Module | None = None, info: dict | None = None, lr_decay: str = "constant"):
        fit = FitConfig(steps=steps, lr=lr, decay=lr_decay, grad_clip=1.0)
        info = {**(info or {}), **({} if lr_decay == "constant" else {"lr_decay": lr_decay})}   # a resume must share it
        super().__init__(fit, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), pipe.device, seed, module=student)
        self.pipe, self.student, self.config = pipe, student, config
        self.teacher = pipe.unet if teacher is None else teacher     # called under no_grad only
        self.info = info or {}
        self.z, self.context, self.mask, self.null = z, context, mask, null
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.grid = torch.tensor(skipping_grid(pipe.schedule, config.distilled_steps))
        self.target, self.target_params = student, None         # LCM-LoRA: the student itself, without gradient
        if config.target_ema is not None:                       # LCM: an EMA copy theta- of the student
            self.target = copy.deepcopy(student).requires_grad_(False).eval()
            names = {id(p): n for n, p in student.named_parameters()}
            mirror = dict(self.target.named_parameters())
            self.target_params = [mirror[names[id(p)]] for p in self.params]

    def f(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
          mask: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return consistency_function(model, self.pipe.schedule, x, t, prediction=self.pipe.prediction,
                                    cond=(context, mask), timestep_scaling=cfg.timestep_scaling,
                                    sigma_data=cfg.sigma_data)

    def loss(self) -> torch.Tensor:
        g, cfg, B, path = self.generator, self.config, self.batch_size, self.pipe.schedule
        i = draw(len(self.z), B, g)
        z0, c, m = self.z[i], self.context[i], self.mask[i]
        n = torch.randint(0, cfg.distilled_steps, (B,), generator=g)         # t_{n+k} = grid[n], t_n = grid[n + 1]
        t, t_next = self.grid[n], self.grid[n + 1]
        noise = torch.randn(z0.shape, generator=g).to(z0)
        low, high = cfg.guidance
        w = low + (high - low) * torch.rand(B, generator=g)
        a, s, _ = path.scales_at(t, z0)
        x = a * z0 + s * noise                                               # x_{t_{n+k}}
        with torch.no_grad():
            x_next = guided_ddim_step(self.teacher, path, x, t, t_next, c, m, *self.null, w, self.pipe.prediction)
            target = self.f(self.target, x_next, t_next, c, m)
        return consistency_loss(self.f(self.student, x, t, c, m), target, cfg.loss, cfg.huber_c)

    def after_step(self) -> None:
        super().after_step()
        if self.target_params is not None:                                  # theta- <- mu theta- + (1 - mu) theta
            ema_update(self.target_params, self.params, self.config.target_ema)

    def fixed_tensors(self) -> list[torch.Tensor]:
        trained = {id(p) for p in self.params}
        frozen = [p for p in self.student.parameters() if id(p) not in trained]
        teacher = [p for p in self.teacher.parameters() if id(p) not in trained]
        return [self.z, self.context, self.mask, *self.null, *frozen, *teacher]

    def run_info(self) -> dict:
        return {**super().run_info(), "lcm": dataclasses.asdict(self.config), "batch_size": self.batch_size,
                "n_images": len(self.z), **self.info}

    def state_tensors(self) -> dict[str, torch.Tensor]:                    # the EMA target resumes too
        return {**super().state_tensors(), **{f"target.{k}": p for k, p in enumerate(self.target_params or [])}}

    def load(self, path: str | Path) -> "ConsistencyDistillation":
        super().load(path)
        if self.target_params is not None:
            tensors, _ = ckpt.read(path)
            with torch.no_grad():
                for k, p in enumerate(self.target_params):
                    p.copy_(tensors[f"target.{k}"])
        return self


def _distil(pipe: "TextToImage", student: nn.Module, params: list[nn.Parameter], images: torch.Tensor,
            captions: list[str], teacher: nn.Module | None, config: LCMConfig, *, steps: int, batch_size: int,
            lr: float, seed: int, checkpoint_path, checkpoint_every: int, resume: bool, max_seconds: float | None,
            progress: bool, callback, info: dict | None = None, lr_decay: str = "constant") -> FineTuneLog:
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need one caption per image and at least one image; got {len(images)} and {len(captions)}")
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)
    c, m = pipe.encode(list(captions))
    run = ConsistencyDistillation(pipe, student, params, z, c, m, pipe.encode([""]), config=config, steps=steps,
                                  lr=lr, batch_size=batch_size, seed=seed, teacher=teacher, info=info,
                                  lr_decay=lr_decay)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
            max_seconds=max_seconds, progress=progress, callback=callback, desc="distilling")
    return FineTuneLog(run.history["loss"], run.seconds, run.step, sum(p.numel() for p in params), run.state_bytes)


def distill_lcm(pipe: "TextToImage", images: torch.Tensor, captions: list[str], *, config: LCMConfig = LCMConfig(),
                steps: int = 1000, batch_size: int = 32, lr: float = 1e-4, seed: int = 0,
                checkpoint_path: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
                max_seconds: float | None = None, progress: bool = False,
                callback: Callable[[FineTune], None] | None = None,
                lr_decay: str = "constant") -> tuple["TextToImage", FineTuneLog]:
    """LCM: distil a full copy of pipe.unet on images (N, 3, H, W) in [-1, 1] with their captions. Returns a
    pipeline sharing pipe's text encoder and VAE with the student U-Net (sampler: config.sampler(4)) and the log;
    pipe is unchanged. Checkpoints and resume as course_lib.finetune.fine_tune. lr_decay: the learning rate,
    "constant" or "cosine" (to 0 at `steps`; course_lib.loop.lr_factor)."""
    student = copy.deepcopy(pipe.unet).requires_grad_(True)
    params = list(student.parameters())
    log = _distil(pipe, student, params, images, captions, None, config, steps=steps, batch_size=batch_size, lr=lr,
                  seed=seed, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
                  max_seconds=max_seconds, progress=progress, callback=callback, lr_decay=lr_decay)
    student.requires_grad_(False)
    fast = copy.copy(pipe)
    fast.unet, fast.sampler_settings = student, config.sampler(4)
    return fast, log


def distill_lcm_lora(pipe: "TextToImage", images: torch.Tensor, captions: list[str], *, rank: int = 8,
                     alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS,
                     config: LCMConfig = LCMConfig(target_ema=None), steps: int = 1000, batch_size: int = 32,
                     lr: float = 1e-3, seed: int = 0, checkpoint_path: str | Path | None = None,
                     checkpoint_every: int = 100, resume: bool = True, max_seconds: float | None = None,
                     progress: bool = False, callback: Callable[[FineTune], None] | None = None,
                     lr_decay: str = "constant") -> FineTuneLog:
    """LCM-LoRA: inject LoRA into pipe.unet (in place) and distil only the adapters, the teacher being the same
    U-Net with its adapters off. Afterwards pipe samples few-step with `pipe(..., settings=config.sampler(4))`,
    and course_lib.lora.save_lora writes the acceleration module (pass info={"lcm": ...} to keep the grid)."""
    inject_lora(pipe.unet, targets=targets, rank=rank, alpha=alpha, seed=seed)
    adapters = sorted({(layer.rank, layer.alpha) for layer in lora_layers(pipe.unet).values()})
    log = _distil(pipe, pipe.unet, lora_parameters(pipe.unet), images, captions, AdaptersOff(pipe.unet), config,
                  steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_path=checkpoint_path,
                  checkpoint_every=checkpoint_every, resume=resume, max_seconds=max_seconds, progress=progress,
                  callback=callback, info={"lora": adapters}, lr_decay=lr_decay)
    pipe.unet.requires_grad_(False)
    return log


__all__ = ["LOSSES", "LCMConfig", "consistency_loss", "guided_ddim_step", "AdaptersOff", "ConsistencyDistillation",
           "distill_lcm", "distill_lcm_lora"]
