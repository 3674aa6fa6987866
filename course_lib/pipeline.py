r"""The text-to-image pipeline: a tiny Stable Diffusion put together from the course's parts (notebook 09).

    prompt --Tokenizer--> ids --TextEncoder (mini CLIP)--> text states (B, L, D) ---------+
                                                                                          | cross-attention
    seed --> z_T ~ N(0, I) (B, 4, 8, 8) --[sampler: U-Net(z_t, t, text) x steps]--> z_0 --+--> VAE decoder --> image
                                                        ^
                          classifier-free guidance: eps = eps("") + s (eps(prompt) - eps(""))

Each part is a course_lib module that a notebook builds: the tokenizer (course_lib.tokenizer) and the
mini CLIP's text encoder (course_lib.clip, notebook 08), the U-Net with cross-attention (course_lib.unet,
09), the samplers (course_lib.sampling, 05), guidance (course_lib.guidance, 09) and the VAE
(course_lib.vae, 06). The diffusion runs on the VAE's latents multiplied by `scale_factor`, so that they
have unit variance (course_lib.sd.SD_LATENT_SCALE is the same number for SD 1.x's VAE); the decoder gets
them divided by it again.

`text_to_image` is the one generation path of the course: the tiny SD here and SD 1.5
(course_lib.sd.StableDiffusion) both call it, with their own text encoder, denoiser, decoder and sampler
settings (course_lib.sampling.SamplerSettings: TINY_SD_SAMPLER here, course_lib.sd.SD15_SAMPLER there).

A U-Net trained with rectified flow (TrainConfig(objective="flow"), notebook 13; prediction "flow" in its file)
makes the same pipeline a tiny SD 3 with nothing changed but its path: the pipeline samples it along
course_lib.schedules.FlowSchedule, where the default DDIM step is Euler's, and "heun" is on offer. A DiT or SD 3's
MMDiT (course_lib.dit, course_lib.mmdit) takes the U-Net's place unchanged: the pipeline only calls
denoiser(z_t, t, states, mask), and a model file says which network it holds (course_lib.unet_file).

A negative prompt replaces the empty prompt in the guidance formula, so the sampler steers away from it.

Seeds: image k of a call (counting over prompts, then images per prompt) starts from the noise of
seed + k, drawn on the CPU, so an image does not change when other prompts are added to the batch, nor
from one device to another. `generate` splits a long prompt list into batches with the same seeds.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .checks import check_choice, check_int
from .clip import MiniCLIP, encode_prompts, load_clip
from .guidance import GuidedModel
from .guidance import check_rescale
from .sampling import SPACINGS, check_sampler, sample
from .schedules import FLOW, FlowSchedule, NoiseSchedule, path_for  # noqa: F401  (FLOW: also from here)
from .tokenizer import Tokenizer
from .unet import UNet
from .unet_file import load_model
from .vae import VAE, decode_latents, load_vae

@dataclass(frozen=True)
class SamplerSettings:
    """A pipeline's sampler, as one value: course_lib.pipeline.TextToImage and course_lib.sd.StableDiffusion
    keep one (the tiny SD's: TINY_SD_SAMPLER; SD 1.5's scheduler: course_lib.sd.SD15_SAMPLER), and a call's
    keywords replace fields of it: `settings.replace(steps=50)`."""
    sampler: str = "ddim"           # one of ALL_SAMPLERS (euler and heun: a rectified-flow model's only)
    steps: int = 20                 # model calls (twice the batch each with guidance), 1..T
    guidance_scale: float = 4.0     # 0: ignore the prompt; 1: plain conditional model; > 1: follow it harder
    guidance_rescale: float = 0.0   # phi of rescaled guidance (Lin et al. 2024), in [0, 1]; 0: plain guidance
    eta: float = 0.0                # DDIM's fresh noise: 0 deterministic, 1 as much as DDPM
    spacing: str = "trailing"       # which timesteps (see `timesteps`): one of SPACINGS
    offset: int = 0                 # added to every timestep (SD 1.5: 1)
    final_t: int = -1               # where the last step lands: -1 the clean end, 0 abar_0 (SD 1.5)
    start_t: float | None = None    # the first timestep (None: T-1, a flow's 1); below it to edit a partly noised image
    distilled_steps: int = 50       # sampler "lcm" only: the grid its student was distilled on (course_lib.lcm)

    def __post_init__(self):
        check_int("steps", self.steps, 1, hint=" (up to the schedule's length T)")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not 0 <= g < math.inf:
            raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance); got {g!r}")
        check_rescale(self.guidance_rescale, "guidance_rescale")
        check_sampler(self.sampler, self.eta)
        check_choice("timestep spacing", self.spacing, SPACINGS)
        for name, low in (("offset", 0), ("final_t", -1), ("distilled_steps", 1)):
            check_int(name, getattr(self, name), low)

    def replace(self, **changes) -> "SamplerSettings":
        """A copy with the fields given changed (and checked again); a field given as None keeps its value, so a
        pipeline's call can pass its keywords straight through."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def options(self) -> dict:
        """The keywords of `sample` / `reverse_process` these settings give (all but the guidance fields)."""
        options = {"sampler": self.sampler, "steps": int(self.steps), "eta": self.eta, "spacing": self.spacing,
                   "offset": int(self.offset), "final_t": int(self.final_t)}
        if self.sampler == "lcm":
            options["distilled_steps"] = int(self.distilled_steps)
        return options if self.start_t is None else {**options, "start_t": self.start_t}


TINY_SD_SAMPLER = SamplerSettings()     # the course's tiny SD (notebook 09): DDIM, 20 trailing steps, guidance 4
TINY_SD3_SAMPLER = SamplerSettings(sampler="euler", guidance_scale=1.5)   # the tiny SD 3 (an MMDiT): its card's sweep


SHIPPED = {"unet": "tiny_sd_emoji", "clip": "clip_emoji", "vae": "vae_emoji32"}   # names in checkpoints/
SHIPPED_MODELS = {"tiny_sd": ("tiny_sd_emoji", TINY_SD_SAMPLER),      # from_shipped's choices: a U-Net
                  "tiny_sd3": ("tiny_sd3_emoji", TINY_SD3_SAMPLER)}   # and an MMDiT, each with its sampler settings

Encode = Callable[[list[str]], tuple[torch.Tensor, "torch.Tensor | None"]]   # prompts -> (states, mask or None)


def prompt_list(prompts: str | list[str], what: str = "prompts") -> list[str]:
    """A list of prompts from one string or a non-empty list of strings; anything else is refused."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{what} must be a string or a non-empty list of strings; got {prompts!r}")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"every prompt must be a string; got {type(p).__name__} ({p!r})")
    return list(prompts)


def check_seed(seed) -> int:
    """seed as an int, or a TypeError naming what was given (bool and floats are refused)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer; got {seed!r}")
    return int(seed)


@torch.no_grad()
def start_latents(latent_shape: tuple[int, int, int], n: int, seed: int) -> torch.Tensor:
    """The starting noise of n images (n, *latent_shape): image k from torch.randn on the CPU with seed + k, so
    an image's noise does not depend on the batch it is drawn in."""
    return torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed + k))
                      for k in range(n)])


def guided(denoiser: torch.nn.Module, encode: Encode, prompts: list[str], negatives: list[str],
           settings: SamplerSettings) -> GuidedModel:
    """The denoiser with each prompt fixed and classifier-free guidance at settings.guidance_scale (rescaled by
    settings.guidance_rescale), each image's negative prompt in the place of the empty prompt."""
    context, mask = encode(prompts)
    null, null_mask = encode(negatives)
    return GuidedModel(denoiser, context, mask, null, null_mask, float(settings.guidance_scale),
                       float(settings.guidance_rescale))


def text_to_image(denoiser: torch.nn.Module, schedule: NoiseSchedule | FlowSchedule, encode: Encode,
                  decode: Callable[[torch.Tensor], torch.Tensor], prompts: str | list[str],
                  settings: SamplerSettings, *, latent_shape: tuple[int, int, int],
                  negative_prompt: str | list[str] = "", seed: int = 0, images_per_prompt: int = 1,
                  prediction: str = "epsilon", latents: torch.Tensor | None = None, return_latents: bool = False,
                  progress: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompts -> images (B, 3, H, W) in [-1, 1] on the CPU, B = len(prompts) * images_per_prompt: the one
    generation path of the tiny SD (TextToImage) and SD 1.5 (course_lib.sd.StableDiffusion).

    denoiser   a text-conditioned U-Net, denoiser(z_t, t, states, mask)
    encode     prompts -> (text states (B, L, D), mask (B, L) or None)
    decode     scaled latents -> images (e.g. the VAE's decoder after dividing by the scale factor)
    settings   sampler, steps, guidance scale and timesteps (course_lib.sampling.SamplerSettings)
    latents    the starting noise (B, *latent_shape); default: image k from torch.randn with seed + k

    1. check the prompts, the negative prompts (one, or one per prompt) and the steps against the schedule
    2. text states of every image's prompt and of its negative prompt (the empty prompt by default)
    3. classifier-free guidance at settings.guidance_scale, rescaled by settings.guidance_rescale
       (course_lib.guidance.GuidedModel)
    4. sample from the starting noise (fresh noise of a stochastic sampler from `seed`), then decode
    """
    prompts = prompt_list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
        prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != len(prompts):
        raise ValueError(f"give one negative prompt, or one per prompt ({len(prompts)}); got {len(negatives)}")
    schedule.grid(settings.steps, settings.spacing, settings.offset, settings.start_t)   # checks the steps
    images_per_prompt = check_int("images_per_prompt", images_per_prompt, 1)
    seed = check_seed(seed)
    prompts = [p for p in prompts for _ in range(images_per_prompt)]
    negatives = [n for n in negatives for _ in range(images_per_prompt)]
    shape = (len(prompts), *latent_shape)                  # (B, C, h, w): batch, latent channels, height, width
    if latents is None:
        latents = start_latents(latent_shape, len(prompts), seed)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for {len(prompts)} image(s); got {tuple(latents.shape)}")

    model = guided(denoiser, encode, prompts, negatives, settings)
    generator = torch.Generator().manual_seed(seed)       # fresh noise of stochastic samplers (DDPM, DDIM eta > 0)
    z = sample(model, schedule, shape, **settings.options(), prediction=prediction, generator=generator,
               device=device, x_T=latents.float().to(device), clip_x0=False, progress=progress)
    return z.float().cpu() if return_latents else decode(z)


def generate(pipe: Callable[..., torch.Tensor], prompts: str | list[str], *, batch_size: int = 256, seed: int = 0,
             images_per_prompt: int = 1, negative_prompt: str | list[str] = "", **options) -> torch.Tensor:
    """All images of a long prompt list, `batch_size` prompts per call of `pipe` (a TextToImage or a
    StableDiffusion): the same images as one call with every prompt (image k from seed + k), in less memory.
    options go to the pipeline's call (steps, guidance_scale, sampler, settings, return_latents, ...)."""
    prompts = prompt_list(prompts)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_seed(seed)
    per = check_int("images_per_prompt", images_per_prompt, 1)
    negatives = negative_prompt
    if not isinstance(negative_prompt, str):
        negatives = prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) != len(prompts):
            raise ValueError(f"give one negative prompt, or one per prompt ({len(prompts)}); got {len(negatives)}")
    return torch.cat([pipe(prompts[i:i + batch_size], seed=seed + i * per, images_per_prompt=per,
                           negative_prompt=negatives if isinstance(negatives, str) else negatives[i:i + batch_size],
                           **options) for i in range(0, len(prompts), batch_size)])


class TextToImage:
    """prompts -> images. `pipe = TextToImage.from_shipped(); images = pipe(["red heart"], seed=0)`."""

    def __init__(self, unet: UNet, schedule: NoiseSchedule, clip: MiniCLIP, tokenizer: Tokenizer, vae: VAE,
                 scale_factor: float, prediction: str = "epsilon", device: torch.device | str | None = None,
                 sampler_settings: SamplerSettings = TINY_SD_SAMPLER):
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
        self.scale_factor = float(scale_factor)
        self.prediction = prediction
        self.schedule = path_for(prediction, schedule)     # a rectified-flow model's: FlowSchedule
        self.sampler_settings = sampler_settings           # what a call samples with, unless told otherwise

    @classmethod
    def from_files(cls, unet_path: str | Path, clip_path: str | Path, vae_path: str | Path,
                   device: torch.device | str | None = None,
                   sampler_settings: SamplerSettings = TINY_SD_SAMPLER) -> "TextToImage":
        unet, schedule, info = load_model(unet_path)
        clip, tokenizer, _ = load_clip(clip_path)
        vae, scale_factor, _ = load_vae(vae_path)
        return cls(unet, schedule, clip, tokenizer, vae, scale_factor, info["prediction"],
                   device=device if device is not None else "cpu", sampler_settings=sampler_settings)

    @classmethod
    def from_shipped(cls, device: torch.device | str | None = None, model: str = "tiny_sd") -> "TextToImage":
        """A trained model of the course with the shipped clip_emoji and vae_emoji32: model "tiny_sd" (a U-Net,
        checkpoints/tiny_sd_emoji) or "tiny_sd3" (an MMDiT with rectified flow, checkpoints/tiny_sd3_emoji)."""
        name, settings = SHIPPED_MODELS[check_choice("shipped model", model, tuple(SHIPPED_MODELS))]
        return cls.from_files(ckpt.shipped(name), ckpt.shipped(SHIPPED["clip"]), ckpt.shipped(SHIPPED["vae"]),
                              device=device, sampler_settings=settings)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.config.latent_shape

    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text states (B, L, D), mask (B, L)) for the prompts, on the pipeline's device."""
        return encode_prompts(self.clip, self.tokenizer, prompt_list(prompts), device=self.device)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, seed: int = 0, steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | list[str] = "",
                 sampler: str | None = None, images_per_prompt: int = 1, return_latents: bool = False,
                 progress: bool = False, settings: SamplerSettings | None = None,
                 guidance_rescale: float | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] on the CPU, B = len(prompts) * images_per_prompt (see `text_to_image`).

        settings         the sampler settings (default self.sampler_settings: DDIM, 20 steps, guidance 4);
                         sampler, steps and guidance_scale, when given, replace its fields
        steps            sampler steps (model calls, twice the batch each with guidance), 1..T
        guidance_scale   0: ignore the prompt; 1: plain conditional model; > 1: follow the prompt harder
        guidance_rescale phi of rescaled guidance (Lin et al. 2024) in [0, 1]; 0: plain guidance
        negative_prompt  what to steer away from: one string, or one per prompt ("" = nothing)
        return_latents   the final latents (scaled) instead of decoded images
        """
        settings = (settings or self.sampler_settings).replace(sampler=sampler, steps=steps,
                                                              guidance_scale=guidance_scale,
                                                              guidance_rescale=guidance_rescale)
        return text_to_image(self.unet, self.schedule, self.encode, self.decode, prompts, settings,
                             latent_shape=self.latent_shape, negative_prompt=negative_prompt, seed=seed,
                             images_per_prompt=images_per_prompt, prediction=self.prediction,
                             return_latents=return_latents, progress=progress, device=self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] on the CPU (course_lib.vae.decode_latents)."""
        return decode_latents(self.vae, latents, self.scale_factor, device=self.device)

    def generate(self, prompts: str | list[str], *, batch_size: int = 256, seed: int = 0, **options) -> torch.Tensor:
        """Images for a long prompt list, `batch_size` prompts per call, seeds as one call would give them
        (image k from seed + k); options as for a call (steps, guidance_scale, images_per_prompt, ...)."""
        return generate(self, prompts, batch_size=batch_size, seed=seed, **options)


__all__ = ["SamplerSettings", "TINY_SD_SAMPLER", "TINY_SD3_SAMPLER", "SHIPPED", "SHIPPED_MODELS", "FLOW", "check_seed", "prompt_list", "start_latents", "guided", "text_to_image", "generate",
           "TextToImage"]
