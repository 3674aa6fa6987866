r"""Training a denoiser: the loss, the optimiser, EMA, mixed precision, checkpoints and exact resume.

One training step (Ho et al. 2020, Algorithm 1, with the prediction types of Salimans & Ho 2022):
    x0 ~ data,  t ~ Uniform{0..T-1},  eps ~ N(0, I)
    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = || model(x_t, t) - target ||^2,   target = eps ("epsilon"), x0 ("x0") or
                                                        sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v")
With a learned schedule (course_lib.learned_schedule) t is continuous, u ~ U(0, 1), and the schedule's
parameters are trained alongside to minimise the variance of the variational bound's estimate.

Around the step:
    AdamW with linear warm-up       the learning rate rises from 0 over `warmup` steps, then stays
    gradient clipping               the gradient's global norm is capped at `grad_clip`
    EMA                             a slowly moving average of the weights, used for sampling; its
                                    decay ramps up as min(ema_decay, (1 + step) / (10 + step))
    mixed precision (GPU)           bf16 autocast where the GPU has it natively (compute capability
                                    >= 8.0), else fp16 autocast with a gradient scaler; float32 on CPU
    NaN / inf guard                 a non-finite loss stops training with the step number
    checkpoints                     safetensors, written atomically; a checkpoint holds the weights,
                                    EMA, optimizer moments, random-number states and data order,
                                    so `Trainer.resume` continues exactly where training stopped

Text conditioning (a U-Net built with context_dim, course_lib.unet): each image comes with the text
encoder's states for its caption (a `Conditioning`), and the model learns eps(x_t, t, text). With
probability `caption_dropout` (10% here, as in Ho & Salimans 2022) a caption is swapped for the empty
prompt's states, so the same network also learns the unconditional eps(x_t, t, "") that classifier-free
guidance needs at sampling time (course_lib.sampling.GuidedModel).

Latent diffusion (`latents=True`): the data are a VAE's scaled latents (course_lib.vae), which are not
bounded to [-1, 1]; the range check and the x0 clamp while sampling are then off. Nothing else changes:
the trainer does not know whether it denoises pixels or latents.

All randomness of the training loop (data order, timesteps, noise, caption dropout) comes from one
seeded CPU torch.Generator whose state is saved with the checkpoint.

Several processes (`torchrun --nproc_per_node=N`, course_lib.distributed): when a process group of N > 1
ranks is initialised, the Trainer wraps the U-Net in DistributedDataParallel. config.batch_size is then the
global batch B: every rank draws the same B indices, flips, timesteps and noise as one process would, and
keeps its rows r*b .. (r+1)*b - 1 (b = B / N); DDP averages the gradients, so each step equals the single
process's step up to float summation order. The logged loss is averaged over the ranks; only rank 0 shows
progress and writes files, and `save` stores the plain U-Net's weights, so checkpoints move freely between
1 and N processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .forward import check_images, check_prediction, predicted_x0_eps, prediction_target
from .learned_schedule import LearnedSchedule, schedule_loss_surrogate
from .schedules import KINDS, NoiseSchedule, make_schedule
from .unet import UNet, UNetConfig

SCHEDULES = KINDS + ("learned",)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. Every field is saved in checkpoints, so a resumed run trains the same way."""
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prediction: str = "epsilon"
    schedule: str = "linear"          # one of SCHEDULES
    T: int = 1000
    schedule_lr: float = 1e-3         # learning rate of a learned schedule's parameters
    precision: str = "auto"
    hflip: bool = False               # random horizontal flips (off: many emoji are not symmetric)
    caption_dropout: float = 0.1      # with text conditioning: share of captions replaced by the empty prompt
    latents: bool = False             # the data are VAE latents: no [-1, 1] check, no x0 clamp when sampling
    seed: int = 0

    def __post_init__(self):
        check_prediction(self.prediction)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid are {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid are {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.grad_clip <= 0 or not 0 <= self.ema_decay < 1:
            raise ValueError("need lr > 0, warmup >= 0, grad_clip > 0 and 0 <= ema_decay < 1")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout is a probability in [0, 1]; got {self.caption_dropout}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls(**json.loads(text))


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' on a GPU of compute capability >= 8.0, 'fp16' on older GPUs (a T4 is 7.5: fast fp16,
    no native bf16), 'fp32' on a CPU. 'fp16' needs a CUDA GPU (its gradient scaler is CUDA-only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid are {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' (with a GradScaler) needs a CUDA GPU; on a CPU use 'fp32' or 'bf16'")
        return precision
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision ('fp32': none)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to config.lr over config.warmup steps, then constant."""
    if config.warmup == 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay ramped up so the early average is not dominated by the random initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class Conditioning:
    """The text a conditional U-Net trains on: per image, the text encoder's states for its caption
    (course_lib.text.encode_prompts), and the empty prompt's states that caption dropout swaps in."""
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
        if drop is not None:
            context = torch.where(drop[:, None, None], self.null_context.to(context.dtype), context)
            mask = torch.where(drop[:, None], self.null_mask, mask)
        return context, mask


class Trainer:
    """Trains a U-Net on a fixed tensor of images; `train()` runs until config.steps, resumable.

    trainer = Trainer(UNet(get_preset("small")), images, TrainConfig(steps=2000))
    trainer.train(checkpoint_path="runs/ddpm.safetensors", checkpoint_every=500)
    ...later, after an interruption:
    trainer = Trainer.resume("runs/ddpm.safetensors", images)
    trainer.train(checkpoint_path="runs/ddpm.safetensors", checkpoint_every=500)

    With text: Trainer(UNet(get_preset("sd_small")), latents, TrainConfig(latents=True), conditioning=cond)

    Under torchrun (one process per GPU): info = distributed.setup(), then Trainer(..., device=info.device)
    on every rank; self.model stays the plain U-Net and self.net is its DistributedDataParallel wrapper.
    """

    def __init__(self, model: UNet, images: torch.Tensor, config: TrainConfig | None = None,
                 device: torch.device | str | None = None, conditioning: Conditioning | None = None):
        self.config = config or TrainConfig()
        cfg = self.config
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
        self.conditioning = conditioning
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.images = images
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is the global batch, split evenly over the "
                             f"{self.world_size} processes; it must be divisible by {self.world_size}")
        self.model = model.to(self.device).train()          # always the plain U-Net (saved, EMA'd, sampled)
        self.net = self.model                               # what the training step calls
        if self.world_size > 1:                             # DDP: copies rank 0's weights to every rank now,
            self.net = nn.parallel.DistributedDataParallel(  # and averages gradients during backward
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.learned: LearnedSchedule | None = None
        self.fixed_schedule: NoiseSchedule | None = None
        groups = [{"params": list(self.model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if cfg.schedule == "learned":
            self.learned = LearnedSchedule().to(self.device)
            groups.append({"params": list(self.learned.parameters()), "lr": cfg.schedule_lr, "weight_decay": 0.0})
        else:
            self.fixed_schedule = make_schedule(cfg.schedule, cfg.T)
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.losses: list[float] = []
        self.sample_grids: list[tuple[int, torch.Tensor]] = []
        self.seconds = 0.0
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0

    # --- the schedule the samplers should use -------------------------------------------------------
    @property
    def schedule(self) -> NoiseSchedule:
        if self.learned is not None:
            return self.learned.to_noise_schedule(self.config.T)
        return self.fixed_schedule

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files: rank 0, or the only process."""
        return self.rank == 0

    # --- data -----------------------------------------------------------------------------------------
    def _my_rows(self, batch: int) -> slice:
        """This rank's rows of a global batch: rank r of N takes r*b .. (r+1)*b - 1, b = batch / N."""
        b = batch // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def _next_batch(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """A batch drawn without replacement (a new random order each pass through the data), with its
        text states (some dropped to the empty prompt) when the model is conditional."""
        n, b = self.images.shape[0], self.config.batch_size
        picked = []
        while b > 0:
            if self._position >= self._order.numel():
                self._order = torch.randperm(n, generator=self.generator)
                self._position = 0
            take = self._order[self._position:self._position + b]
            self._position += take.numel()
            b -= take.numel()
            picked.append(take)
        index = torch.cat(picked)                          # the global batch, the same on every rank
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

    # --- one step ---------------------------------------------------------------------------------------
    def loss_on(self, x0: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict]:
        """The training loss on a batch (drawing t and noise from the trainer's generator); `cond` is
        (context, mask) for a text-conditioned model. Under DDP x0 is this rank's slice: the draws are made
        for the global batch, as one process would, and sliced the same way."""
        cfg, B = self.config, x0.shape[0] * self.world_size    # B: the global batch
        mine = self._my_rows(B)
        noise = torch.randn((B, *x0.shape[1:]), generator=self.generator)[mine].to(self.device)
        extra: dict = {}
        if self.learned is None:
            t = torch.randint(0, cfg.T, (B,), generator=self.generator)[mine].to(self.device)
            abar = self.fixed_schedule.extract(self.fixed_schedule.alphas_cumprod, t, x0)
            t_model = t
        else:
            u = torch.rand(B, generator=self.generator)[mine].to(self.device)
            gamma, slope = self.learned.gamma_and_slope(u)
            g = gamma.detach().requires_grad_(True)           # the noise level, as a leaf for d/d gamma
            abar = torch.sigmoid(-g)[:, None, None, None]
            t_model = u * cfg.T - 1
            extra = {"gamma": gamma, "slope": slope, "g": g}
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        with autocast(self.precision, self.device):
            out = self.net(xt, t_model) if cond is None else self.net(xt, t_model, *cond)
        out = out.float()
        target = prediction_target(cfg.prediction, x0, noise, abar)
        loss = F.mse_loss(out, target)
        if self.learned is not None:
            _, eps_hat = predicted_x0_eps(cfg.prediction, out, xt, abar)
            extra["sse"] = (noise - eps_hat).pow(2).flatten(1).sum(1)
        return loss, extra

    def train_step(self) -> float:
        cfg = self.config
        for group in self.optimizer.param_groups[:1]:
            group["lr"] = lr_at(self.step, cfg)
        x0, cond = self._next_batch()
        loss, extra = self.loss_on(x0, cond)
        logged = distributed.all_reduce_mean(loss.detach())   # the global batch's loss, on every rank
        if not torch.isfinite(logged):
            raise TrainingDiverged(
                f"the loss became {logged.item()} at step {self.step}; training stopped. Lower the learning "
                f"rate (now {lr_at(self.step, cfg):.2e}), keep grad_clip on, or try precision='fp32'. "
                f"The last checkpoint written (if any) is intact.")
        self.optimizer.zero_grad(set_to_none=True)
        if self.learned is not None:
            # d sse_i / d gamma_i for the schedule's variance objective (denoiser held fixed)
            (dsse,) = torch.autograd.grad(extra["sse"].sum(), extra["g"], retain_graph=True)
            surrogate = schedule_loss_surrogate(extra["gamma"], extra["slope"], extra["sse"].detach(), dsse)
            sched_grads = torch.autograd.grad(surrogate, list(self.learned.parameters()))
            sched_grads = [distributed.all_reduce_mean(g) for g in sched_grads]   # DDP does not see these
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)   # DDP's grads: already averaged
        if self.learned is not None:
            for p, g in zip(self.learned.parameters(), sched_grads):
                p.grad = g
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.ema, self.model, ema_decay_at(self.step, cfg.ema_decay))
        self.step += 1
        value = logged.item()
        self.losses.append(value)
        return value

    # --- the loop -----------------------------------------------------------------------------------------
    def train(self, steps: int | None = None, *, checkpoint_path: str | Path | None = None,
              checkpoint_every: int = 1000, sample_every: int = 0, sample_count: int = 16,
              sample_steps: int = 50, callback: Callable[["Trainer"], None] | None = None,
              callback_every: int = 50, progress: bool = True, max_seconds: float | None = None) -> "Trainer":
        """Train until `steps` total steps (default config.steps), or until max_seconds have passed.

        checkpoint_path   written every checkpoint_every steps and at the end (atomically)
        sample_every      every this many steps, sample a grid with the EMA weights into self.sample_grids
        callback          called every callback_every steps (e.g. to redraw a live loss curve)
        Under DDP call it on every rank: rank 0 alone shows progress, samples grids and writes the
        checkpoint; the callback runs on every rank (test trainer.is_main to print once)."""
        target = self.config.steps if steps is None else steps
        start, begun = self.step, time.perf_counter()
        bar = tqdm(total=target, initial=self.step, disable=not (progress and self.is_main), desc="training",
                   unit="step")
        try:
            while self.step < target:
                t0 = time.perf_counter()
                loss = self.train_step()
                self.seconds += time.perf_counter() - t0
                bar.update(1)
                if self.step % 10 == 0 or self.step == target:
                    bar.set_postfix(loss=f"{sum(self.losses[-10:]) / len(self.losses[-10:]):.4f}")
                if sample_every and self.step % sample_every == 0 and self.is_main:
                    self.sample_grids.append((self.step, self.sample(sample_count, steps=sample_steps)))
                if checkpoint_path is not None and self.step % checkpoint_every == 0:
                    self.save(checkpoint_path)
                if callback is not None and (self.step % callback_every == 0 or self.step == target):
                    callback(self)
                if max_seconds is not None:
                    late = torch.tensor(float(time.perf_counter() - begun >= max_seconds), device=self.device)
                    if distributed.all_reduce_mean(late) > 0:    # all ranks stop at the same step
                        break
        finally:
            bar.close()
        if checkpoint_path is not None and self.step != start:
            self.save(checkpoint_path)
        return self

    @torch.no_grad()
    def sample(self, n: int = 16, *, steps: int = 50, sampler: str = "ddim", seed: int = 0,
               use_ema: bool = True, guidance_scale: float = 3.0) -> torch.Tensor:
        """n images (or latents) from the EMA (or raw) weights, with a fixed seed so grids are comparable
        over training. A conditional model is given the captions of the first n training images, with
        classifier-free guidance at `guidance_scale`."""
        from .sampling import GuidedModel, sample  # imported here: sampling does not depend on training

        net = self.ema if use_ema else self.model
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
        out = sample(model, self.schedule, shape, sampler=sampler, steps=steps, prediction=self.config.prediction,
                     x_T=x_T, generator=gen, device=self.device, clip_x0=not self.config.latents)
        net.train(was_training)
        return out.float().cpu()

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if self.learned is not None:
            tensors.update({f"schedule.{k}": v for k, v in self.learned.state_dict().items()})
        for i, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(value)
        tensors["rng.loop"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        tensors["data.order"] = self._order.clone()
        tensors["log.losses"] = torch.tensor(self.losses, dtype=torch.float64)
        return tensors

    def save(self, path: str | Path) -> Path:
        """Write a full training checkpoint, atomically. Under DDP call it on every rank: rank 0 writes,
        the others wait until the file is complete."""
        meta = {"format": "course_lib.train/1", "train_config": self.config.to_json(),
                "unet_config": self.model.config.to_json(), "step": str(self.step),
                "data_position": str(self._position), "seconds": repr(self.seconds),
                "n_images": str(self.images.shape[0]), "precision": self.precision,
                "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"}
                                            for g in self.optimizer.state_dict()["param_groups"]]),
                "scaler": json.dumps(self.scaler.state_dict() if self.scaler is not None else None)}
        if self.is_main:
            ckpt.atomic_save(self.state_tensors(), path, meta)
        distributed.barrier()
        return Path(path)

    @classmethod
    def resume(cls, path: str | Path, images: torch.Tensor, device: torch.device | str | None = None,
               steps: int | None = None, conditioning: Conditioning | None = None) -> "Trainer":
        """A Trainer in exactly the state `save` recorded; `steps` may raise the total to train for.
        Pass the same images (and conditioning) it was trained on."""
        tensors, meta = ckpt.read(path)
        if meta.get("format") != "course_lib.train/1":
            raise ValueError(f"{path} is not a course_lib training checkpoint (format {meta.get('format')!r})")
        if int(meta["n_images"]) != images.shape[0]:
            raise ValueError(f"the checkpoint was trained on {meta['n_images']} images; got {images.shape[0]}. "
                             f"Resume with the same data to continue exactly.")
        config = TrainConfig.from_json(meta["train_config"])
        if steps is not None:
            config.steps = steps
        model = UNet(UNetConfig.from_json(meta["unet_config"]))
        trainer = cls(model, images, config, device=device or "cpu", conditioning=conditioning)
        sub = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        trainer.model.load_state_dict(sub("model."))
        trainer.ema.load_state_dict(sub("ema."))
        if trainer.learned is not None:
            trainer.learned.load_state_dict(sub("schedule."))
        optim_state: dict[int, dict] = {}
        for key, value in sub("optim.").items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
        groups = json.loads(meta["param_groups"])
        state_dict = trainer.optimizer.state_dict()
        for group, saved in zip(state_dict["param_groups"], groups):
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
        state_dict["state"] = optim_state
        trainer.optimizer.load_state_dict(state_dict)
        if trainer.scaler is not None and json.loads(meta["scaler"]) is not None:
            trainer.scaler.load_state_dict(json.loads(meta["scaler"]))
        trainer.generator.set_state(tensors["rng.loop"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
        trainer._order = tensors["data.order"].long()
        trainer._position = int(meta["data_position"])
        trainer.step = int(meta["step"])
        trainer.seconds = float(meta["seconds"])
        trainer.losses = tensors["log.losses"].tolist()
        return trainer

    def export(self, path: str | Path, info: dict | None = None, use_ema: bool = True) -> Path:
        """Write the compact model file (float16 EMA weights + config + schedule) for sampling and shipping."""
        details = {"steps": self.step, "train_seconds": round(self.seconds, 1), "weights": "ema" if use_ema else "raw",
                   "train_config": dataclasses.asdict(self.config), "n_images": self.images.shape[0]}
        details.update(info or {})
        if self.is_main:                                    # under DDP: rank 0 writes, the others wait
            ckpt.save_model(path, self.ema if use_ema else self.model, schedule=self.schedule,
                            prediction=self.config.prediction, info=details)
        distributed.barrier()
        return Path(path)


def smooth(values: list[float], window: int = 50) -> list[float]:
    """Running mean over the last `window` values, for plotting a noisy loss curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

