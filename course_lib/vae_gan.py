r"""Sharp reconstructions: the VAE trained as Stable Diffusion's autoencoder is, with perceptual and adversarial terms.

Squared error alone blurs. Where the decoder is unsure whether an edge lies here or one pixel over, the average of
the two, a soft edge, has the lowest expected squared error. Stable Diffusion's autoencoder (Rombach et al. 2022
[1], appendix G, following Esser et al. 2021 [2], section 3.2) adds two terms that penalise blur itself:

    L_VAE = recon + w_kl * KL + w_p * perceptual(x, x_hat) + lambda * w_adv * L_G(x_hat)
    L_D   = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))                       the hinge loss [2]

perceptual   LPIPS [3]: run both images through a frozen network, unit-normalise every pixel's feature
             vector over channels, and average the squared differences, summed over layers. LPIPS uses
             ImageNet's VGG, which cannot be downloaded here; the course's frozen emoji classifier
             (course_lib.feature_net) stands in, with every layer weighted equally (LPIPS learns per-channel
             weights from human judgements; we have none). Features differ when edges and textures differ,
             however small their squared error.
D, L_G       a patch discriminator (pix2pix's PatchGAN [4]): a small CNN that scores every overlapping patch
             of an image as real (> 0) or reconstructed (< 0). The decoder is trained to make its patches
             score as real: L_G = -mean D(x_hat). A blurred patch is easy to tell from a real one, so blur
             costs the decoder even where its squared error is small.
lambda       the adaptive weight of [2] eq. 7: the ratio of the two terms' gradient norms at the decoder's last
             layer, ||grad recon|| / (||grad L_G|| + 1e-4), clamped to [0, 1e4] and not differentiated, so the
             adversarial push is always of the reconstruction's size whatever the discriminator's scale.
             The adversarial term starts at step `adversarial_start` (the discriminator trains from step 0).

One backward pass updates both networks. The VAE's loss sees D through detached copies of D's weights
(`torch.func.functional_call`), and D's loss sees x_hat detached, so each network's gradient comes from its own
loss only; one AdamW with a parameter group per network then steps both (the one loop, course_lib.loop).

The judge beside these terms: the share of an image's spectral power above a quarter of the sampling frequency,
`high_frequency_share` in course_lib.metrics (reconstructions over originals: 1 is as sharp as the data).
The perceptual network is the same network that FID uses in this course, so a VAE trained with it is graded
partly in the space it was trained to match: judge its pictures by PSNR, the spectrum and the independent judge.
This module is given that network by its caller and never loads it (a method does not import a measure).

References:
    [1] Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models, arxiv.org/abs/2112.10752
    [2] Esser, Rombach, Ommer 2021, Taming Transformers for High-Resolution Image Synthesis, arxiv.org/abs/2012.09841
    [3] Zhang et al. 2018, The Unreasonable Effectiveness of Deep Features as a Perceptual Metric (LPIPS),
        arxiv.org/abs/1801.03924
    [4] Isola et al. 2017, Image-to-Image Translation with Conditional Adversarial Networks, arxiv.org/abs/1611.07004
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .checks import check_choice, check_int
from .loop import Batches, Fit, FitConfig, autocast, fingerprint
from .vae import PRECISIONS, VAE, device_of, vae_loss

ADAPTIVE_MAX = 1e4          # the clamp on lambda ([2]'s implementation)


def perceptual_distance(x: torch.Tensor, y: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """LPIPS-style distance per image (B,): for every stage of `net` (a frozen CNN with a `stages` list, e.g.
    course_lib.feature_net's; this module is given it and never loads it), unit-normalise each pixel's feature
    vector over channels, take the squared difference summed over channels, average over pixels; sum over
    stages. Images in [-1, 1]; 0 for identical images; gradients flow to both inputs, not to `net`."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"need two batches of images of one shape (B, 3, H, W); got {tuple(x.shape)}, {tuple(y.shape)}")
    total = x.new_zeros(x.shape[0])
    fx, fy = x.float(), y.float()
    for stage in net.stages:
        fx, fy = stage(fx), stage(fy)
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        total = total + (nx - ny).pow(2).sum(1).mean(dim=(1, 2))
    return total


class PatchDiscriminator(nn.Module):
    """Real-or-reconstructed scores for overlapping patches: 4x4 stride-2 convs with LeakyReLU(0.2), GroupNorm
    after the first, then a 3x3 conv to one logit per position. At 32 px with two downsamplings: an 8 x 8 map
    of logits, each seeing an 18 x 18 patch ([4]'s PatchGAN, shrunk to emoji)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, downsamplings: int = 2):
        super().__init__()
        if downsamplings < 1 or channels < 8:
            raise ValueError(f"need downsamplings >= 1 and channels >= 8; got {downsamplings}, {channels}")
        layers, c_in = [], in_channels
        for i in range(downsamplings):
            c_out = channels * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
            layers += [nn.GroupNorm(8, c_out)] if i > 0 else []
            layers += [nn.LeakyReLU(0.2)]
            c_in = c_out
        layers += [nn.Conv2d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss [2]: 0 once every real patch scores >= 1 and every fake one <= -1."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """[2] eq. 7: ||d nll / d last|| / (||d g_loss / d last|| + 1e-4), clamped to [0, ADAPTIVE_MAX], detached."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, ADAPTIVE_MAX).detach()


class VAEGANFit(Fit):
    """The VAE and its discriminator in the one loop (see the module docstring for the losses)."""

    def __init__(self, vae: VAE, images: torch.Tensor, *, steps: int, batch_size: int, lr: float, d_lr: float,
                 kl_weight: float, perceptual_weight: float, adversarial_weight: float, adversarial_start: int,
                 disc_channels: int, device: torch.device, precision: str, seed: int, net: nn.Module,
                 warmup: int = 0):
        self.vae, self.images, self.precision = vae, images, precision
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.adversarial_weight, self.adversarial_start = adversarial_weight, adversarial_start
        torch.manual_seed(seed)                                         # the discriminator's initial weights
        self.disc = PatchDiscriminator(vae.config.in_channels, disc_channels).to(device).train()
        self.net = net.to(device).eval().requires_grad_(False)
        groups = [{"params": list(vae.parameters()), "lr": lr}, {"params": list(self.disc.parameters()), "lr": d_lr}]
        super().__init__(FitConfig(steps=steps, lr=lr, warmup=warmup, grad_clip=None, precision=precision),
                         torch.optim.AdamW(groups, betas=(0.5, 0.9), weight_decay=0.0), device, seed=seed,
                         batches=Batches(images.shape[0], batch_size, torch.Generator()))
        self.batches.generator = self.generator
        self.settings = {"config": json.loads(vae.config.to_json()), "lr": lr, "d_lr": d_lr, "batch_size": batch_size,
                         "kl_weight": kl_weight, "perceptual_weight": perceptual_weight,
                         "adversarial_weight": adversarial_weight, "adversarial_start": adversarial_start,
                         "disc_channels": disc_channels, "precision": precision, "seed": seed, "warmup": warmup,
                         "n_images": images.shape[0], "data": fingerprint(images)}

    def loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.images[self.batches.next()].to(self.device)
        with autocast(self.precision, self.device):
            recon, posterior = self.vae(x, generator=self.generator)
        recon = recon.float()
        base, parts = vae_loss(recon, x, posterior, self.kl_weight)
        perceptual = perceptual_distance(recon, x, self.net).mean()
        nll = F.mse_loss(recon, x) + self.perceptual_weight * perceptual
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        g_loss = -functional_call(self.disc, frozen, (recon,)).mean()    # gradients reach the VAE only
        total = base + self.perceptual_weight * perceptual
        lam = torch.zeros(())
        if self.adversarial_weight > 0 and self.step >= self.adversarial_start:
            lam = adaptive_weight(nll, g_loss, self.vae.decoder.conv_out.weight)
            total = total + lam * self.adversarial_weight * g_loss
        d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))  # gradients reach D only
        return total + d_loss, {"recon": parts["recon"], "kl": parts["kl"], "perceptual": perceptual.item(),
                                "g_adv": g_loss.item(), "lambda": lam.item(), "d_loss": d_loss.item()}

    def run_info(self) -> dict:
        return self.settings

    def report(self) -> dict:
        keys = ("loss", "recon", "kl", "perceptual", "g_adv", "lambda", "d_loss")
        return {**{k: self.history.get(k, []) for k in keys}, "seconds": self.seconds, "steps": self.step}


def fit_vae_gan(vae: VAE, images: torch.Tensor, *, perceptual_net: nn.Module, steps: int, batch_size: int = 64,
                lr: float = 1e-4, d_lr: float | None = None, kl_weight: float = 1e-4, perceptual_weight: float = 1.0,
                adversarial_weight: float = 0.5, adversarial_start: int = 0, disc_channels: int = 64,
                device: torch.device | str | None = None, precision: str = "fp32", seed: int = 0,
                checkpoint_path: str | Path | None = None, checkpoint_every: int = 500, resume: bool = True,
                progress: bool = True, max_seconds: float | None = None,
                callback: Callable[[dict], None] | None = None, callback_every: int = 50, warmup: int = 0) -> dict:
    """Train `vae` in place with the reconstruction, KL, perceptual and adversarial terms (module docstring)
    until `steps` steps in total (the rate warmed up over `warmup` steps). perceptual_net: the frozen network of the
    perceptual term (the course passes course_lib.feature_net.load_feature_net()). The discriminator is created
    here (seeded by `seed`) and saved in the checkpoint with the VAE, so an interrupted run resumes exactly.
    d_lr: the discriminator's rate (default lr). perceptual_weight=0 and adversarial_weight=0 train with squared
    error and KL alone (an ablation with the same loop). Returns the history VAEGANFit.report gives; the VAE is left
    in eval mode."""
    check_choice("precision", precision, PRECISIONS)
    for name, value in (("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight),
                        ("adversarial_weight", adversarial_weight)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 (0: the term is off); got {value!r}")
    adversarial_start = check_int("adversarial_start", adversarial_start, 0,
                                  hint=" (the step the adversarial term starts at)")
    shape = (vae.config.in_channels, vae.config.image_size, vae.config.image_size)
    if images.ndim != 4 or len(images) == 0 or images.shape[1:] != shape:
        raise ValueError(f"images must have shape (N >= 1, {', '.join(map(str, shape))}); got {tuple(images.shape)}")
    device = device_of(vae, device)
    run = VAEGANFit(vae, images, steps=steps, batch_size=batch_size, lr=lr, d_lr=lr if d_lr is None else d_lr,
                    kl_weight=kl_weight, perceptual_weight=perceptual_weight, adversarial_weight=adversarial_weight,
                    adversarial_start=adversarial_start, disc_channels=disc_channels, device=device,
                    precision=precision, seed=seed, net=perceptual_net, warmup=warmup)
    vae.requires_grad_(True)
    return run.train_module(vae, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
                            max_seconds=max_seconds, progress=progress, callback=callback,
                            callback_every=callback_every, desc="training VAE (perceptual + adversarial)")


__all__ = ["ADAPTIVE_MAX", "perceptual_distance", "PatchDiscriminator", "hinge_d_loss", "adaptive_weight",
           "VAEGANFit", "fit_vae_gan"]
