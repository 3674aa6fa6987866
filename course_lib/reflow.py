r"""Reflow on a text-to-image flow: train a rectified flow on its own (noise, image) pairs, so few steps suffice.

A rectified flow (course_lib.flow) learns the velocity E[noise - x0 | x_t] of the straight path between
*independent* noise and data. Its ODE paths still curve, because many pairs cross at every x_t, so one Euler step
from noise lands on the average of many images: a blur. Reflow (Liu, Gong, Liu 2022, "Flow Straight and Fast";
InstaFlow, Liu et al. 2023, for text to image) trains a new flow on *coupled* pairs instead:

    z1 ~ N(0, I), c a caption      the noise and the condition
    z0 = ODE_teacher(z1, c)        where the teacher's ODE takes that noise (here: its guided Euler sampler)
    x_t = (1 - t) z0 + t z1        the straight line between the two, as in flow matching
    loss = || v_theta(x_t, t, c) - (z1 - z0) ||^2

The pairs no longer cross (each noise has one end), so the new flow's paths are straighter (course_lib.flow.
straightness measures it) and a few Euler steps, one at the extreme, follow them closely. The teacher's guidance is
in the pairs' ends, so the reflowed model is sampled without guidance: one network evaluation a step.

`ReflowTrainer` is course_lib.train.Trainer (the one loop: checkpoints, exact resume, EMA, export) whose batches
take each image's own noise instead of fresh noise; `teacher_pairs` makes the pairs with a TextToImage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt
from .checks import check_choice
from .forward import path_loss
from .loop import autocast, fingerprint
from .pipeline import SamplerSettings, start_latents
from .schedules import FLOW
from .train import Conditioning, Trainer, TrainConfig

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .pipeline import TextToImage

PAIRS_FORMAT = "course_lib.reflow_pairs"


class ReflowTrainer(Trainer):
    """A Trainer on fixed (noise, end) pairs: `images` are the ends z0 (latents), `noise` the noise z1 each came
    from, row for row; conditioning, when given, the captions the ends were generated for. Trains the flow
    objective only; no flips (a flipped end is not where its noise leads) and one process only."""

    def __init__(self, model: "Denoiser", images: torch.Tensor, config: TrainConfig | None = None,
                 device: torch.device | str | None = None, conditioning: Conditioning | None = None, *,
                 noise: torch.Tensor):
        config = config or TrainConfig(objective="flow", latents=True)
        check_choice("objective for reflow (a rectified flow's)", config.objective, (FLOW,))
        if config.hflip:
            raise ValueError("hflip must be False for reflow: a flipped end is not where its noise leads")
        if tuple(noise.shape) != tuple(images.shape):
            raise ValueError(f"noise must hold one noise per end, the ends' shape {tuple(images.shape)}; got "
                             f"{tuple(noise.shape)}")
        if not torch.isfinite(noise).all():
            raise ValueError("noise holds NaN or infinite values")
        self.noise = noise
        super().__init__(model, images, config, device, conditioning)
        if self.world_size > 1:
            raise ValueError("ReflowTrainer runs in one process; its batches are not split across ranks")

    def loss(self) -> torch.Tensor:
        index = self.batches.next()
        x0 = self.images[index].to(self.device)
        z1 = self.noise[index].to(self.device)
        cond = ()
        if self.conditioning is not None:
            drop = torch.rand(index.numel(), generator=self.generator) < self.config.caption_dropout
            cond = tuple(z.to(self.device) for z in self.conditioning.batch(index, drop))
        path = self.path
        t = path.draw_times(index.numel(), self.generator).to(self.device)
        with autocast(self.precision, self.device):
            return path_loss(self.net, path, x0, prediction=FLOW, t=t, noise=z1, cond=cond).loss

    def run_info(self) -> dict:
        return {**super().run_info(), "pairs_noise": fingerprint(self.noise)}


@torch.no_grad()
def teacher_pairs(pipe: "TextToImage", captions: list[str], settings: SamplerSettings, *, seed: int = 0,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(ends z0, noise z1), latents (N, C, h, w) for N = len(captions): caption k's noise is the pipeline's own
    start for image k from `seed` (course_lib.pipeline.start_latents, seed + k), its end where pipe's sampler at
    `settings` takes it, before decoding."""
    noise = start_latents(pipe.latent_shape, len(captions), seed)
    ends = pipe.generate(captions, seed=seed, settings=settings, return_latents=True, batch_size=batch_size)
    return ends, noise


def save_pairs(path: str | Path, ends: torch.Tensor, noise: torch.Tensor, captions: list[str]) -> Path:
    """Write the pairs with their captions (atomic, checksummed), so a long run makes them once."""
    if not (ends.shape == noise.shape and len(captions) == len(ends)):
        raise ValueError(f"need one noise and one caption per end; got ends {tuple(ends.shape)}, noise "
                         f"{tuple(noise.shape)}, {len(captions)} captions")
    return ckpt.atomic_save({"ends": ends.contiguous(), "noise": noise.contiguous()}, path,
                            {"format": PAIRS_FORMAT, "captions": json.dumps(captions)})


def load_pairs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(ends, noise, captions) as save_pairs wrote them, the checksum verified."""
    tensors, meta = ckpt.read(path)
    if meta.get("format") != PAIRS_FORMAT:
        raise ValueError(f"{path} is not a file of reflow pairs (format {meta.get('format')!r})")
    return tensors["ends"], tensors["noise"], json.loads(meta["captions"])


__all__ = ["PAIRS_FORMAT", "ReflowTrainer", "teacher_pairs", "save_pairs", "load_pairs"]
