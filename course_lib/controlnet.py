r"""ControlNet (Zhang et al. 2023): steering the frozen tiny SD with a picture (edges, a silhouette, a colour layout).

A ControlNet is a trainable copy of the U-Net's encoder (course_lib.unet.UNetEncoder: conv_in, the way down, the
middle) that also sees a control image. Each of its skips and its middle output pass through a zero convolution
(1x1, weights and bias zero) and are added, times `conditioning_scale`, to the frozen U-Net's skips and middle:

    control (B, 3, f h, f w) --HintEncoder (f = 2^(levels - 1) smaller)--> e (B, C0, h, w), last conv zero
    z_t --conv_in--> + e --> [copied down Blocks, Downsamples] --> mid1, mid2          (trainable copy)
                               | every skip s_i            | middle m
                          zero conv Z_i (1x1)          zero conv Z_mid (1x1)
                               v                           v
    frozen U-Net:  skip_i + scale Z_i(s_i),    middle + scale Z_mid(m)       (course_lib.unet.UNet.forward)

Notation ([1], Sec. 3.1): y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2), where F(.; Theta) is
the locked block, F(.; Theta_c) its trainable copy and Z the zero convolutions. Zero convolutions make a new
ControlNet exactly the base model (every Z outputs 0), yet their weights' gradients are not zero (dZ/dW is Z's
input), so training moves them off zero at once, and no random noise reaches the locked model at the start. The
hint encoder maps the control image to the latents' size: the paper ([1], Sec. 3.2) describes four 4x4 stride-2
convs (16, 32, 64, 128 channels, ReLU); its released code, and diffusers' ControlNetModel, use 3x3 convs with SiLU
(16, 32, 96, 256 channels, three of them stride 2, 512 px to 64 x 64) and a zero conv out. We follow the code, with
as many stride-2 convs as the VAE halves the resolution (the tiny SD: 32 px to 8 x 8, two; SD 1.5: three).

`ControlledUNet` binds a ControlNet, a control image and a scale to the frozen U-Net and is called as any denoiser,
model(z_t, t, context, context_mask), so the one sampling path, classifier-free guidance (whose doubled batch
gets the control image twice) and the pipeline work unchanged (`with_control`). Training (`fit_controlnet`) is a
course_lib.finetune.CaptionedFineTune on (latent, caption, control) triples with only the ControlNet's parameters
trained and caption dropout ([1] drops half the prompts, so the ControlNet learns to read the control alone).
The control images themselves are made by course_lib.controls.

References:
  [1] Zhang, Rao, Agrawala. Adding Conditional Control to Text-to-Image Diffusion Models. 2023.
      https://arxiv.org/abs/2302.05543
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_int
from .finetune import CaptionedFineTune, FineTuneLog
from .unet import UNet, UNetConfig, UNetEncoder
from .vae import encode_latents

if TYPE_CHECKING:
    from .pipeline import TextToImage

HINT_CHANNELS = (16, 32, 96, 256)     # ControlNet's conditioning embedding: 3 stride-2 convs, 512 px -> 64 x 64
CONTROL_CHANNELS = 3                  # a control image is an RGB picture in [-1, 1]


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias zero ([1], Sec. 3): outputs 0 until training moves it."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """Control image (B, 3, f h, f w) -> features (B, out_channels, h, w): a 3x3 conv, then per level a 3x3 conv and a
    stride-2 3x3 conv, each followed by SiLU, and a zero-initialised 3x3 conv out; f = 2^(len(channels) - 1)."""

    def __init__(self, out_channels: int, channels: tuple[int, ...] = HINT_CHANNELS[:3],
                 in_channels: int = CONTROL_CHANNELS):
        super().__init__()
        self.channels = tuple(check_int("hint channels", c, 1) for c in channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def factor(self) -> int:
        """How many pixels of the control image make one latent pixel, per side."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def check_scale(scale: float) -> float:
    """conditioning_scale as a float if it is a finite number (0: the base model, 1: as trained); else refused."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"conditioning_scale must be a finite number (0: the base model, 1: the ControlNet as "
                         f"trained, between or above: weaker or stronger control); got {scale!r}")
    return float(scale)


class ControlNet(UNetEncoder):
    """A trainable copy of a U-Net's encoder that reads a control image; `model(x_t, t, context, mask, control,
    scale)` returns (skip_residuals, mid_residual) for course_lib.unet.UNet.forward. Build one with `from_unet`."""

    kind = "ControlNet"

    def __init__(self, config: UNetConfig, factor: int = 4):
        super().__init__(config)
        if factor not in (1, 2, 4, 8):
            raise ValueError(f"factor is how much smaller the latents are than the control image, per side: one of "
                             f"1, 2, 4, 8 (the tiny SD: 32 px to 8 x 8 latents, 4; SD 1.5: 8); got {factor!r}")
        self.hint = HintEncoder(config.channels[0], HINT_CHANNELS[:int(math.log2(factor)) + 1])
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in self.skip_channels)     # one per skip of the U
        self.mid_zero_conv = zero_conv(config.channels[-1])

    @classmethod
    def from_unet(cls, unet: UNet, factor: int = 4, seed: int | None = 0) -> "ControlNet":
        """A ControlNet whose encoder starts as `unet`'s (time embedding, conv_in, down path, middle copied), its
        hint encoder's last conv and every zero conv at zero: at first the controlled model is `unet` exactly.
        seed: the hint encoder's random initialisation (None: the global random state)."""
        if not isinstance(unet, UNet):
            raise TypeError(f"a ControlNet copies a U-Net's encoder (course_lib.unet.UNet); got a "
                            f"{type(unet).__name__}, which has none. SD 3's ControlNet copies some of the "
                            f"transformer's blocks instead; the course does not build that one")
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            net = cls(unet.config, factor)
        net = net.to(device=unet.conv_in.weight.device, dtype=unet.conv_in.weight.dtype)
        theirs = unet.state_dict()
        own = ("hint.", "zero_convs.", "mid_zero_conv.")                  # the ControlNet's own, new parts
        net.load_state_dict({k: theirs[k] for k in net.state_dict() if not k.startswith(own)}, strict=False)
        return net

    def check_control(self, x: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        """control (1 or a divisor of B, 3, f H, f W) for x (B, C, H, W), finite, repeated to batch B."""
        B, _, H, W = x.shape                              # batch, latent channels, latent height and width
        f = self.hint.factor
        want = (CONTROL_CHANNELS, f * H, f * W)
        if not isinstance(control, torch.Tensor) or control.ndim != 4 or tuple(control.shape[1:]) != want:
            got = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
            raise ValueError(f"the control image must have shape (B, {want[0]}, {want[1]}, {want[2]}): RGB in [-1, 1] "
                             f"at the image's resolution, {f}x the {H}x{W} latents (course_lib.controls makes "
                             f"them); got {got}")
        if B % control.shape[0] or not control.is_floating_point() or not torch.isfinite(control).all():
            raise ValueError(f"the control image must be finite floats, one for the batch or one per image (a batch "
                             f"of {B} takes 1 or a divisor of {B}); got {control.shape[0]} of dtype {control.dtype}")
        return control.to(device=x.device, dtype=x.dtype).repeat(B // control.shape[0], 1, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, control: torch.Tensor | None = None,
                scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(skip residuals, middle residual), each scaled by `scale`, for the U-Net's skips and middle."""
        scale = check_scale(scale)
        if control is None:
            raise ValueError("a ControlNet needs its control image: model(x_t, t, context, mask, control=image)")
        h, skips, _ = self.encode(x, t, context, context_mask, added=self.hint(self.check_control(x, control)))
        residuals = [scale * zero(s) for zero, s in zip(self.zero_convs, skips)]
        return residuals, scale * self.mid_zero_conv(h)


class ControlledUNet(nn.Module):
    """The frozen U-Net steered by a ControlNet with its control image and scale bound in: a plain denoiser,
    model(z_t, t, context, context_mask), for the samplers, classifier-free guidance and the pipeline.
    `control` and `scale` can be changed between calls (training sets each batch's controls).

    uncontrolled: text states (1, L, D) and mask (1, L) or None, the empty prompt's: rows of a batch whose text is
    this one run without the control (their residuals are zeroed), so under classifier-free guidance only the
    conditional pass is steered (`with_control(..., conditional_only=True)`; diffusers' guess mode also controls
    the conditional half of the batch only). Then the guided difference cond - uncond carries the control too."""

    def __init__(self, unet: UNet, controlnet: ControlNet, control: torch.Tensor, scale: float = 1.0,
                 uncontrolled: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        super().__init__()
        if controlnet.config != unet.config:
            raise ValueError("the ControlNet was built from another U-Net (its config differs); use "
                             "ControlNet.from_unet(unet)")
        self.unet, self.controlnet = unet, controlnet
        self.control, self.scale = control, check_scale(scale)
        if uncontrolled is not None and (uncontrolled[0].ndim != 3 or uncontrolled[0].shape[0] != 1):
            raise ValueError(f"uncontrolled must be one prompt's text states (1, L, D) and mask, the empty prompt's "
                             f"(pipe.encode([''])); got states of shape {tuple(uncontrolled[0].shape)}")
        self.uncontrolled = uncontrolled

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def controlled_rows(self, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) 1.0 for the rows the control steers, 0.0 for those whose text is `uncontrolled`; None: all rows."""
        if self.uncontrolled is None or context is None:
            return None
        null, null_mask = (z.to(context.device) if z is not None else None for z in self.uncontrolled)
        if null.shape[1:] != context.shape[1:]:
            return None                                  # another length: no row can be the empty prompt
        same = torch.isclose(context, null.to(context.dtype), atol=1e-5, rtol=1e-4).flatten(1).all(1)
        if mask is not None and null_mask is not None:
            same &= (mask == null_mask).all(1)
        return (~same).to(context.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        skips, mid = self.controlnet(x, t, context, context_mask, self.control, self.scale)
        rows = self.controlled_rows(context, context_mask)
        if rows is not None:
            w = rows[:, None, None, None]
            skips, mid = [s * w for s in skips], mid * w
        return self.unet(x, t, context, context_mask, skip_residuals=skips, mid_residual=mid)


def check_guidance_pair(guidance) -> tuple[float, float]:
    """(text scale, control scale) as floats if both are finite numbers >= 0; else refused by name."""
    ok = (isinstance(guidance, (tuple, list)) and len(guidance) == 2
          and all(isinstance(g, numbers.Real) and not isinstance(g, bool) and 0 <= g < math.inf for g in guidance))
    if not ok:
        raise ValueError(f"guidance must be a pair (text scale, control scale) of finite numbers >= 0 (the tiny SD's "
                         f"own (4, 4) equals its guidance 4 with the control on the conditional pass only); got "
                         f"{guidance!r}")
    return float(guidance[0]), float(guidance[1])


class ControlGuidedUNet(ControlledUNet):
    """Classifier-free guidance with two conditions, the text and the control (the form of InstructPix2Pix, Brooks
    et al. 2023, Eq. 3), as a plain denoiser model(z_t, t, context, context_mask) that runs its own three passes
    as one batch of 3B, so the pipeline calls it at guidance scale 1 (`with_control(..., guidance=(s_t, s_c))`):

        e = e(null, -) + s_c [e(null, control) - e(null, -)] + s_t [e(text, control) - e(null, control)]

    null is the empty prompt's text states (1, L, D) and mask; - is no control. At s_c = s_t = w this is guidance w
    with the control on the conditional pass only; s_c > s_t weights the control above the text."""

    def __init__(self, unet: UNet, controlnet: ControlNet, control: torch.Tensor, scale: float,
                 null: tuple[torch.Tensor, torch.Tensor | None], guidance: tuple[float, float]):
        super().__init__(unet, controlnet, control, scale, uncontrolled=null)
        self.text_scale, self.control_scale = check_guidance_pair(guidance)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        null, null_mask = (z.to(x.device) if z is not None else None for z in self.uncontrolled)
        if null.shape[1:] != context.shape[1:] or (context_mask is None) != (null_mask is None):
            raise ValueError(f"the text states {tuple(context.shape[1:])} and the empty prompt's "
                             f"{tuple(null.shape[1:])} must come from the same text encoder and length")
        n, nm = null.expand(B, -1, -1), None if null_mask is None else null_mask.expand(B, -1)
        x3, t3 = torch.cat([x, x, x]), torch.cat([t, t, t])
        c3 = torch.cat([context, n, n])
        m3 = None if context_mask is None else torch.cat([context_mask, nm, nm])
        skips, mid = self.controlnet(x3, t3, c3, m3, self.controlnet.check_control(x, self.control), self.scale)
        w = torch.cat([torch.ones(2 * B), torch.zeros(B)]).to(x)[:, None, None, None]   # the last B: no control
        out = self.unet(x3, t3, c3, m3, skip_residuals=[s * w for s in skips], mid_residual=mid * w)
        text, control_only, plain = out.chunk(3)
        return plain + self.control_scale * (control_only - plain) + self.text_scale * (text - control_only)


def latent_factor(pipe: "TextToImage") -> int:
    """How many image pixels make one latent pixel, per side (the tiny SD: 32 px / 8 = 4)."""
    return pipe.vae.config.image_size // pipe.latent_shape[-1]


def with_control(pipe: "TextToImage", controlnet: ControlNet, control: torch.Tensor,
                 conditioning_scale: float = 1.0, conditional_only: bool = False,
                 guidance: tuple[float, float] | None = None) -> "TextToImage":
    """A pipeline whose denoiser is pipe.unet steered by `controlnet` with `control` (1 image, or one per image
    of a call) at `conditioning_scale`; everything else is pipe's, so a call goes through the one generation path.
    conditional_only: under classifier-free guidance, steer the conditional pass only (the empty prompt's rows run
    without the control; see ControlledUNet). guidance: (text scale, control scale), guidance by each condition
    (ControlGuidedUNet, three passes a step); the returned pipeline then samples at guidance_scale 1 by default."""
    if not isinstance(conditional_only, bool):
        raise TypeError(f"conditional_only must be True or False; got {conditional_only!r}")
    if guidance is not None and conditional_only:
        raise ValueError("give conditional_only or guidance, not both: guidance (w, w) is guidance w with the "
                         "control on the conditional pass only")
    controlled = copy.copy(pipe)
    if guidance is not None:
        controlled.unet = ControlGuidedUNet(pipe.unet, controlnet, control, conditioning_scale, pipe.encode([""]),
                                            guidance)
        controlled.sampler_settings = dataclasses.replace(pipe.sampler_settings, guidance_scale=1.0)
        return controlled
    controlled.unet = ControlledUNet(pipe.unet, controlnet, control, conditioning_scale,
                                     uncontrolled=pipe.encode([""]) if conditional_only else None)
    return controlled


class ControlNetFineTune(CaptionedFineTune):
    """The pipeline's denoising loss on (latent, caption, control) triples through ControlledUNet, training only the
    ControlNet (the U-Net frozen), with caption dropout: CaptionedFineTune, each batch's control images bound in."""

    def __init__(self, pipe: "TextToImage", controlnet: ControlNet, z: torch.Tensor, context: torch.Tensor,
                 mask: torch.Tensor, controls: torch.Tensor, **options):
        if len(controls) != len(z):
            raise ValueError(f"need one control image per latent; got {len(controls)} for {len(z)}")
        pipe.unet.requires_grad_(False)
        self.controlled = ControlledUNet(pipe.unet, controlnet, controls[:1])
        controlnet.check_control(z, controls)                                  # sizes checked before training
        self.controls = controls.to(z.device)
        super().__init__(pipe, self.controlled, list(controlnet.parameters()), z, context, mask, **options)

    def denoiser_for(self, index: torch.Tensor) -> nn.Module:
        self.controlled.control = self.controls[index]
        return self.controlled

    def fixed_tensors(self) -> list[torch.Tensor]:
        return [*super().fixed_tensors(), self.controls]


def fit_controlnet(pipe: "TextToImage", images: torch.Tensor, captions: list[str], controls: torch.Tensor, *,
                   controlnet: ControlNet | None = None, steps: int = 1000, batch_size: int = 32, lr: float = 1e-4,
                   caption_dropout: float = 0.5, seed: int = 0, ema: float | None = None,
                   checkpoint_path: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
                   max_seconds: float | None = None, progress: bool = False,
                   callback: Callable | None = None) -> tuple[ControlNet, FineTuneLog]:
    """Train a ControlNet (default: ControlNet.from_unet(pipe.unet) at the pipeline's latent factor) on images
    (N, 3, H, W) in [-1, 1], their captions and control images (N, 3, H, W) (course_lib.controls.make_control);
    pipe.unet stays frozen. Checkpoints and exact resume as course_lib.finetune.fine_tune. Returns the ControlNet
    (in eval mode) and the log; generate with `with_control(pipe, controlnet, control)`."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need one caption per image and at least one image; got {len(images)} and {len(captions)}")
    controlnet = ControlNet.from_unet(pipe.unet, latent_factor(pipe)) if controlnet is None else controlnet
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)
    c, m = pipe.encode(list(captions))
    run = ControlNetFineTune(pipe, controlnet, z, c, m, controls, steps=steps, lr=lr, batch_size=batch_size,
                             seed=seed, ema=ema, caption_dropout=caption_dropout, null=pipe.encode([""]),
                             info={"controlnet": list(controlnet.hint.channels)})
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume, max_seconds=max_seconds,
            progress=progress, callback=callback, desc="ControlNet")
    params = list(controlnet.parameters())
    return controlnet, FineTuneLog(run.history["loss"], run.seconds, run.step, sum(p.numel() for p in params),
                                   run.state_bytes)


__all__ = ["HINT_CHANNELS", "CONTROL_CHANNELS", "zero_conv", "HintEncoder", "check_scale", "ControlNet",
           "ControlledUNet", "check_guidance_pair", "ControlGuidedUNet", "latent_factor", "with_control", "ControlNetFineTune", "fit_controlnet"]
