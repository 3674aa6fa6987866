r"""Training a denoiser: the loss, the optimiser, EMA, mixed precision, checkpoints and exact resume.

One training step (Ho et al. 2020, Algorithm 1, with the prediction types of Salimans & Ho 2022):
    x0 ~ data,  t ~ Uniform{0..T-1},  eps ~ N(0, I)
    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = || model(x_t, t) - target ||^2,   target = eps ("epsilon"), x0 ("x0") or
                                                        sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v")
With a learned schedule (course_lib.learned_schedule) t is continuous, u ~ U(0, 1), and the schedule's
parameters are trained alongside to minimise the variance of the variational bound's estimate.

The loss is course_lib.forward.path_loss (the one objective, on the model's path); the step around it and its
recipe (resume, warm-up, clipping, EMA, precision, the guards, checkpoints) are the course's one loop,
course_lib.loop.Fit. This module adds only what is the diffusion model's own: its data (images, captions), its
objective's settings and sampling grids.

The model is any of the course's denoisers (course_lib.denoiser: a U-Net, DiT or MMDiT). With text (context_dim
set) each image comes with the text encoder's states for its caption (a `Conditioning`), and the model learns
eps(x_t, t, text). With probability `caption_dropout` (10%, as in Ho & Salimans 2022) a caption is swapped for the
empty prompt's states, so the network also learns the unconditional eps(x_t, t, "") that guidance needs.

Latent diffusion (`latents=True`): the data are a VAE's scaled latents (course_lib.vae), not bounded to [-1, 1]:
the range check and the x0 clamp while sampling are off; the trainer does not know pixels from latents.

Rectified flow (`objective="flow"`, course_lib.flow; SD 3's objective): the same data, network, loop, random
stream, loss and samplers along course_lib.schedules.FlowSchedule: x_t = (1 - t) x0 + t eps, t in (0, 1) drawn as
`timestep_sampling` says and moved by `timestep_shift` (SD 3's), target the velocity eps - x0, network time t * 1000.

All randomness (data order, timesteps, noise, caption dropout) comes from one seeded CPU generator, checkpointed.

Several processes (`torchrun`, course_lib.distributed): DistributedDataParallel; every rank draws the global batch
as one process would and keeps its slice, so a step equals the single process's up to summation order. Rank 0
alone shows progress and writes files; checkpoints hold the plain U-Net (they move between 1 and N processes).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import JSONConfig
from .checks import check_choice
from . import checkpoint as ckpt, distributed
from .guidance import drop_captions
from .forward import check_images, check_prediction, denoising_loss, path_loss, predicted_x0_eps, snr_weight
from .learned_schedule import LearnedSchedule, schedule_loss_surrogate
from .loop import (DECAYS, PRECISIONS, Batches, Fit, FitConfig, TrainingDiverged, autocast, ema_decay_at, ema_update,
                   fingerprint, lr_factor, resolve_precision)
from .denoiser import Denoiser
from .schedules import (FLOW, KINDS, TIMESTEP_SAMPLING, FlowSchedule, NoiseSchedule, check_shift, make_schedule,
                        path_for)
from .unet_file import architecture_of, build_model, save_model

SCHEDULES = KINDS + ("learned",)
OBJECTIVES = ("diffusion", "flow")   # DDPM's (with config.prediction) or rectified flow's velocity (course_lib.flow)
# TrainingDiverged, ema_decay_at, ema_update and PRECISIONS are the loop's, re-exported for notebook 04 and tests.


@dataclass
class TrainConfig(JSONConfig):
    """How to train. Every field is saved in checkpoints, so a resumed run trains the same way."""
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    lr_decay: str = "constant"        # after the warm-up: "constant", or "cosine" down to 0 at `steps`
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prediction: str = "epsilon"
    schedule: str = "linear"          # one of SCHEDULES
    zero_terminal_snr: bool = False   # rescale the schedule so abar_{T-1} = 0 (Lin et al. 2024); needs "v" or "x0"
    T: int = 1000
    schedule_lr: float = 1e-3         # learning rate of a learned schedule's parameters
    precision: str = "auto"
    hflip: bool = False               # random horizontal flips (off: many emoji are not symmetric)
    caption_dropout: float = 0.1      # with text conditioning: share of captions replaced by the empty prompt
    latents: bool = False             # the data are VAE latents: no [-1, 1] check, no x0 clamp when sampling
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023; 5 there); None: off
    objective: str = "diffusion"      # one of OBJECTIVES: "flow" trains rectified flow (course_lib.flow)
    timestep_sampling: str = "uniform"  # with objective "flow": "uniform" or "logit_normal" (SD 3)
    timestep_shift: float = 1.0       # with objective "flow": SD 3's shift of the times (schedules.time_shift)
    seed: int = 0

    def __post_init__(self):
        check_prediction(self.prediction)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS), check_choice("lr_decay", self.lr_decay, DECAYS)
        for name in ("steps", "batch_size", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.grad_clip <= 0 or not 0 <= self.ema_decay < 1:
            raise ValueError("need lr > 0, warmup >= 0, grad_clip > 0 and 0 <= ema_decay < 1")
        if self.zero_terminal_snr and (self.schedule == "learned" or self.prediction == "epsilon"):
            raise ValueError("zero_terminal_snr needs a fixed schedule and prediction 'v' or 'x0': at abar = 0 an "
                             f"epsilon model's x0 estimate divides by 0; got schedule {self.schedule!r}, "
                             f"prediction {self.prediction!r}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout is a probability in [0, 1]; got {self.caption_dropout}")
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("timestep sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_shift(self.timestep_shift)
        if self.objective == "flow":
            if self.schedule == "learned" or self.zero_terminal_snr or self.min_snr_gamma is not None:
                raise ValueError("objective 'flow' has no noise schedule: it needs a fixed schedule (unused), "
                                 "zero_terminal_snr=False and min_snr_gamma=None")
        elif self.timestep_sampling != "uniform" or self.timestep_shift != 1:
            raise ValueError("timestep_sampling applies to objective 'flow' (and so does timestep_shift); the "
                             "diffusion objective draws t uniformly from 0..T-1")
        if self.min_snr_gamma is not None:
            snr_weight(self.prediction, torch.ones(1), self.min_snr_gamma)     # checks gamma > 0
            if self.schedule == "learned":
                raise ValueError("min_snr_gamma weights a fixed schedule's timesteps; the learned schedule "
                                 "weights its own (set min_snr_gamma=None)")

    @property
    def predicts(self) -> str:
        """What the network outputs: config.prediction for the diffusion objective, "flow" (the straight path's
        velocity) for rectified flow. The one place the objective picks a prediction (and with it the path)."""
        return FLOW if self.objective == "flow" else self.prediction


def lr_at(step: int, config: TrainConfig) -> float:
    """The Trainer's learning rate at `step`: linear warm-up to config.lr over config.warmup steps, then lr_decay."""
    return config.lr * lr_factor(step, config.steps, config.warmup, config.lr_decay)


@dataclass
class Conditioning:
    """Per image, the text encoder's states for its caption; and the empty prompt's, which caption dropout swaps in."""
    context: torch.Tensor        # (N, L, D) float
    mask: torch.Tensor           # (N, L) bool, True at real tokens
    null_context: torch.Tensor   # (L, D) or (1, L, D): the states of the empty prompt ""
    null_mask: torch.Tensor      # (L,) or (1, L)

    def __post_init__(self):
        self.null_context = self.null_context.reshape(self.context.shape[1:])
        self.null_mask = self.null_mask.reshape(self.mask.shape[1:]).bool()
        self.mask = self.mask.bool()
        if self.context.ndim != 3 or self.mask.shape != self.context.shape[:2]:
            raise ValueError(f"context must be (N, L, D) with mask (N, L); got {tuple(self.context.shape)} "
                             f"and {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.context.shape[0]

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The states of images `index`; where `drop` is True, the empty prompt's instead."""
        context, mask = self.context[index], self.mask[index]
        if drop is None:
            return context, mask
        return drop_captions(context, mask, drop, self.null_context, self.null_mask)


class Trainer(Fit):
    """Trains a denoiser (a U-Net, DiT or MMDiT) on a fixed tensor of images; `train()` runs until config.steps.

    trainer = Trainer(UNet(get_preset("small")), images, TrainConfig(steps=2000))
    trainer.train(checkpoint_path="runs/ddpm.safetensors", checkpoint_every=500)   # again later: it resumes

    With text: Trainer(UNet(get_preset("sd_small")), latents, TrainConfig(latents=True), conditioning=cond)

    Under torchrun (one process per GPU): info = distributed.setup(), then Trainer(..., device=info.device)
    on every rank; self.model stays the plain U-Net and self.net is its DistributedDataParallel wrapper.
    """

    def __init__(self, model: Denoiser, images: torch.Tensor, config: TrainConfig | None = None,
                 device: torch.device | str | None = None, conditioning: Conditioning | None = None):
        self.config = cfg = config or TrainConfig()
        check_images(images, "images", data_range=not cfg.latents)
        if images.shape[1] != model.config.in_channels:
            raise ValueError(f"images have {images.shape[1]} channels; the model expects {model.config.in_channels}")
        context_dim = getattr(model.config, "context_dim", None)
        if (context_dim is None) != (conditioning is None):
            raise ValueError("a text-conditioned U-Net (context_dim set) needs `conditioning`, and an unconditional "
                             f"one must not get it; this model has context_dim={context_dim}")
        if conditioning is not None:
            if len(conditioning) != images.shape[0]:
                raise ValueError(f"conditioning has {len(conditioning)} captions for {images.shape[0]} images")
            if conditioning.context.shape[-1] != context_dim:
                raise ValueError(f"the text states are {conditioning.context.shape[-1]}-d; the U-Net's "
                                 f"context_dim is {context_dim}")
        self.conditioning, self.images = conditioning, images
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = resolve_precision(cfg.precision, device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is the global batch, split evenly over the "
                             f"{self.world_size} processes; it must be divisible by {self.world_size}")
        self.model = model.to(device).train()               # always the plain U-Net (saved, EMA'd, sampled)
        self.net = self.model                               # what the training step calls
        if self.world_size > 1:                             # DDP: copies rank 0's weights to every rank now,
            self.net = nn.parallel.DistributedDataParallel(  # and averages gradients during backward
                self.model, device_ids=[device] if device.type == "cuda" else None)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.learned, self.fixed_schedule = None, None    # LearnedSchedule or NoiseSchedule, set below
        groups = [{"params": list(self.model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if cfg.schedule == "learned":
            self.learned = LearnedSchedule().to(device)
            groups.append({"params": list(self.learned.parameters()), "lr": cfg.schedule_lr, "weight_decay": 0.0,
                           "scheduled": False})       # the schedule's own rate, no warm-up
        else:
            self.fixed_schedule = make_schedule(cfg.schedule, cfg.T, zero_terminal_snr=cfg.zero_terminal_snr)
        fit = FitConfig(cfg.steps, cfg.lr, cfg.warmup, cfg.lr_decay, grad_clip=cfg.grad_clip, precision=self.precision)
        super().__init__(fit, torch.optim.AdamW(groups, betas=(0.9, 0.999)), device, seed=cfg.seed,
                         batches=Batches(images.shape[0], cfg.batch_size, torch.Generator()))
        self.batches.generator = self.generator                  # one generator for every draw
        self.ema, self.ema_decay = self.ema_model, cfg.ema_decay  # the EMA U-Net, for sampling, as the loop keeps it:
        self.ema_tensors, self.ema_sources = list(self.ema_model.parameters()), list(self.model.parameters())
        self._fingerprint: str | None = None
        self.sample_grids: list[tuple[int, torch.Tensor]] = []
        self._sampling: tuple[int, int, int] | None = None       # (every, count, steps) while train() runs
        self._schedule_grads: list[torch.Tensor] | None = None

    # --- the schedule the samplers should use -------------------------------------------------------
    @property
    def schedule(self) -> NoiseSchedule:
        """The discrete schedule (learned or fixed; a flow's file keeps this unused table too)."""
        if self.learned is not None:
            return self.learned.to_noise_schedule(self.config.T)
        return self.fixed_schedule

    @property
    def path(self) -> NoiseSchedule | FlowSchedule:
        """What the model trains and samples along (course_lib.schedules): the schedule, or the flow's path."""
        return path_for(self.config.predicts, self.schedule, self.config.timestep_sampling, self.config.timestep_shift)

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files: rank 0, or the only process."""
        return self.rank == 0

    @property
    def losses(self) -> list[float]:
        return self.history["loss"]

    # --- data -----------------------------------------------------------------------------------------
    def _my_rows(self, batch: int) -> slice:
        """This rank's rows of a global batch: rank r of N takes r*b .. (r+1)*b - 1, b = batch / N."""
        b = batch // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def _next_batch(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """A batch drawn without replacement (a new random order each pass through the data), with its
        text states (some dropped to the empty prompt) when the model is conditional."""
        index = self.batches.next()                        # the global batch, the same on every rank
        mine = self._my_rows(index.numel())                # ... of which this rank keeps its slice
        x0 = self.images[index[mine]]
        if self.config.hflip:
            flip = torch.rand(index.numel(), generator=self.generator)[mine] < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        cond = None
        if self.conditioning is not None:
            drop = torch.rand(index.numel(), generator=self.generator)[mine] < self.config.caption_dropout
            cond = tuple(z.to(self.device, non_blocking=True) for z in self.conditioning.batch(index[mine], drop))
        return x0.to(self.device, non_blocking=True), cond

    # --- the model's part of a step: its loss ---------------------------------------------------------
    def loss_on(self, x0: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict]:
        """The training loss on a batch (drawing t and noise from the trainer's generator); `cond` is
        (context, mask) for a text-conditioned model. Under DDP x0 is this rank's slice: the draws are made
        for the global batch, as one process would, and sliced the same way."""
        cfg, B = self.config, x0.shape[0] * self.world_size    # B: the global batch
        mine = self._my_rows(B)
        noise = torch.randn((B, *x0.shape[1:]), generator=self.generator)[mine].to(self.device)
        cond = () if cond is None else cond
        with autocast(self.precision, self.device):
            if self.learned is None:                # t drawn after the noise, from the path (course_lib.schedules)
                path = self.path
                t = path.draw_times(B, self.generator)[mine].to(self.device)
                terms = path_loss(self.net, path, x0, prediction=cfg.predicts, t=t, noise=noise, cond=cond,
                                  min_snr_gamma=cfg.min_snr_gamma)
                return terms.loss, {}
            u = torch.rand(B, generator=self.generator)[mine].to(self.device)
            gamma, slope = self.learned.gamma_and_slope(u)
            g = gamma.detach().requires_grad_(True)           # the noise level, as a leaf for d/d gamma
            terms = denoising_loss(self.net, x0, noise, torch.sigmoid(-g)[:, None, None, None], u * cfg.T - 1,
                                   prediction=cfg.prediction, cond=cond)
        _, eps_hat = predicted_x0_eps(cfg.prediction, terms.output, terms.x_t, terms.alpha_bar)
        sse = (noise - eps_hat).pow(2).flatten(1).sum(1)
        return terms.loss, {"gamma": gamma, "slope": slope, "g": g, "sse": sse}

    def loss(self) -> torch.Tensor:
        x0, cond = self._next_batch()
        loss, extra = self.loss_on(x0, cond)
        if self.learned is not None:
            # the schedule's variance objective: d sse_i / d gamma_i with the denoiser held fixed
            (dsse,) = torch.autograd.grad(extra["sse"].sum(), extra["g"], retain_graph=True)
            surrogate = schedule_loss_surrogate(extra["gamma"], extra["slope"], extra["sse"].detach(), dsse)
            grads = torch.autograd.grad(surrogate, list(self.learned.parameters()))
            self._schedule_grads = [distributed.all_reduce_mean(g) for g in grads]   # DDP does not see these
        return loss

    def clip_parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())                # DDP's gradients: already averaged

    def before_step(self) -> None:
        if self.learned is not None:
            for p, g in zip(self.learned.parameters(), self._schedule_grads):
                p.grad = g

    def after_step(self) -> None:
        if self._sampling is not None:
            every, count, steps = self._sampling
            if every and self.step % every == 0 and self.is_main:
                self.sample_grids.append((self.step, self.sample(count, steps=steps)))

    def run_info(self) -> dict:
        config = {k: v for k, v in dataclasses.asdict(self.config).items()     # steps may grow; an unshifted run
                  if k != "steps" and (k, v) != ("timestep_shift", 1)}        # leaves out the later timestep_shift
        if self._fingerprint is None:                      # the data do not change: hash them once
            cond = self.conditioning
            self._fingerprint = fingerprint(self.images, *((cond.context, cond.mask) if cond else ()))
        return {"train_config": config, "unet_config": json.loads(self.model.config.to_json()),
                "data": self._fingerprint, "n_images": self.images.shape[0]}

    def train_step(self) -> float:
        """One step of the loop (course_lib.loop.Fit.fit); returns the logged loss."""
        self.fit(self.step + 1, progress=False)
        return self.losses[-1]

    def train(self, steps: int | None = None, *, checkpoint_path: str | Path | None = None,
              checkpoint_every: int = 1000, sample_every: int = 0, sample_count: int = 16,
              sample_steps: int = 50, callback: Callable[["Trainer"], None] | None = None,
              callback_every: int = 50, progress: bool = True, max_seconds: float | None = None,
              resume: bool = True) -> "Trainer":
        """Train until `steps` total steps (default config.steps), or until max_seconds have passed.

        checkpoint_path   written every checkpoint_every steps and at the end. If it exists when a fresh trainer
                          starts: with resume (default) training continues from it (another run's is refused,
                          naming what differs); resume=False keeps it as <name>.v<k>.safetensors, starts afresh
        sample_every      every this many steps, sample a grid with the EMA weights into self.sample_grids
        callback          callback(trainer) every callback_every steps (e.g. to redraw a live loss curve)
        Under DDP call it on every rank: rank 0 alone shows progress, samples and writes; the callback runs
        everywhere (test trainer.is_main to print once)."""
        self._sampling = (sample_every, sample_count, sample_steps)
        try:                                # the loop's recipe (course_lib.loop.Fit.train_module)
            return self.train_module(self.model, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                                     resume=resume, max_seconds=max_seconds, progress=progress, callback=callback,
                                     callback_every=callback_every, desc="training", steps=steps)
        finally:
            self._sampling = None

    def resume_from(self, path: str | Path | None, resume: bool = True) -> bool:
        """A fresh trainer continues from `path` (Fit.resume_from) and says so; one that has trained goes on."""
        if self.step or self.last_good is not None:
            return False
        done = super().resume_from(path, resume)
        if done:
            print(f"resumed from {path} at step {self.step}")
        return done

    def report(self) -> "Trainer":
        return self

    def after_training(self, module: nn.Module | None) -> None:
        """Nothing: the U-Net stays in train mode between calls (sample() switches to eval and back)."""

    @torch.no_grad()
    def sample(self, n: int = 16, *, steps: int = 50, sampler: str | None = None, seed: int = 0,
               use_ema: bool = True, guidance_scale: float = 3.0) -> torch.Tensor:
        """n images (or latents) from the EMA (or raw) weights, with a fixed seed so grids are comparable
        over training. A conditional model gets the first n training captions, guided at `guidance_scale`.
        sampler: one of course_lib.sampling.SAMPLERS (default "ddim": Euler's step on a flow's path, where "heun"
        is on offer too). Pixel models: each step's x0_hat is clamped to [-1, 1], any objective (flow too)."""
        from .sampling import GuidedModel, sample  # imported here: sampling does not depend on training

        net = self.ema_model if use_ema else self.model
        was_training = net.training
        net.eval()
        model = net
        if self.conditioning is not None:
            index = torch.arange(n) % len(self.conditioning)
            context, mask = (z.to(self.device) for z in self.conditioning.batch(index))
            null = self.conditioning.null_context.to(self.device)[None]
            null_mask = self.conditioning.null_mask.to(self.device)[None]
            model = GuidedModel(net, context, mask, null, null_mask, guidance_scale)
        cfg = net.config
        shape = (n, cfg.in_channels, self.images.shape[2], self.images.shape[3])
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn(shape, generator=gen).to(self.device)
        out = sample(model, self.path, shape, sampler=sampler or "ddim", steps=steps, x_T=x_T, generator=gen,
                     prediction=self.config.predicts, device=self.device, clip_x0=not self.config.latents)
        net.train(was_training)
        return out.float().cpu()

    # --- checkpoints ----------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "train_config": self.config.to_json(),
                "architecture": architecture_of(self.model), "unet_config": self.model.config.to_json()}

    @classmethod
    def resume(cls, path: str | Path, images: torch.Tensor, device: torch.device | str | None = None,
               steps: int | None = None, conditioning: Conditioning | None = None,
               config: TrainConfig | None = None, **extra) -> "Trainer":
        """A Trainer in exactly the state `save` recorded; `steps` may raise the total to train for. Pass the same
        images, conditioning and `extra` (a subclass's own arguments: reflow's noise) it was trained on: else refused.
        config: the settings the caller means to train with (a script's flags); any field but steps and lr
        that differs from the checkpoint's is refused, naming it. A different lr is taken (and reported)."""
        _, meta = ckpt.read(path)
        if "train_config" not in meta:
            raise ValueError(f"{path} is not a course_lib Trainer checkpoint (format {meta.get('format')!r}; "
                             f"it holds no train_config)")
        saved = TrainConfig.from_json(meta["train_config"])
        if config is not None:
            differ = [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, now {getattr(config, f.name)!r}"
                      for f in dataclasses.fields(TrainConfig) if f.name not in ("steps", "lr")
                      and getattr(saved, f.name) != getattr(config, f.name)]
            if differ:
                raise ValueError(f"{path} was trained with other settings, so it cannot be continued with these: "
                                 f"{'; '.join(differ)}. Use the checkpoint's settings, or another run folder to "
                                 f"start afresh.")
            saved.lr = config.lr
        config = saved
        if steps is not None:
            config.steps = steps
        trainer = cls(build_model(meta), images, config, device=device or "cpu", conditioning=conditioning, **extra)
        trainer.load(path)
        return trainer

    def export(self, path: str | Path, info: dict | None = None, use_ema: bool = True,
               overwrite: bool = False) -> Path:
        """Write the compact model file (float16 EMA weights + config + schedule) for sampling and shipping.
        An existing file at `path` is kept under a new name (<name>.v<k>.safetensors, printed) unless
        overwrite=True (a script replacing the file it ships)."""
        details = {"steps": self.step, "train_seconds": round(self.seconds, 1), "weights": "ema" if use_ema else "raw",
                   "train_config": dataclasses.asdict(self.config), "n_images": self.images.shape[0]}
        details.update(info or {})
        if self.is_main:                                    # under DDP: rank 0 writes, the others wait
            if not overwrite and (kept := ckpt.keep_earlier(path)) is not None:
                print(f"{path} existed; the earlier model file is kept as {kept}")
            save_model(path, self.ema_model if use_ema else self.model, schedule=self.schedule,
                       prediction=self.config.predicts, info=details, shift=self.config.timestep_shift)
        distributed.barrier()
        return Path(path)


def smooth(values: list[float], window: int = 50) -> list[float]:
    """Running mean over the last `window` values, for plotting a noisy loss curve."""
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]

