r"""Classifier-free guidance: one prompt-following model out of a conditional and an unconditional pass (notebook 09).

A text-conditioned model trained with its prompt sometimes replaced by the empty prompt knows both
eps(x_t, c) and eps(x_t, null). Guidance extrapolates from the second towards, and past, the first
(Eq. 6 of [1], with scale = 1 + w):
    eps_guided = eps(x_t, null) + scale (eps(x_t, c) - eps(x_t, null))
scale = 0 is the unconditional model, 1 the plain conditional one, and scale > 1 trades variety for
images that match the prompt more closely (Stable Diffusion's default is 7.5). A negative prompt is
simply used as the null context: guidance then pushes away from it. The same combination of the raw
outputs serves epsilon, x0 and v predictions alike: each is an affine function of the others given x_t,
and the weights (1 - scale) + scale sum to 1.

Rescaled guidance (Lin et al. 2024, Sec. 3.4 [2]): a large scale inflates the guided output's standard
deviation well beyond what the conditional model would give, which shows as over-exposed, saturated images.
Rescaling brings it back, per image, and mixes with the plain guided output by phi in [0, 1]:
    guided    = uncond + scale (cond - uncond)
    rescaled  = guided * std(cond) / std(guided)          (std over all of an image's values)
    output    = phi * rescaled + (1 - phi) * guided       (phi = 0: plain guidance; Lin et al. use 0.7)
Like diffusers' `guidance_rescale`, it is applied to the model's raw output (epsilon, x0 or v).

`GuidedModel` wraps a conditional U-Net as a plain model(x_t, t), running the conditional and
unconditional passes as one doubled batch, so every sampler of course_lib.sampling works with it unchanged:
    guided = GuidedModel(unet, context, context_mask, null_context, null_mask, scale=5.0)
    x0 = sample(guided, schedule, (4, 4, 8, 8), generator=torch.Generator().manual_seed(0))

Shapes: context (B, L, D) text states (batch, tokens, width), or (1, L, D) shared by the batch;
context_mask None or bool (B or 1, L), True at real tokens.

References:
  [1] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  [2] Lin, Liu, Li, Yang. Common Diffusion Noise Schedules and Sample Steps are Flawed. 2024.
      https://arxiv.org/abs/2305.08891
"""

from __future__ import annotations

import math
import numbers

import torch


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                             rescale: float = 0.0) -> torch.Tensor:
    """uncond + scale (cond - uncond): Eq. 6 of Ho & Salimans 2022 with scale = 1 + w; with rescale = phi > 0,
    Lin et al.'s rescaled guidance: each image's guided output scaled to the conditional output's standard
    deviation, mixed with the plain one by phi (see the module's docstring)."""
    check_rescale(rescale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 <= scale < float("inf"):
        raise ValueError(f"the guidance scale must be a finite number >= 0 (0: unconditional, 1: no guidance, "
                         f"> 1: guided; a negative scale pushes away from the prompt); got {scale!r}")
    guided = uncond + scale * (cond - uncond)
    if rescale == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.float().std(dim=dims, keepdim=True)
    std_guided = guided.float().std(dim=dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rescaled = guided * (std_cond / std_guided).to(guided.dtype)
    return rescale * rescaled + (1 - rescale) * guided


def check_rescale(rescale: float, name: str = "the guidance rescale phi") -> None:
    """Raise a clear error unless phi (the guidance rescale) is a number in [0, 1]."""
    if isinstance(rescale, bool) or not isinstance(rescale, numbers.Real) or not 0 <= rescale <= 1:
        raise ValueError(f"{name} must be a number in [0, 1] (0: plain guidance; Lin et al. use 0.7); "
                         f"got {rescale!r}")


def drop_captions(context: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, null_context: torch.Tensor,
                  null_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance's training half (Ho & Salimans 2022): where `drop` (B,) is True, the empty prompt's states and mask
    replace a caption's, so the same network learns eps(x_t, t, "") that guidance needs when sampling. Every
    training recipe (the Trainer, the fine-tuners) drops captions through this."""
    context = torch.where(drop[:, None, None], null_context.to(context.dtype), context)
    return context, torch.where(drop[:, None], null_mask, mask)


def _check_context(context: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or not context.is_floating_point():
        raise ValueError(f"{what} must be a float tensor of text states (B, L, D) or (1, L, D); got "
                         f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{what}'s mask must be a bool tensor (B, L), True at real tokens; got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        B, L = context.shape[:2]
        if mask.ndim != 2 or mask.shape[1] != L or mask.shape[0] not in (1, B):
            valid = f"(1, {L})" if B == 1 else f"({B}, {L}) or (1, {L})"
            raise ValueError(f"{what}'s mask must have shape {valid} to match {what} {tuple(context.shape)}; "
                             f"got {tuple(mask.shape)}")


def _batched(context: torch.Tensor, mask: torch.Tensor | None, B: int, device: torch.device,
             what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """context (B or 1, L, D) and mask (B or 1, L) as batch B, on device."""
    if context.shape[0] not in (1, B):
        raise ValueError(f"{what} has batch {context.shape[0]}; expected 1 (the same for every image) or the "
                         f"image batch {B}")
    context = context.to(device).expand(B, -1, -1)
    if mask is not None:
        mask = mask.to(device).expand(B, -1)
    return context, mask


def _same_length(c1: torch.Tensor, m1: torch.Tensor | None, c2: torch.Tensor, m2: torch.Tensor | None):
    """Pad the shorter of two contexts with masked-out zero tokens, so the two can share one batch. Masked
    tokens get no attention weight, so the padding changes nothing."""
    L1, L2 = c1.shape[1], c2.shape[1]
    if L1 == L2 and (m1 is None) == (m2 is None):
        return c1, m1, c2, m2
    L = max(L1, L2)
    out = []
    for c, m in ((c1, m1), (c2, m2)):
        m = torch.ones(c.shape[:2], dtype=torch.bool, device=c.device) if m is None else m
        out += [torch.nn.functional.pad(c, (0, 0, 0, L - c.shape[1])),
                torch.nn.functional.pad(m, (0, L - c.shape[1]), value=False)]
    return tuple(out)


class GuidedModel(torch.nn.Module):
    """A conditional U-Net with its prompt fixed, called as a plain model(x_t, t): classifier-free guidance
    (Ho & Salimans 2022) at `scale`.

    unet          a text-conditioned U-Net, unet(x, t, context, context_mask)
    context       the prompt's text states (B, L, D), or (1, L, D) for one prompt shared by the batch
    context_mask  None or bool (B or 1, L), True at real tokens
    null_context  the empty prompt's states (or a negative prompt's), same rules; needed unless scale == 1.
                  Its length may differ from context's: the shorter is padded with masked tokens.
    scale         0: unconditional, 1: conditional (no guidance), > 1: guided. Settable between samples
                  (guided.scale = 3.0). At 0 and 1 one plain pass runs (the exact unguided prediction);
                  otherwise the conditional and unconditional passes run as one batch of 2B.
    rescale       phi of Lin et al.'s rescaled guidance, in [0, 1] (0: plain guidance); used when the two
                  passes run. Settable like scale.

    It is an nn.Module holding the U-Net, so `.to(device)` moves both and samplers find its device."""

    def __init__(self, unet: torch.nn.Module, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                 null_context: torch.Tensor | None = None, null_mask: torch.Tensor | None = None,
                 scale: float = 7.5, rescale: float = 0.0):
        super().__init__()
        _check_context(context, context_mask, "context")
        if null_context is not None:
            _check_context(null_context, null_mask, "null_context")
            if null_context.shape[2] != context.shape[2]:
                raise ValueError(f"null_context's width {null_context.shape[2]} differs from context's "
                                 f"{context.shape[2]}; encode both with the same text encoder")
        elif null_mask is not None:
            raise ValueError("null_mask was given without null_context")
        self.unet = unet
        self.register_buffer("context", context.detach(), persistent=False)
        self.register_buffer("context_mask", context_mask, persistent=False)
        self.register_buffer("null_context", None if null_context is None else null_context.detach(),
                             persistent=False)
        self.register_buffer("null_mask", null_mask, persistent=False)
        self.scale = scale
        self.rescale = rescale

    @property
    def rescale(self) -> float:
        return self._rescale

    @rescale.setter
    def rescale(self, value: float) -> None:
        check_rescale(value)
        self._rescale = float(value)

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"the guidance scale must be a finite number >= 0 (0: unconditional, 1: conditional, "
                             f"> 1: guided); got {value!r}")
        if value != 1 and self.null_context is None:
            raise ValueError(f"guidance scale {value} needs null_context, the empty prompt's (or a negative "
                             f"prompt's) text states; only scale 1 runs without one")
        self._scale = float(value)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        if self.scale == 1 or self.scale == 0:                     # one plain pass
            which = ((self.context, self.context_mask, "context") if self.scale == 1
                     else (self.null_context, self.null_mask, "null_context"))
            c, m = _batched(*which[:2], B, x.device, which[2])
            return self.unet(x, t, c, m)
        c, m = _batched(self.context, self.context_mask, B, x.device, "context")
        n, nm = _batched(self.null_context, self.null_mask, B, x.device, "null_context")
        c, m, n, nm = _same_length(c, m, n, nm)
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, n]),
                        None if m is None else torch.cat([m, nm]))
        cond, uncond = out.chunk(2)
        return classifier_free_guidance(cond, uncond, self.scale, self.rescale)

    def extra_repr(self) -> str:
        null = None if self.null_context is None else tuple(self.null_context.shape)
        return f"scale={self.scale:g}, rescale={self.rescale:g}, context={tuple(self.context.shape)}, null_context={null}"


def conditional(unet: torch.nn.Module, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> GuidedModel:
    """The conditional U-Net with its prompt fixed, as a plain model(x_t, t) for unguided sampling (scale 1)."""
    return GuidedModel(unet, context, context_mask, scale=1.0)


__all__ = ["classifier_free_guidance", "check_rescale", "GuidedModel", "conditional"]
