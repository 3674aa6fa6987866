r"""Fine-tuning part of a model through the course's one loop (course_lib.loop.Fit): notebooks 10-12.

LoRA and full fine-tuning (course_lib.lora.fine_tune), DreamBooth (course_lib.dreambooth), LiDB, the
hypernetwork and rank-relaxed fast fine-tuning (course_lib.hyperdreambooth) are each a small FineTune:
they give their loss, their parameters and what a resumed run must share with them (run_info); the loop
gives the optimizer step, clipping, the NaN guard, EMA, the time budget, progress, checkpoints and exact
resume. FineTune adds what every fine-tuning run needs around the loop:

    resume     a run given a checkpoint path continues from that file when it exists (refusing one of
               another run: other settings, data or frozen weights, named in the message)
    finish     however the run stops (its last step, an error, KeyboardInterrupt), the model goes back to
               eval mode, the EMA (if kept) goes into the trained parameters, and no gradients are held

`CaptionedFineTune` is the denoising loss on captioned latents (with caption dropout for guidance), the
loss of LoRA, full fine-tuning and fast fine-tuning; DreamBooth extends it with the prior images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .loop import Fit, FitConfig, fingerprint

if TYPE_CHECKING:
    from .pipeline import TextToImage


@dataclass
class FineTuneLog:
    """What `course_lib.lora.fine_tune` did (a resumed run counts its earlier steps too)."""
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
        and at the end, and (resume) first continue from the file if it exists. callback(self) after each step."""
        self.resume_from(checkpoint_path, resume)
        if self.module is not None:
            self.module.train()
        try:
            self.fit(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, max_seconds=max_seconds,
                     progress=progress, callback=callback, callback_every=1, desc=desc)
        finally:
            self.finish()
        return self

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
    then pipe.denoising_loss with `unet`. AdamW on `params` without weight decay, gradients clipped to norm 1.
    info: more settings a resumed run must share (fine_tune records the LoRA layers' rank, alpha and scale)."""

    def __init__(self, pipe: "TextToImage", unet: nn.Module, params: list[nn.Parameter], z: torch.Tensor,
                 context: torch.Tensor, mask: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                 seed: int = 0, ema: float | None = None, caption_dropout: float = 0.0,
                 null: tuple[torch.Tensor, torch.Tensor] | None = None, info: dict | None = None):
        config = FitConfig(steps=steps, lr=lr, grad_clip=1.0, ema_decay=ema)
        super().__init__(config, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), pipe.device, seed, module=unet)
        self.pipe, self.unet, self.z, self.context, self.mask = pipe, unet, z, context, mask
        self.batch_size, self.caption_dropout, self.null, self.info = batch_size, caption_dropout, null, info or {}

    def loss(self) -> torch.Tensor:
        g = self.generator
        i = torch.randint(0, len(self.z), (self.batch_size,), generator=g)
        c, m = self.context[i], self.mask[i]
        if self.null is not None:
            drop = (torch.rand(self.batch_size, generator=g) < self.caption_dropout).to(c.device)
            c = torch.where(drop[:, None, None], self.null[0], c)
            m = torch.where(drop[:, None], self.null[1], m)
        return self.pipe.denoising_loss(self.z[i], c, m, g, unet=self.unet)

    def fixed_tensors(self) -> list[torch.Tensor]:
        trained = {id(p) for p in self.params}
        frozen = [p for p in self.unet.parameters() if id(p) not in trained]
        return [self.z, self.context, self.mask, *(self.null or ()), *frozen]

    def run_info(self) -> dict:
        return {**super().run_info(), "batch_size": self.batch_size, "n_images": len(self.z),
                "caption_dropout": self.caption_dropout if self.null is not None else None, **self.info}


__all__ = ["FineTuneLog", "optimizer_state_bytes", "FineTune", "CaptionedFineTune"]
