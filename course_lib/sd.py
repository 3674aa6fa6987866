r"""Stable Diffusion 1.5, built from the course's own modules, with its published weights loaded into them.

Nothing new is invented here. SD 1.5 is the tiny text-to-image model of notebooks 06-09 at full size:

    part             course_lib module         SD 1.5's size                          tiny preset (tests, quick mode)
    U-Net            unet.UNet                 channels (320, 640, 1280, 1280), 860M   channels (32, 64), 1.1M
    VAE              vae.VAE                   512 px -> 4 x 64 x 64 (f = 8), 84M     64 px -> 4 x 8 x 8
    text encoder     text.TextEncoder          CLIP ViT-L/14's, 12 layers x 768, 123M  2 layers x 32
    tokenizer        clip_tokenizer            CLIP's byte-level BPE, 49,408 tokens    the 256 bytes, no merges
    noise schedule   schedules                 scaled_linear, 0.00085 -> 0.012, T = 1000
    sampler          sampling                  DDIM, "leading" timesteps + 1, guidance 7.5

Three settings make the course's U-Net SD's (see course_lib.unet): a fixed 8 heads per attention layer,
additive time conditioning, and SD's skip layout (conv_in's output and every downsampled map are skips too,
so each level going up has 3 ResBlocks). The VAE needs GroupNorm's epsilon at 1e-6 and SD's asymmetric
padding before each stride-2 conv; the text encoder is causal with OpenAI's quick GELU.

Weights. SD 1.5's published files name their tensors after the code that trained them; course_lib.sd_convert
renames them into these modules (from the diffusers folder layout or the original single file), accounting for
every tensor. This module holds the presets, the model with its pipeline, and LoRA fine-tuning.

Sampling. SD 1.5's scheduler settings, with DDIM in the place of the PNDM its config names, are the preset
SD15_SAMPLER (course_lib.sampling.SamplerSettings), and a StableDiffusion generates through the same function as
the course's tiny SD (course_lib.pipeline.text_to_image): prompt checks, seeds (image k from seed + k), guidance
and decoding are written once. Its latents are scaled by SD_LATENT_SCALE, 1 / std of SD's VAE's latents (the
course's VAE has its own, measured in notebook 06).

8 GB. A 512 x 512 image is a 64 x 64 latent, 4,096 tokens in the first attention layers. What keeps SD 1.5 in
8 GB: float16 weights (1.7 GB for the U-Net instead of 3.4), attention through scaled_dot_product_attention
(flash / memory-efficient kernels never store the 4,096 x 4,096 score matrix), decoding one image at a time
(VAE slicing), and for training gradient checkpointing plus LoRA, so there are gradients and Adam moments only
for the adapters. Where a GPU has only the plain attention kernel (a T4 for some shapes), attention in slices
(course_lib.attention.sliced_attention; a call's `attention_slice`) holds a few heads' scores at a time, and
`decode(..., tile=...)` decodes a large latent in overlapping tiles (course_lib.tiling). scripts/measure_sd15_memory.py measures the peaks. LoRA trains through the course's one loop
(`LoRAFineTune`, a course_lib.loop.Fit): fp16 with a GradScaler on a GPU, checkpoints and exact resume.

References: Rombach et al. 2022, https://arxiv.org/abs/2112.10752 (the model); Song et al. 2021,
https://arxiv.org/abs/2010.02502 (DDIM); Ho & Salimans 2022, https://arxiv.org/abs/2207.12598 (guidance).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .attention import sliced_attention
from .checks import check_choice, check_int
from .config import JSONConfig
from .clip_tokenizer import CLIPTokenizer, bytes_to_unicode
from .finetune import FineTune, draw
from .forward import diffusion_loss
from .lora import inject_lora, lora_layers, lora_parameters
from .loop import FitConfig
from .pipeline import SamplerSettings, generate, prompt_list, text_to_image
from .precision import gpu_autocast
from .schedules import NoiseSchedule, scaled_linear_schedule
from .sd_convert import (load_diffusers_folder, load_network, load_original_file, text_config_from_transformers,
                         unet_config_from_diffusers, vae_config_from_diffusers)
from .text import TextEncoder, TextEncoderConfig
from .tiling import decode_tiled
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

SD_LATENT_SCALE = 0.18215      # SD 1.x's VAE: 1 / std of its latents ([Rombach et al.] appendix D.1)

# SD 1.5's scheduler config (scheduler/scheduler_config.json) names PNDM; we keep its settings and sample with DDIM:
# "leading" timesteps with steps_offset 1, set_alpha_to_one False (the last step lands on abar_0), and the
# pipeline's default 50 steps at guidance 7.5.
SD15_SAMPLER = SamplerSettings(sampler="ddim", steps=50, guidance_scale=7.5, spacing="leading", offset=1, final_t=0)


# --- Configs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SDConfig(JSONConfig):
    """The three networks of a Stable Diffusion and the number its latents are multiplied by."""
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    scale_factor: float = SD_LATENT_SCALE    # 1 / std of the VAE's latents ([Rombach et al.] appendix D.1)

    def __post_init__(self):
        if self.unet.context_dim != self.text.width:
            raise ValueError(f"the U-Net cross-attends to {self.unet.context_dim}-d states but the text encoder "
                             f"gives {self.text.width}-d ones")
        if self.unet.in_channels != self.vae.latent_channels:
            raise ValueError(f"the U-Net takes {self.unet.in_channels} channels; the VAE's latents have "
                             f"{self.vae.latent_channels}")



SD15 = SDConfig(
    unet=UNetConfig(image_size=64, in_channels=4, out_channels=4, channels=(320, 640, 1280, 1280),
                    blocks_per_level=2, attention=(True, True, True, False), num_heads=8, norm_groups=32,
                    time_conditioning="add", context_dim=768, sd_skips=True),
    vae=VAEConfig(image_size=512, channels=(128, 256, 512, 512), blocks_per_level=2, latent_channels=4,
                  norm_groups=32, norm_eps=1e-6, asymmetric_padding=True),
    text=TextEncoderConfig(vocab_size=49408, max_length=77, width=768, layers=12, heads=12, mlp_ratio=4,
                           causal=True, activation="quick_gelu"),
)

# The same shapes of network, small enough for a CPU: quick mode and the tests. vocab_size 514 is the byte-level
# tokenizer of `tiny_tokenizer` (256 bytes, each also with </w>, and the two special tokens).
TINY = SDConfig(
    unet=UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=(32, 64), blocks_per_level=2,
                    attention=(True, False), num_heads=2, norm_groups=8, time_conditioning="add",
                    context_dim=32, sd_skips=True),
    vae=VAEConfig(image_size=64, channels=(16, 32, 32, 32), blocks_per_level=1, latent_channels=4,
                  norm_groups=8, norm_eps=1e-6, asymmetric_padding=True),
    text=TextEncoderConfig(vocab_size=514, max_length=77, width=32, layers=2, heads=4, mlp_ratio=4,
                           causal=True, activation="quick_gelu"),
)

PRESETS: dict[str, SDConfig] = {"sd15": SD15, "tiny": TINY}


def sd_preset(name: str) -> SDConfig:
    """The SDConfig of a preset name (PRESETS: "sd15" or "tiny")."""
    check_choice("Stable Diffusion preset", name, tuple(PRESETS))
    return PRESETS[name]


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token (with </w> at a word's end). It needs no files,
    so the tiny random model can read prompts; its 514 ids match TINY.text.vocab_size."""
    chars = list(bytes_to_unicode().values())
    pieces = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({p: i for i, p in enumerate(pieces)}, [], max_length=max_length)


# --- The pipeline ------------------------------------------------------------------------------------------

class _Cast(nn.Module):
    """A U-Net whose inputs are cast to its weights' dtype and whose output comes back in float32, so the
    sampler (and the loss) keep latents in float32 while a float16 U-Net does the work."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, mask=None):
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(x.to(dtype), t, None if context is None else context.to(dtype), mask).float()


class StableDiffusion:
    """Text to image with SD 1.5's parts in course_lib's modules.

    sd = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")     # a diffusers folder, or
    sd = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors", tokenizer="path/to/tokenizer")
    images = sd("a watercolour fox", seed=0)                                  # (1, 3, 512, 512) in [-1, 1]
    sd = StableDiffusion.random("tiny")                                       # no files: quick mode, tests
    """

    def __init__(self, unet: UNet, vae: VAE, text_encoder: TextEncoder, tokenizer: CLIPTokenizer,
                 scale_factor: float = SD_LATENT_SCALE, schedule: NoiseSchedule | None = None,
                 sampler_settings: SamplerSettings = SD15_SAMPLER):
        if unet.config.context_dim != text_encoder.config.width:
            raise ValueError(f"the U-Net attends to {unet.config.context_dim}-d states; the text encoder gives "
                             f"{text_encoder.config.width}-d ones")
        if tokenizer.vocab_size > text_encoder.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens; the text encoder embeds only "
                             f"{text_encoder.config.vocab_size}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet.eval(), vae.eval(), text_encoder.eval(), tokenizer
        self.scale_factor = float(scale_factor)
        self.schedule = schedule or scaled_linear_schedule(1000, 0.00085, 0.012)
        self.sampler_settings = sampler_settings         # what a call samples with, unless told otherwise

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def factor(self) -> int:
        return self.vae.config.factor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))}

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, preset: str | SDConfig = "tiny", seed: int = 0, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, tokenizer: CLIPTokenizer | None = None) -> "StableDiffusion":
        """Random weights in SD's shapes: for quick mode and tests (tiny), or to measure memory (sd15; the
        memory a network needs does not depend on the values of its weights). Without `tokenizer` it gets the
        byte-level `tiny_tokenizer` (its ids fit both presets' vocabularies; pass CLIP's to read prompts as SD does)."""
        cfg = sd_preset(preset) if isinstance(preset, str) else preset
        if tokenizer is None:
            tokenizer = tiny_tokenizer(cfg.text.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                unet, vae, text = UNet(cfg.unet), VAE(cfg.vae), TextEncoder(cfg.text)
            # proj_out starts at zero in a new SpatialTransformer; random weights there make cross-attention
            # (and so the prompt) matter in the random model, as it does in a trained one
            for m in unet.modules():
                if hasattr(m, "proj_out") and isinstance(m.proj_out, nn.Conv2d):
                    nn.init.normal_(m.proj_out.weight, std=0.02)
        return cls(unet.to(dtype), vae.to(dtype), text.to(dtype), tokenizer, cfg.scale_factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | CLIPTokenizer | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        config: SDConfig = SD15) -> "StableDiffusion":
        """Load SD 1.x weights from a local path into course_lib's modules (through course_lib.sd_convert).

        path  a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/), or one original
              checkpoint file (.safetensors; .ckpt through torch.load(weights_only=True)), which holds no tokenizer:
              pass tokenizer= a folder with CLIP's vocab.json and merges.txt (e.g. a diffusers download's tokenizer/).
        config  the networks' sizes of an original file (a diffusers folder has its own config.json files).
        The networks are built on the meta device (no memory), then filled in `dtype` on `device`."""
        path = Path(path)
        if path.is_dir():
            unet, vae, text, scaling = load_diffusers_folder(path, device, dtype)
            if not isinstance(tokenizer, CLIPTokenizer):
                tokenizer = CLIPTokenizer.from_directory(path if tokenizer is None else tokenizer)
            return cls(unet, vae, text, tokenizer, SD_LATENT_SCALE if scaling is None else scaling)
        if not path.exists():
            raise FileNotFoundError(f"no Stable Diffusion weights at {path}: give a diffusers folder (with unet/, "
                                    f"vae/, text_encoder/, tokenizer/) or an original single-file checkpoint")
        if tokenizer is None:
            raise ValueError("an original single-file checkpoint holds no tokenizer: pass tokenizer= a folder with "
                             "CLIP's vocab.json and merges.txt (for example the tokenizer/ folder of a diffusers "
                             "download of SD 1.5)")
        tok = tokenizer if isinstance(tokenizer, CLIPTokenizer) else CLIPTokenizer.from_directory(tokenizer)
        networks = load_original_file(path, config.unet, config.vae, config.text, device, dtype)
        return cls(*networks, tok, config.scale_factor)

    @classmethod
    def from_diffusers_modules(cls, unet, vae, text_encoder, tokenizer: CLIPTokenizer) -> "StableDiffusion":
        """From diffusers' / transformers' model objects in memory (UNet2DConditionModel, AutoencoderKL,
        CLIPTextModel): their configs and state dicts, converted. Used by the parity tests."""
        dtype = next(unet.parameters()).dtype
        return cls(load_network(UNet, unet_config_from_diffusers(dict(unet.config)), unet.state_dict(),
                                "diffusers", "", "cpu", dtype),
                   load_network(VAE, vae_config_from_diffusers(dict(vae.config)), vae.state_dict(),
                                "diffusers", "", "cpu", dtype),
                   load_network(TextEncoder, text_config_from_transformers(text_encoder.config.to_dict()),
                                text_encoder.state_dict(), "diffusers", "", "cpu", dtype),
                   tokenizer, vae.config.get("scaling_factor", SD_LATENT_SCALE))

    # --- using ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """The text encoder's states (B, 77, width) for the prompts: every position, padding included, as SD
        uses them (no mask)."""
        ids, _ = self.tokenizer(prompt_list(prompts))
        return self.text_encoder(ids.to(self.device), None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, slicing: bool = True, tile: int | None = None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32, on the CPU). slicing: one image at a time (the decoder's
        activations at full resolution are the largest tensors of generation). tile: decode each image in
        overlapping tiles of tile x tile latent pixels (`decode_tiled`)."""
        dtype = self.vae.post_quant_conv.weight.dtype
        z = latents.to(self.device, dtype) / self.scale_factor
        parts = z.split(1) if slicing else (z,)
        run = self.vae.decode if tile is None else lambda p: decode_tiled(self.vae.decode, p, tile)   # course_lib.tiling
        return torch.cat([run(p).float().clamp(-1, 1).cpu() for p in parts])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior means times scale_factor), one image at a time."""
        dtype = self.vae.post_quant_conv.weight.dtype
        return torch.cat([self.vae.encode(x.to(self.device, dtype)).mean.float() * self.scale_factor
                          for x in images.split(1)])

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, negative_prompt: str | list[str] = "", steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, sampler: str | None = None,
                 return_latents: bool = False, vae_slicing: bool = True, progress: bool = False,
                 images_per_prompt: int = 1, settings: SamplerSettings | None = None,
                 attention_slice: int | None = None, vae_tile: int | None = None) -> torch.Tensor:
        """Images (B, 3, height, width) in [-1, 1] on the CPU, images_per_prompt per prompt, through the course's
        one generation path (course_lib.pipeline.text_to_image).

        Sampling follows SD 1.5's published scheduler (self.sampler_settings, SD15_SAMPLER: DDIM, 50 steps,
        guidance 7.5, timesteps "leading" + 1: 981, 961, ..., 1, the last step landing on abar_0); sampler, steps
        and guidance_scale, when given, replace its fields. Image k starts from the noise of seed + k (drawn on
        the CPU, so a seed gives the same image on any device) unless `latents` are given. attention_slice: (image,
        head) pairs attended at a time (course_lib.attention.sliced_attention); vae_tile: decode in tiles of that
        many latent pixels a side (course_lib.tiling). Both save memory only; slicing changes no number."""
        size = self.vae.config.image_size
        height, width = height or size, width or size
        f = self.factor * 2 ** (self.unet.config.levels - 1)
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < f or v % f:
                raise ValueError(f"{name} must be a multiple of {f} (the VAE's factor {self.factor} times the "
                                 f"U-Net's {f // self.factor}); got {v!r}")
        settings = (settings or self.sampler_settings).replace(sampler=sampler, steps=steps,
                                                              guidance_scale=guidance_scale)
        latent_shape = (self.unet.config.in_channels, height // self.factor, width // self.factor)
        with sliced_attention(attention_slice):
            return text_to_image(_Cast(self.unet), self.schedule, lambda p: (self.encode(p), None),
                                 lambda z: self.decode(z, slicing=vae_slicing, tile=vae_tile), prompts, settings,
                                 latent_shape=latent_shape, negative_prompt=negative_prompt, seed=seed,
                                 images_per_prompt=images_per_prompt, latents=latents,
                                 return_latents=return_latents, progress=progress, device=self.device)

    def generate(self, prompts: str | list[str], *, batch_size: int = 4, seed: int = 0, **options) -> torch.Tensor:
        """Images for a long prompt list, `batch_size` prompts per call, seeds as one call would give them
        (course_lib.pipeline.generate); options as for a call."""
        return generate(self, prompts, batch_size=batch_size, seed=seed, **options)

    # --- fine-tuning -------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, gradient_checkpointing: bool = True) -> list:
        """LoRA adapters on the U-Net's attention projections (to_q, to_k, to_v, to_out), kept in float32 while
        the frozen base stays in its dtype; returns the trainable parameters (the existing ones if the U-Net
        already has adapters). Gradient checkpointing recomputes
        each Block's activations in the backward pass instead of storing them."""
        if not lora_layers(self.unet):                    # called again: keep training the adapters it has
            self.unet.requires_grad_(False)
            inject_lora(self.unet, rank=rank, alpha=alpha)
        params = lora_parameters(self.unet)
        for p in params:
            p.data = p.data.float()
        if gradient_checkpointing:
            self.unet.config = self.unet.config.replace(gradient_checkpointing=True)
        return params

    def lora_loss(self, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The denoising loss (course_lib.forward.diffusion_loss with epsilon prediction, SD's objective; t, then
        noise, from `generator`) on scaled latents with text states, under float16 autocast on a GPU (the frozen
        base in float16, the adapters' master weights in float32; a bfloat16 U-Net, trained in pure bf16, runs
        in its own dtype)."""
        self.unet.train()
        with gpu_autocast(self.device, torch.float16, enabled=self.unet.conv_in.weight.dtype != torch.bfloat16):
            terms = diffusion_loss(_Cast(self.unet), self.schedule, latents.to(self.device).float(),
                                   prediction="epsilon", generator=generator, cond=(context,))
        self.unet.eval()
        return terms.loss


@dataclass
class LoRARun:
    """What `fine_tune_lora` did: the loss at every step, the seconds spent in steps, the trainable count."""
    losses: list[float]
    seconds: float
    trainable: int


class LoRAFineTune(FineTune):
    """SD's LoRA fine-tuning as the one loop (course_lib.loop.Fit, through course_lib.finetune.FineTune) sees it:
    the images are encoded once (posterior means) and the captions once, so a step is one U-Net forward and
    backward of `lora_loss` on `batch_size` images drawn with repeats. AdamW over the adapters, no clipping, a
    constant rate. Precision "fp16" on a GPU with a float16 base (the loop's GradScaler, so that small float16
    gradients do not underflow to zero; the adapters' weights and Adam moments stay float32), else "fp32"."""

    def __init__(self, model: StableDiffusion, images: torch.Tensor, captions: list[str], *, steps: int,
                 rank: int = 4, lr: float = 1e-4, batch_size: int = 1, seed: int = 0,
                 gradient_checkpointing: bool = True):
        if len(images) != len(captions):
            raise ValueError(f"one caption per image: got {len(images)} images and {len(captions)} captions")
        check_int("steps", steps, 1)
        check_int("batch_size", batch_size, 1)
        size = model.vae.config.factor * 2 ** (model.unet.config.levels - 1)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % size or images.shape[3] % size:
            raise ValueError(f"images must be (N, 3, H, W) with H and W multiples of {size}; got {tuple(images.shape)}")
        self.sd, self.batch_size, self.rank = model, int(batch_size), rank
        self.latents = model.encode_images(images)          # (N, 4, H/8, W/8) scaled, float32 on the CPU
        self.context = model.encode(captions).float()       # (N, 77, width) on the model's device
        params = model.add_lora(rank=rank, gradient_checkpointing=gradient_checkpointing)
        precision = "fp16" if model.device.type == "cuda" and model.dtype == torch.float16 else "fp32"
        config = FitConfig(steps=int(steps), lr=lr, grad_clip=None, precision=precision)
        super().__init__(config, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), model.device, seed,
                         module=model.unet)

    def loss(self) -> torch.Tensor:
        index = draw(len(self.latents), self.batch_size, self.generator)
        return self.sd.lora_loss(self.latents[index].to(self.device), self.context[index], self.generator)

    def fixed_tensors(self) -> list[torch.Tensor]:
        trained = {id(p) for p in self.params}
        frozen = [p for p in self.sd.unet.parameters() if id(p) not in trained]
        return [self.latents, self.context, *frozen]

    def run_info(self) -> dict:
        return {**super().run_info(), "rank": self.rank, "batch_size": self.batch_size,
                "n_images": len(self.latents), "precision": self.fit_config.precision}


def fine_tune_lora(model: StableDiffusion, images: torch.Tensor, captions: list[str], *, steps: int,
                   rank: int = 4, lr: float = 1e-4, batch_size: int = 1, seed: int = 0,
                   gradient_checkpointing: bool = True, progress: bool = True,
                   checkpoint_path: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
                   max_seconds: float | None = None) -> LoRARun:
    """LoRA on SD's attention projections from (images in [-1, 1], captions): SD's fine-tuning recipe at its
    smallest (`LoRAFineTune`, trained by the course's one loop). With `checkpoint_path`, the adapters, Adam's
    moments and the generator are written atomically every `checkpoint_every` steps and at the end; if the file
    exists and `resume`, training continues from it exactly (a different run is refused, naming what differs)."""
    run = LoRAFineTune(model, images, captions, steps=steps, rank=rank, lr=lr, batch_size=batch_size, seed=seed,
                       gradient_checkpointing=gradient_checkpointing)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
            max_seconds=max_seconds, progress=progress, desc="LoRA")
    return LoRARun(list(run.history["loss"]), run.seconds, sum(p.numel() for p in run.params))


__all__ = ["SD_LATENT_SCALE", "SDConfig", "SD15", "TINY", "PRESETS", "sd_preset", "SD15_SAMPLER", "tiny_tokenizer",
           "StableDiffusion", "LoRARun", "LoRAFineTune", "fine_tune_lora"]
