r"""A small KL autoencoder: the VAE that gives latent diffusion its latent space.

Latent diffusion (Rombach et al. 2022, [2]) runs the diffusion model on a compressed latent z instead
of on pixels. The compressor is a variational autoencoder (Kingma & Welling 2013, [1]):

    x (B, 3, H, W) --Encoder--> (mean, logvar) (B, 2C, H/f, W/f) --sample--> z --Decoder--> x_hat

Notation (the papers' symbols on the left, names in this file on the right):
    q_phi(z | x) = N(mu, diag sigma^2)      the encoder's posterior       DiagonalGaussian(mean, logvar)
    p(z)         = N(0, I)                  the prior
    p_theta(x|z) = N(x_hat, s^2 I)          the decoder (fixed s)         Decoder(z) -> x_hat
    f = 2 ** (levels - 1)                   downsampling factor           VAEConfig.factor

Training maximises the evidence lower bound, log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z)) ([1] eq. 3):
    1. reparameterise: z = mu + sigma * eps, eps ~ N(0, I), so gradients reach mu and sigma ([1] sec. 2.4)
    2. reconstruction: with a Gaussian decoder, -log p(x|z) is the squared error up to constants
    3. KL, in closed form for two Gaussians ([1] appendix B), per latent element:
           KL = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)
    4. loss = reconstruction + kl_weight * KL. A weight below the ELBO's (a beta-VAE, [3]) trades the prior
       match for sharp reconstructions; Stable Diffusion's is tiny, so its latent is almost a plain
       autoencoder's code and the KL only keeps its scale in check.

Scaling in `vae_loss` (our choice): both terms are means per element, recon = mean over pixel values of
(x_hat - x)^2 (so PSNR = 10 log10(4 / recon) in [-1, 1]: course_lib.metrics.psnr) and kl = the KL above in nats
per latent value. A weight w on sums per image (Stable Diffusion's convention) is w / compression on these means.
SD's autoencoder adds perceptual and adversarial terms (course_lib.vae_gan). Latents are multiplied by
`latent_scale_factor` = 1 / std(z), for unit variance (SD 1.x's 0.18215; [2] appendix D.1).
Blocks as SD's autoencoder: ResnetBlocks (no time input), stride-2 conv down, nearest x2 + conv up, ResnetBlock /
self-attention / ResnetBlock at the lowest resolution, 1x1 convs around the latent. `fit_vae` trains it with the
one loop (course_lib.loop.Fit; `VAEFit` is the VAE's part), all of it or the decoder alone (as SD's ft-MSE VAE).

[1] Kingma & Welling 2013, Auto-Encoding Variational Bayes, https://arxiv.org/abs/1312.6114
[2] Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models, arXiv:2112.10752
[3] Higgins et al. 2017, beta-VAE, https://openreview.net/forum?id=Sy2fzU9gl
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import JSONConfig
from . import checkpoint as ckpt
from .attention import SelfAttention
from .forward import check_images
from .checks import check_choice, check_int, number
from .loop import Batches, Fit, FitConfig, autocast, fingerprint
from .unet import Downsample, Upsample

PRECISIONS = ("fp32", "bf16")
# The weight on vae_loss's per-element means. Measured with VAEConfig() (8x8x4 latent, channels (64, 128, 128),
# 3.8M params) on 32 px train-split emoji for 110 s on one H100 (5-7k steps of 64, lr 2e-4), as held-out
# PSNR (decoding the posterior mean) / latent std / mean posterior std / KL per latent value:
#   1e-6: 26.1 dB / 2.9 / 0.008 / 9.5 nats   nearly a plain autoencoder (SD-like), KL still growing
#   1e-4: 26.3 dB / 1.4 / 0.026 / 4.5 nats   as sharp, latent near unit scale, tight posterior (the default)
#   1e-3: 26.3 dB / 1.0 / 0.25  / 2.0 nats   about the ELBO's own weight; decoding samples loses 0.2 dB
DEFAULT_KL_WEIGHT = 1e-4


@dataclass(frozen=True)
class VAEConfig(JSONConfig):
    """Everything that defines a VAE. The encoder halves the resolution between levels, so the latent is
    (latent_channels, image_size / factor, image_size / factor) with factor = 2 ** (levels - 1)."""
    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 128)   # feature channels at each resolution level
    blocks_per_level: int = 1                     # ResnetBlocks per level in the encoder (the decoder: one more)
    latent_channels: int = 4                      # C of the latent
    norm_groups: int = 8                          # GroupNorm groups (must divide every channel count)
    mid_attention: bool = True                    # self-attention in the middle, at the lowest resolution
    norm_eps: float = 1e-5                        # every GroupNorm's epsilon (SD's autoencoder: 1e-6)
    asymmetric_padding: bool = False              # downsample convs pad right/bottom only (SD's autoencoder)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("image_size", "in_channels", "latent_channels", "blocks_per_level", "norm_groups"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        if not self.channels or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"channels needs at least one positive int per level, e.g. (64, 128, 128); "
                             f"got {self.channels}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number (e.g. 1e-5, or SD's 1e-6); got {self.norm_eps!r}")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel count must be divisible by norm_groups={self.norm_groups}; "
                             f"got channels={self.channels}")
        self.check_size(self.image_size)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def compression(self) -> float:
        """Pixel values per latent value, e.g. 3*32*32 / (4*8*8) = 12 for "f4c4"."""
        return self.in_channels * self.image_size ** 2 / math.prod(self.latent_shape)

    def check_size(self, size: int, what: str = "image_size") -> None:
        if size < self.factor or size % self.factor:
            raise ValueError(f"{what} must be a multiple of {self.factor} (this VAE halves the resolution "
                             f"{len(self.channels) - 1} times); got {size}")


PRESETS: dict[str, VAEConfig] = {
    # quick mode and tests, seconds on a CPU: 32 px -> 16x16x4                            # 0.17M params
    "tiny": VAEConfig(channels=(16, 32), latent_channels=4),
    # mild compression (3x): 32 px -> 16x16x4, nearly lossless, little saving for diffusion  # 1.5M params
    "f2c4": VAEConfig(channels=(48, 96), latent_channels=4),
    # the one the course ships (12x): 32 px -> 8x8x4, like SD's 512 px -> 64x64x4 (48x)   # 2.1M params
    "f4c4": VAEConfig(channels=(48, 96, 96), latent_channels=4),
    # strong compression (24x): 32 px -> 4x4x8, cheap diffusion, visibly lossy             # 2.8M params
    "f8c8": VAEConfig(channels=(48, 96, 96, 96), latent_channels=8),
}


def vae_preset(name: str, **changes) -> VAEConfig:
    """A named VAE config, optionally with fields changed (e.g. vae_preset("f4c4", latent_channels=8))."""
    check_choice("VAE preset", name, tuple(PRESETS))
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


# --- The posterior, its KL term and the loss ------------------------------------------------------------

def _check_moments(mean: torch.Tensor, logvar: torch.Tensor) -> None:
    """Refuse a posterior whose mean and logvar differ in shape or have no batch axis."""
    if mean.shape != logvar.shape or mean.ndim < 2:
        raise ValueError(f"mean and logvar must have the same shape, (B, C, H, W) or (B, D): a batch axis, then "
                         f"the latent's; got mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)}")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""KL(N(mean, exp(logvar)) || N(0, I)) per image, summed over latent dims ([1] appendix B):
    1/2 \sum (mu^2 + sigma^2 - 1 - log sigma^2). mean and logvar (B, C, H, W) or (B, D); returns (B,)."""
    _check_moments(mean, logvar)
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag exp(logvar)), one Gaussian per latent value."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        _check_moments(mean, logvar)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)   # keeps exp() finite in float16/bfloat16 and float32
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation trick, [1] sec. 2.4); eps is drawn on the
        generator's device (CPU for a CPU generator) and then moved, so a seed gives the same eps anywhere."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per image, shape (B,)."""
        return kl_divergence(self.mean, self.logvar)


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior: DiagonalGaussian,
             kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """recon_mse + kl_weight * kl, both means per element (see the module docstring).

    recon: mean over all pixel values of (x_hat - x)^2; kl: posterior.kl() / latent values per image,
    averaged over the batch (nats per latent value). Returns (loss tensor, {"recon", "kl", "loss"} floats)."""
    rec = F.mse_loss(recon.float(), x.float())
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = rec + kl_weight * kl
    return loss, {"recon": number(rec), "kl": number(kl), "loss": number(loss)}


# --- The networks ----------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a residual path (a 1x1 conv where the channels change).

    The VAE's residual block (SD's autoencoder's ResnetBlock, diffusers' ResnetBlock2D without temb). It
    differs from the U-Net's course_lib.unet.ResBlock in having no time-embedding input (an autoencoder
    sees no timestep), no dropout, and a configurable GroupNorm epsilon."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 8, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def mid_block(channels: int, cfg: VAEConfig) -> nn.Sequential:
    """ResnetBlock, single-head self-attention over the h*w positions (if cfg.mid_attention), ResnetBlock."""
    attn = SelfAttention(channels, head_channels=channels, norm_groups=cfg.norm_groups, eps=cfg.norm_eps)
    return nn.Sequential(ResnetBlock(channels, channels, cfg.norm_groups, cfg.norm_eps),
                         attn if cfg.mid_attention else nn.Identity(),
                         ResnetBlock(channels, channels, cfg.norm_groups, cfg.norm_eps))


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f): mean and logvar stacked."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch[0]
        for level, c in enumerate(ch):
            blocks = [ResnetBlock(c_in if i == 0 else c, c, cfg.norm_groups, cfg.norm_eps)
                      for i in range(cfg.blocks_per_level)]
            if level < len(ch) - 1:
                blocks.append(Downsample(c, asymmetric=cfg.asymmetric_padding))
            self.down.append(nn.Sequential(*blocks))
            c_in = c
        self.mid = mid_block(ch[-1], cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)                      # ResnetBlocks, then halve the resolution (not at the last level)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x_hat (B, in_channels, h*f, w*f); the encoder's mirror image with
    one extra ResnetBlock per level (as Stable Diffusion's decoder)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = mid_block(ch[-1], cfg)
        self.up = nn.ModuleList()
        c_in = ch[-1]
        for level in reversed(range(len(ch))):
            c = ch[level]
            blocks = [ResnetBlock(c_in if i == 0 else c, c, cfg.norm_groups, cfg.norm_eps)
                      for i in range(cfg.blocks_per_level + 1)]
            if level > 0:
                blocks.append(Upsample(c))
            self.up.append(nn.Sequential(*blocks))
            c_in = c
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)                      # ResnetBlocks, then double the resolution (not at full size)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """`vae.encode(x)` -> DiagonalGaussian over latents; `vae.decode(z)` -> images; `vae(x)` -> both."""

    def __init__(self, config: VAEConfig | None = None, **changes):
        super().__init__()
        self.config = cfg = (config or VAEConfig()).replace(**changes)
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        cfg = self.config
        if not x.is_floating_point() or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be float images of shape (B, {cfg.in_channels}, H, W) in [-1, 1]; "
                             f"got {x.dtype} {tuple(x.shape)}")
        cfg.check_size(x.shape[2], "image height")
        cfg.check_size(x.shape[3], "image width")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)   # (B, C, h, w) each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        C = self.config.latent_channels
        if not z.is_floating_point() or z.ndim != 4 or z.shape[1] != C:
            raise ValueError(f"z must be float latents of shape (B, {C}, h, w); got {z.dtype} {tuple(z.shape)}. "
                             f"Scaled latents must be divided by the scale factor first (see decode_latents).")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); z is a sample of the posterior, or its mean if not sample_posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"{n / 1e6:.2f}M parameters, latent {self.config.latent_shape}, compression {self.config.compression:g}x"


# --- Using a trained VAE ----------------------------------------------------------------------------------

def device_of(vae: VAE, device: torch.device | str | None) -> torch.device:
    """The device to run on (default: where the VAE's weights are); moves the VAE there."""
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae.to(device)
    return device


@torch.no_grad()
def latent_scale_factor(vae: VAE, images: torch.Tensor, batch_size: int = 256,
                        generator: torch.Generator | None = None, device: torch.device | str | None = None) -> float:
    """1 / std of posterior samples z over `images`: scaled latents have unit std ([2] appendix D.1)."""
    device = device_of(vae, device)
    zs = [vae.encode(images[i:i + batch_size].to(device)).sample(generator).float().cpu()
          for i in range(0, images.shape[0], batch_size)]
    return 1.0 / torch.cat(zs).std().item()


@torch.no_grad()
def encode_latents(vae: VAE, images: torch.Tensor, scale_factor: float, batch_size: int = 256, sample: bool = False,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> scale_factor * z on the CPU; z is the posterior mean, or a sample if `sample`.
    Bad images (NaN, outside [-1, 1]) are refused before any is encoded, naming them: every fine-tuner starts here."""
    check_images(images, "images")
    device, pick = device_of(vae, device), (lambda q: q.sample(generator) if sample else q.mode())
    return torch.cat([(pick(vae.encode(images[i:i + batch_size].to(device))).float() * scale_factor).cpu()
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def decode_latents(vae: VAE, latents: torch.Tensor, scale_factor: float, batch_size: int = 256,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Scaled latents -> images clamped to [-1, 1] on the CPU (divides by scale_factor first)."""
    device = device_of(vae, device)
    out = [vae.decode(latents[i:i + batch_size].to(device) / scale_factor).float().clamp(-1, 1).cpu()
           for i in range(0, latents.shape[0], batch_size)]
    return torch.cat(out)


# --- Training ---------------------------------------------------------------------------------------------

VAE_PARTS = ("all", "decoder")     # what fit_vae trains


class VAEFit(Fit):
    """The VAE's part of the one loop: batches (without replacement), vae_loss on a posterior sample, what is trained,
    what a resume must share. The loop does the rest (AdamW, no clipping; warm up a trained VAE: it lost ~10 dB)."""

    def __init__(self, vae: VAE, images: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                 kl_weight: float, device: torch.device, precision: str, seed: int, warmup: int = 0,
                 part: str = "all", decay: str = "constant"):
        self.vae, self.images, self.kl_weight, self.precision = vae, images, kl_weight, precision
        self.part = check_choice("part", part, VAE_PARTS)   # "decoder": the encoder, so the latent space, frozen
        params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()] if part != "all" else vae.parameters()
        config = FitConfig(steps=steps, lr=lr, warmup=warmup, decay=decay, grad_clip=None, precision=precision)
        super().__init__(config, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), device, seed=seed,
                         batches=Batches(images.shape[0], batch_size, torch.Generator()))
        self.batches.generator = self.generator                # one generator: data order, then posterior noise
        self.settings = {"config": json.loads(vae.config.to_json()), "lr": lr, "batch_size": batch_size,
                         "kl_weight": kl_weight, "precision": precision, "seed": seed,
                         "n_images": images.shape[0], "data": fingerprint(images)}   # steps may grow: not here
        extra = {"warmup": warmup, "part": part != "all" and part, "decay": decay != "constant" and decay,
                 "frozen": part != "all" and fingerprint(*vae.encoder.parameters(), *vae.quant_conv.parameters())}
        self.settings.update({k: v for k, v in extra.items() if v})                # older runs' files still resume

    def loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.images[self.batches.next()].to(self.device)   # (B, C, H, W)
        with autocast(self.precision, self.device):
            with torch.set_grad_enabled(self.part == "all"):   # "decoder": as SD's ft-MSE, a frozen encoder's
                posterior = self.vae.encode(x)                   # posterior samples decoded (= self.vae(x))
            recon = self.vae.decode(posterior.sample(self.generator))
        loss, parts = vae_loss(recon, x, posterior, self.kl_weight)
        return loss, {"recon": parts["recon"], "kl": parts["kl"]}

    def run_info(self) -> dict:
        return self.settings

    def report(self) -> dict:
        """The history fit_vae returns: {"loss", "recon", "kl": per-step lists, "seconds", "steps"}."""
        return {**{k: self.history.get(k, []) for k in ("loss", "recon", "kl")}, "seconds": self.seconds,
                "steps": self.step}


def fit_vae(vae: VAE, images: torch.Tensor, *, steps: int, batch_size: int = 64, lr: float = 2e-4,
            kl_weight: float = DEFAULT_KL_WEIGHT, device: torch.device | str | None = None, precision: str = "fp32",
            seed: int = 0, checkpoint_path: str | Path | None = None, checkpoint_every: int = 500, resume: bool = True,
            progress: bool = True, max_seconds: float | None = None, callback: Callable[[dict], None] | None = None,
            callback_every: int = 50, warmup: int = 0, part: str = "all", decay: str = "constant") -> dict:
    """Train `vae` in place on `images` (N, C, H, W) in [-1, 1] until `steps` steps in total, with the one loop.

    AdamW on `vae_loss`, no clipping; data order and posterior noise from one generator seeded by `seed`.
    part="decoder" trains the decoder alone (the latents, and every model trained on them, stay valid); decay:
    "constant" or "cosine" after the warm-up.
    checkpoint_path: written every `checkpoint_every` steps and at the end; if it exists and `resume`,
    training continues from it exactly (another run's file is refused, naming what differs). Returns (and passes
    to `callback` every `callback_every` steps) the history VAEFit.report gives; the VAE is left in eval mode."""
    check_choice("precision", precision, PRECISIONS)
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0 (0: a plain autoencoder); got {kl_weight!r}")
    shape = (vae.config.in_channels, vae.config.image_size, vae.config.image_size)
    if images.ndim != 4 or len(images) == 0 or images.shape[1:] != shape:
        raise ValueError(f"images must have shape (N >= 1, {', '.join(map(str, shape))}); got {tuple(images.shape)}")
    run = VAEFit(vae, images, steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl_weight, precision=precision,
                 device=device_of(vae, device), seed=seed, warmup=warmup, part=part, decay=decay)  # before train()
    for module in (vae, vae.decoder, vae.post_quant_conv):
        module.requires_grad_(part == "all" or module is not vae)
    return run.train_module(vae, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
                            max_seconds=max_seconds, progress=progress, callback=callback,
                            callback_every=callback_every, desc="training VAE")


# --- Model files ----------------------------------------------------------------------------------------

def save_vae(path: str | Path, vae: VAE, scale_factor: float, info: dict | None = None) -> Path:
    """Write a compact model file: float16 weights, config, latent scale factor and an info dict."""
    tensors = ckpt.compact_state(vae, "model.")
    metadata = {"format": "course_lib.vae/1", "vae_config": vae.config.to_json(),
                "scale_factor": repr(float(scale_factor)), "info": json.dumps(info or {})}
    return ckpt.atomic_save(tensors, path, metadata)


def load_vae(path: str | Path, device: torch.device | str | None = None) -> tuple[VAE, float, dict]:
    """(VAE in float32 eval mode with requires_grad off, latent scale factor, info dict with the chain's totals)."""
    tensors, metadata = ckpt.read_format(path, "course_lib.vae/1", "VAE")
    vae = VAE(VAEConfig.from_json(metadata["vae_config"]))
    vae.load_state_dict({k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")})
    vae.eval().requires_grad_(False).to(device)   # device None: stays on the CPU
    return vae, float(metadata["scale_factor"]), ckpt.with_chain_totals(json.loads(metadata.get("info", "{}")))


__all__ = ["VAEConfig", "PRESETS", "vae_preset", "kl_divergence", "DiagonalGaussian", "ResnetBlock", "mid_block",
           "Encoder", "Decoder", "VAE", "vae_loss", "latent_scale_factor", "encode_latents", "decode_latents",
           "VAE_PARTS", "VAEFit", "fit_vae", "device_of", "save_vae", "load_vae"]
