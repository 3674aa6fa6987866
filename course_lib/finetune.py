r"""Fine-tuning part of a model through the course's one loop (course_lib.loop.Fit): notebooks 10-12.

LoRA and full fine-tuning (`fine_tune`; course_lib.lora.fit_lora), DreamBooth (course_lib.dreambooth), LiDB, the
hypernetwork and rank-relaxed fast fine-tuning (course_lib.hyperdreambooth) are each a small FineTune:
they give their loss, their parameters and what a resumed run must share with them (run_info); the loop
gives the optimizer step, clipping, the NaN guard, EMA, the time budget, progress, checkpoints and exact
resume. FineTune adds what every fine-tuning run needs around the loop:

    resume     a run given a checkpoint path continues from that file when it exists (refusing one of
               another run: other settings, data or frozen weights, named in the message)
    finish     however the run stops (its last step, an error, KeyboardInterrupt), the model goes back to
               eval mode, the EMA (if kept) goes into the trained parameters, and no gradients are held

The recipe every fine-tuner shares, written once here:
    draw            a batch of indices drawn with repeats (a fine-tuning set is a few images: no epochs)
    captioned_loss  the pipeline's objective (course_lib.forward.path_loss on its path and prediction) on
                    captioned latents, with any U-Net (a copy being tuned, or one with adapters)
    caption dropout course_lib.guidance.drop_captions, as the Trainer drops them
`CaptionedFineTune` is that loss on captioned latents with caption dropout, the loss of LoRA, full
fine-tuning and fast fine-tuning (`fine_tune` runs it); DreamBooth extends it with the prior images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .forward import path_loss
from .guidance import drop_captions
from .loop import Fit, FitConfig, fingerprint
from .vae import encode_latents

if TYPE_CHECKING:
    from .pipeline import TextToImage


@dataclass
class FineTuneLog:
    """What `fine_tune` did (a resumed run counts its earlier steps too)."""
    losses: list[float]
    seconds: float
    steps: int
    trainable: int               # numbers the optimiser updates
    state_bytes: int             # what training keeps per trained number: gradients + AdamW's two moments


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the gradients and optimiser state (AdamW: exp_avg, exp_avg_sq) actually held now."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.ndim > 0:
                    total += v.numel() * v.element_size()
    return total


def draw(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size indices into n items, drawn uniformly with repeats from `generator` (on the CPU)."""
    return torch.randint(0, n, (batch_size,), generator=generator)


def captioned_loss(pipe: "TextToImage", z0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                   generator: torch.Generator, unet: nn.Module | None = None, reduce: bool = True) -> torch.Tensor:
    """The pipeline's training objective on scaled latents z0 with text states (context, mask): path_loss along
    pipe.schedule with pipe.prediction (eps, x0, v, or a rectified flow's velocity), t then fresh noise from
    `generator`. `unet` defaults to the pipeline's (pass a copy being fine-tuned). reduce=False: (B,) per sample."""
    terms = path_loss(pipe.unet if unet is None else unet, pipe.schedule, z0, prediction=pipe.prediction,
                      generator=generator, cond=(context, mask))
    return terms.loss if reduce else terms.per_sample


class FineTune(Fit):
    """A Fit that fine-tunes part of a model. `run()` resumes from a checkpoint when there is one, puts `module`
    in train mode, fits, and whatever stops it (the end, an error, KeyboardInterrupt) calls `finish()`: the module
    back in eval mode, the EMA (if kept) in the trained parameters, no gradients held. Subclasses give loss(),
    run_info() (extending this one's) and fixed_tensors(): the data and frozen weights a resumed run must share."""

    def __init__(self, config: FitConfig, optimizer: torch.optim.Optimizer, device: torch.device | str,
                 seed: int = 0, module: nn.Module | None = None):
        super().__init__(config, optimizer, device, seed=seed)
        self.module, self.seed = module, seed
        self.state_bytes = 0                       # gradients + optimiser state after the first step
        self._fingerprint: str | None = None

    def fixed_tensors(self) -> list[torch.Tensor]:
        return []

    def run_info(self) -> dict:
        if self._fingerprint is None:              # the data and frozen weights do not change: hash them once
            self._fingerprint = fingerprint(*self.fixed_tensors())
        cfg = self.fit_config
        return {"method": type(self).__name__, "lr": cfg.lr, "seed": self.seed, "ema": cfg.ema_decay,
                "grad_clip": cfg.grad_clip, "trained_numbers": sum(p.numel() for p in self.params),
                "data": self._fingerprint}

    def after_step(self) -> None:
        if not self.state_bytes:
            self.state_bytes = optimizer_state_bytes(self.optimizer)

    def run(self, *, checkpoint_path: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
            max_seconds: float | None = None, progress: bool = False,
            callback: Callable[["FineTune"], None] | None = None, desc: str = "fine-tuning") -> "FineTune":
        """Train to config.steps (or max_seconds); with checkpoint_path, checkpoint every checkpoint_every steps
        and at the end, and (resume) first continue from the file if it exists. callback(self) after each step.
        The loop's recipe (course_lib.loop.Fit.train_module), with `finish` when it stops."""
        return self.train_module(self.module, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                                 resume=resume, max_seconds=max_seconds, progress=progress, callback=callback,
                                 callback_every=1, desc=desc)

    def report(self) -> "FineTune":
        return self

    def after_training(self, module: nn.Module | None) -> None:
        self.finish()

    @torch.no_grad()
    def finish(self) -> None:
        if self.module is not None:
            self.module.eval()
        for p, average in zip(self.params, self.ema_tensors or []):
            p.copy_(average)
        for p in self.params:
            p.grad = None


class CaptionedFineTune(FineTune):
    """The denoising loss on captioned latents z (N, C, h, w): a batch of `batch_size` drawn with repeats, a share
    caption_dropout of whose text states become the empty prompt's `null` (None: no dropout, nothing drawn for it),
    then `captioned_loss` with `unet`. AdamW on `params` without weight decay, gradients clipped to norm 1.
    info: more settings a resumed run must share (lora.fit_lora records the LoRA layers' rank, alpha and scale).
    optimizer: optimizer(params, lr) makes another optimiser (e.g. quantize.AdamW8bit); a resume must use the same."""

    def __init__(self, pipe: "TextToImage", unet: nn.Module, params: list[nn.Parameter], z: torch.Tensor,
                 context: torch.Tensor, mask: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                 seed: int = 0, ema: float | None = None, caption_dropout: float = 0.0,
                 null: tuple[torch.Tensor, torch.Tensor] | None = None, info: dict | None = None,
                 optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] | None = None):
        config = FitConfig(steps=steps, lr=lr, grad_clip=1.0, ema_decay=ema)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer is None else optimizer(params, lr)
        super().__init__(config, opt, pipe.device, seed, module=unet)
        if optimizer is not None:   # recorded only when not the default, so earlier runs' files still resume
            info = {**(info or {}), "optimizer": type(opt).__name__}
        self.pipe, self.unet, self.z, self.context, self.mask = pipe, unet, z, context, mask
        self.batch_size, self.caption_dropout, self.null, self.info = batch_size, caption_dropout, null, info or {}

    def loss(self) -> torch.Tensor:
        g = self.generator
        i = draw(len(self.z), self.batch_size, g)
        c, m = self.context[i], self.mask[i]
        if self.null is not None:
            drop = (torch.rand(self.batch_size, generator=g) < self.caption_dropout).to(c.device)
            c, m = drop_captions(c, m, drop, *self.null)
        return captioned_loss(self.pipe, self.z[i], c, m, g, unet=self.denoiser_for(i))

    def denoiser_for(self, index: torch.Tensor) -> nn.Module:
        """The network that denoises the batch of these indices: the U-Net (a ControlNet binds the batch's controls)."""
        return self.unet

    def fixed_tensors(self) -> list[torch.Tensor]:
        trained = {id(p) for p in self.params}
        frozen = [p for p in self.unet.parameters() if id(p) not in trained]
        return [self.z, self.context, self.mask, *(self.null or ()), *frozen]

    def run_info(self) -> dict:
        return {**super().run_info(), "batch_size": self.batch_size, "n_images": len(self.z),
                "caption_dropout": self.caption_dropout if self.null is not None else None, **self.info}


def fine_tune(pipe: "TextToImage", images: torch.Tensor, captions: list[str], params: list[nn.Parameter], *,
              unet: nn.Module | None = None, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
              caption_dropout: float = 0.1, seed: int = 0, max_seconds: float | None = None,
              ema: float | None = None, progress: bool = False, checkpoint_path: str | Path | None = None,
              checkpoint_every: int = 100, resume: bool = True, callback: Callable[[FineTune], None] | None = None,
              info: dict | None = None,
              optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] | None = None) -> FineTuneLog:
    """Train `params` (a LoRA's, or all of a U-Net's) with the pipeline's objective on images (N, 3, H, W) in
    [-1, 1] with their captions; a share caption_dropout of captions becomes "" so guidance keeps working.
    Stops after `steps` or `max_seconds`, whichever comes first (`CaptionedFineTune`).

    ema: keep an exponential moving average of `params` (decay ramped up: course_lib.loop.ema_decay_at) and put
    it into `params` at the end, as the base model's own training did; None keeps the last step's values.
    checkpoint_path: written every checkpoint_every steps and at the end; with resume, a run finds it and
    continues exactly where it stopped (a checkpoint of another run, other lr, data or seed, is refused).
    info: settings a resumed run must also share (course_lib.lora.fit_lora gives the adapters' rank and alpha).
    optimizer: optimizer(params, lr) instead of AdamW without weight decay (notebook 19: quantize.AdamW8bit).
    However the run stops, the U-Net is left in eval mode with the EMA in `params`."""
    unet = pipe.unet if unet is None else unet
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need one caption per image and at least one image; got {len(images)} and {len(captions)}")
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)
    c, m = pipe.encode(list(captions))
    run = CaptionedFineTune(pipe, unet, params, z, c, m, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                            ema=ema, caption_dropout=caption_dropout, null=pipe.encode([""]), info=info,
                            optimizer=optimizer)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
            max_seconds=max_seconds, progress=progress, callback=callback)
    return FineTuneLog(run.history["loss"], run.seconds, run.step, sum(p.numel() for p in params), run.state_bytes)


__all__ = ["FineTuneLog", "optimizer_state_bytes", "draw", "captioned_loss", "FineTune", "CaptionedFineTune",
           "fine_tune"]
