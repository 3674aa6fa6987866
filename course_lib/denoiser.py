r"""What every denoising network of the course shares: the call `model(x_t, t, context, context_mask)` and its checks.

The U-Net (course_lib.unet, notebook 03), the diffusion transformer (course_lib.dit) and SD 3's two-stream
transformer (course_lib.mmdit) are interchangeable: each takes a noisy image (or latent) x_t (B, C, H, W) and its
time t, and, when text-conditioned (config.context_dim set), the text encoder's states (B, L, context_dim) with
their padding mask (B, L), True at real tokens; each returns a tensor shaped like x_t. The Trainer, the samplers,
the pipeline and the model file rely on that call and nothing else, so the checks of what comes in are written
once, here: a network subclasses `Denoiser`, and its config gives `in_channels`, `context_dim` and
`check_size(size, what)`.

Time convention: t is one number per image (or one for the batch) in [-1, MAX_TIMESTEP]: a schedule's integer
timestep 0..T-1 (T = 1000), the learned schedule's u T - 1, or a flow time in [0, 1] times 1000
(course_lib.schedules.TIME_SCALE).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import check_context
from .checks import has_values

MAX_TIMESTEP = 1000      # every schedule here has T = 1000 (t in 0..999; the learned one's u T - 1 from -1); flow: t x 1000


class Denoiser(nn.Module):
    """The checks of a denoiser's inputs. A subclass sets `kind` (its name in messages), `example` (how to build a
    text-conditioned one) and `input_weight` (the first layer's weight, whose dtype inputs must have)."""

    kind = "denoiser"
    example = ""

    @property
    def input_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """x (B, in_channels, H, W) of a size the network takes, and t as one timestep per image, (B,)."""
        cfg = self.config
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor (images scaled to [-1, 1]); got dtype {x.dtype}")
        self.check_dtype("x", x)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}")
        cfg.check_size(x.shape[2], "image height")
        cfg.check_size(x.shape[3], "image width")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be one timestep per image, shape ({x.shape[0]},); got {tuple(t.shape)}")
        if t.numel() and has_values(t) and not (torch.isfinite(t.float()).all() and -1 <= t.min() and t.max() <= MAX_TIMESTEP):
            raise ValueError(f"t must be finite timesteps in [-1, {MAX_TIMESTEP}] (a schedule's 0..T-1 with T = 1000, "
                             f"the learned schedule's u T - 1, or a flow time in [0, 1] times 1000); got min "
                             f"{t.min().item()}, max {t.max().item()}")
        return t

    def check_dtype(self, name: str, value: torch.Tensor) -> None:
        """An input must have the parameters' dtype, except under torch.autocast, whose layers cast any float
        but float64 themselves. Refused here, it would reach torch's "Input type (double) and bias type (float)"."""
        expected = self.input_weight.dtype
        if value.dtype == expected or (value.dtype != torch.float64 and torch.is_autocast_enabled(value.device.type)):
            return
        raise TypeError(f"{name} has dtype {value.dtype} but this {self.kind}'s parameters are {expected}: cast the "
                        f"input ({name}.to({expected}); {name}.float() for float32), or the model to the input's dtype "
                        f"(model.half() for float16, model.to(dtype)), or run float16/bfloat16 inputs under "
                        f"torch.autocast")

    def check_context(self, x: torch.Tensor, context: torch.Tensor | None,
                      context_mask: torch.Tensor | None) -> None:
        """A conditional network needs context (B, L, context_dim) and takes an optional bool mask (B, L) with at
        least one True per row (see attention.check_context); an unconditional one takes neither."""
        D = self.config.context_dim
        if D is None:
            if context is not None or context_mask is not None:
                raise ValueError(f"this {self.kind} is unconditional (config.context_dim is None) and takes no "
                                 f"context; build one with context_dim set (e.g. {self.example}) to condition on text")
            return
        if context is None:
            raise ValueError(f"this {self.kind} is text-conditioned (context_dim={D}): pass context, the text "
                             f"encoder's states, shape (B, L, {D}) = ({x.shape[0]}, tokens, {D}); for an "
                             f"unconditional prediction pass the empty prompt's states")
        check_context(context, context_mask, x.shape[0], D)
        self.check_dtype("context", context)
