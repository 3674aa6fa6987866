r"""The text-to-image pipeline: a tiny Stable Diffusion put together from the course's parts.

    prompt --Tokenizer--> ids --TextEncoder (mini CLIP)--> text states (B, L, D) ---------+
                                                                                          | cross-attention
    seed --> z_T ~ N(0, I) (B, 4, 8, 8) --[sampler: U-Net(z_t, t, text) x steps]--> z_0 --+--> VAE decoder --> image
                                                        ^
                          classifier-free guidance: eps = eps("") + s (eps(prompt) - eps(""))

Each part is a course_lib module that a notebook builds: the tokenizer and text encoder
(course_lib.text, notebook 08), the U-Net with cross-attention (course_lib.unet, 09), the samplers
and guidance (course_lib.sampling, 05 and 09) and the VAE (course_lib.vae, 06). The diffusion runs on
the VAE's latents multiplied by `scale_factor`, so that they have unit variance (Stable Diffusion's
0.18215 is the same number for its VAE); the decoder gets them divided by it again.

A negative prompt replaces the empty prompt in the guidance formula, so the sampler steers away from it.

Seeds: image k of a call (counting over prompts, then images per prompt) starts from the noise of
seed + k, so an image does not change when other prompts are added to the batch.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .forward import prediction_target
from .sampling import SAMPLERS, GuidedModel, sample
from .schedules import NoiseSchedule
from .text import MiniCLIP, Tokenizer, encode_prompts, load_clip
from .unet import UNet
from .vae import VAE, decode_latents, load_vae

SHIPPED = {"unet": "tiny_sd_emoji", "clip": "clip_emoji", "vae": "vae_emoji32"}   # names in checkpoints/


class TextToImage:
    """prompts -> images. `pipe = TextToImage.from_shipped(); images = pipe(["red heart"], seed=0)`."""

    def __init__(self, unet: UNet, schedule: NoiseSchedule, clip: MiniCLIP, tokenizer: Tokenizer, vae: VAE,
                 scale_factor: float, prediction: str = "epsilon", device: torch.device | str | None = None):
        if unet.config.context_dim is None:
            raise ValueError("the U-Net is unconditional (context_dim=None); a text-to-image pipeline needs one "
                             "built with context_dim set to the text encoder's width")
        width = clip.config.text.width
        if unet.config.context_dim != width:
            raise ValueError(f"the U-Net attends to {unet.config.context_dim}-d text states but the text encoder "
                             f"gives {width}-d ones")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"the U-Net takes {unet.config.in_channels} channels; the VAE's latents have "
                             f"{vae.config.latent_channels}")
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.unet = unet.to(self.device).eval()
        self.clip = clip.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.scale_factor = float(scale_factor)
        self.prediction = prediction

    @classmethod
    def from_files(cls, unet_path: str | Path, clip_path: str | Path, vae_path: str | Path,
                   device: torch.device | str | None = None) -> "TextToImage":
        unet, schedule, info = ckpt.load_model(unet_path)
        clip, tokenizer, _ = load_clip(clip_path)
        vae, scale_factor, _ = load_vae(vae_path)
        return cls(unet, schedule, clip, tokenizer, vae, scale_factor, info["prediction"],
                   device=device if device is not None else "cpu")

    @classmethod
    def from_shipped(cls, device: torch.device | str | None = None) -> "TextToImage":
        """The course's trained tiny SD (checkpoints/tiny_sd_emoji, clip_emoji and vae_emoji32)."""
        return cls.from_files(ckpt.shipped(SHIPPED["unet"]), ckpt.shipped(SHIPPED["clip"]),
                              ckpt.shipped(SHIPPED["vae"]), device=device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.config.latent_shape

    @staticmethod
    def _prompt_list(prompts: str | list[str], what: str = "prompts") -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"{what} must be a string or a non-empty list of strings; got {prompts!r}")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"every prompt must be a string; got {type(p).__name__} ({p!r})")
        return list(prompts)

    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text states (B, L, D), mask (B, L)) for the prompts, on the pipeline's device."""
        return encode_prompts(self.clip, self.tokenizer, self._prompt_list(prompts), device=self.device)

    def denoising_loss(self, z0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                       generator: torch.Generator, unet: torch.nn.Module | None = None,
                       reduce: bool = True) -> torch.Tensor:
        """The training loss on scaled latents z0 with text states (context, mask): t uniform over the schedule,
        fresh noise, the pipeline's prediction target (eps, x0 or v). `unet` defaults to the pipeline's (pass a
        copy being fine-tuned). reduce=False: one value per sample (B,). Used by every fine-tuning method."""
        unet = self.unet if unet is None else unet
        B = z0.shape[0]
        t = torch.randint(0, self.schedule.T, (B,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        abar = self.schedule.extract(self.schedule.alphas_cumprod, t, z0)
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        out = unet(zt, t, context, mask).float()
        per_sample = (out - prediction_target(self.prediction, z0, noise, abar)).pow(2).flatten(1).mean(1)
        return per_sample.mean() if reduce else per_sample

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, seed: int = 0, steps: int = 20, guidance_scale: float = 4.0,
                 negative_prompt: str | list[str] = "", sampler: str = "ddim", images_per_prompt: int = 1,
                 return_latents: bool = False, progress: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] on the CPU, B = len(prompts) * images_per_prompt.

        steps            sampler steps (model calls, twice the batch each with guidance), 1..T
        guidance_scale   0: ignore the prompt; 1: plain conditional model; > 1: follow the prompt harder
        negative_prompt  what to steer away from: one string, or one per prompt ("" = nothing)
        return_latents   the final latents (scaled) instead of decoded images
        """
        prompts = self._prompt_list(prompts)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
            self._prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) != len(prompts):
            raise ValueError(f"give one negative prompt, or one per prompt ({len(prompts)}); got {len(negatives)}")
        T = self.schedule.T
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer from 1 to {T} (the schedule's length); got {steps!r}")
        if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, numbers.Integral) \
                or images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be a positive integer; got {images_per_prompt!r}")
        if not isinstance(guidance_scale, numbers.Real) or not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance); got {guidance_scale!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid are {', '.join(SAMPLERS)}")
        if not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer; got {seed!r}")

        prompts = [p for p in prompts for _ in range(images_per_prompt)]
        negatives = [n for n in negatives for _ in range(images_per_prompt)]
        context, mask = self.encode(prompts)
        null, null_mask = self.encode(negatives)
        model = GuidedModel(self.unet, context, mask, null, null_mask, float(guidance_scale))

        shape = (len(prompts), *self.latent_shape)
        x_T = torch.cat([torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(int(seed) + k))
                         for k in range(len(prompts))])
        generator = torch.Generator().manual_seed(int(seed))   # fresh noise of stochastic samplers (DDPM)
        latents = sample(model, self.schedule, shape, sampler=sampler, steps=int(steps), prediction=self.prediction,
                         generator=generator, device=self.device, x_T=x_T.to(self.device), clip_x0=False,
                         progress=progress)
        if return_latents:
            return latents.float().cpu()
        return decode_latents(self.vae, latents, self.scale_factor, device=self.device)


__all__ = ["SHIPPED", "TextToImage"]
