r"""The U-Net that predicts the noise: time embedding, ResBlocks, down/up sampling, and the U itself.

The network takes a noisy image x_t and its timestep t and returns a tensor of the same shape
(the predicted noise, clean image or v, depending on how it is trained; see course_lib.forward).

    t  --sinusoids--> MLP --> emb  (one vector per image, fed to every ResBlock)

    x_t -> conv_in -> [ResBlock (+Attention)] x n -> Downsample ---------------------------> ...
                          |  skip                                                          |
                          v                                                                 v
    out <- conv_out <- [cat(h, skip) -> ResBlock (+Attention)] x n <- Upsample <- ... <- middle

Pieces (each a few lines below):
    timestep_embedding   sinusoids of t at geometric frequencies (Vaswani et al. 2017; Ho et al. 2020 [1])
    ResBlock             GroupNorm -> SiLU -> conv -> add time (scale-and-shift or addition) -> GroupNorm
                         -> SiLU -> conv, plus a residual path (He et al. 2016 [3])
    Downsample/Upsample  a stride-2 conv; nearest-neighbour x2 then a conv
    Block                a ResBlock, then attention where the config asks for it (course_lib.attention):
                         SelfAttention (notebook 03), or a SpatialTransformer if context_dim is set (notebook 09)
    UNetEncoder          the way down and the middle (`encode` returns the skips): what a ControlNet copies
    UNet                 the U: the encoder's skips, a plain Python list, consumed on the way up in `forward`

The layout follows DDPM [1] with the scale-and-shift time conditioning of [2]. `UNetConfig` is the whole
description of a network; `PRESETS` names the pixel-space sizes the course uses, `SD_PRESETS` the
text-conditioned latent ones [4], and `preset_table()` counts their parameters. With context_dim set the
U-Net is called as `UNet(x_t, t, context, context_mask)`, context (B, L, context_dim) being the text
encoder's states; an unconditional one (context_dim=None, the default) takes no context. Inputs are floats
in the parameters' dtype (float32 unless the model was cast), or any float but float64 under torch.autocast.

SD 1.5's own U-Net (course_lib.sd, notebook 18) is this network with `num_heads=8` (wider levels get wider
heads), `time_conditioning="add"` and `sd_skips=True`: conv_in's output and every downsampled map are skips
too, and each level on the way up has one more Block to use them (SD 1.5: 12 skips, 3 Blocks a level up).

References:
  [1] Ho, Jain, Abbeel 2020, Denoising Diffusion Probabilistic Models. https://arxiv.org/abs/2006.11239
  [2] Dhariwal, Nichol 2021, Diffusion Models Beat GANs on Image Synthesis. https://arxiv.org/abs/2105.05233
  [3] He et al. 2016, Deep Residual Learning for Image Recognition. https://arxiv.org/abs/1512.03385
  [4] Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models.
      https://arxiv.org/abs/2112.10752
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import JSONConfig
from .attention import SelfAttention, SpatialTransformer
from .checks import check_choice, check_int
from .denoiser import MAX_TIMESTEP, Denoiser  # noqa: F401  (MAX_TIMESTEP: also from here)
from .precision import recompute_context

TIME_CONDITIONING = ("scale_shift", "add")


@dataclass(frozen=True)
class UNetConfig(JSONConfig):
    """Everything that defines a U-Net. Levels run from full resolution down; the U halves the
    resolution between levels, so `image_size` must be divisible by 2 ** (levels - 1)."""
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 128)          # feature channels at each resolution level
    blocks_per_level: int = 2                            # ResBlocks per level on the way down (and up)
    attention: tuple[bool, ...] = (False, True, True)    # self-attention after each ResBlock of a level?
    head_channels: int = 32                              # channels per attention head
    norm_groups: int = 8                                 # GroupNorm groups (must divide every channel count)
    time_conditioning: str = "scale_shift"               # or "add"
    dropout: float = 0.0
    gradient_checkpointing: bool = False                 # recompute activations in backward to save memory
    context_dim: int | None = None                       # width D of the text states (B, L, D); None: unconditional
    transformer_depth: int = 1                           # TransformerBlocks per SpatialTransformer (if context_dim)
    num_heads: int | None = None                         # heads per attention layer, fixed (SD 1.5: 8); None: by head_channels
    sd_skips: bool = False                               # SD's skip layout: conv_in and each Downsample leave a skip too,
                                                         # and every level has blocks_per_level + 1 Blocks on the way up

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention", tuple(bool(a) for a in self.attention))
        if not self.channels:
            raise ValueError("channels needs at least one level, e.g. (64, 128, 128)")
        if len(self.attention) != len(self.channels):
            raise ValueError(f"attention needs one True/False per level ({len(self.channels)} levels); "
                             f"got {len(self.attention)}")
        for level, (c, attend) in enumerate(zip(self.channels, self.attention)):
            if c % self.norm_groups:
                raise ValueError(f"every channel count must be divisible by norm_groups={self.norm_groups}; "
                                 f"got {c} in channels={self.channels}")
            # the middle of the U always attends, so the last level needs whole heads too
            if self.num_heads is None and (attend or level == len(self.channels) - 1) and c % self.head_channels:
                raise ValueError(f"levels with attention (and the last level) need channels divisible by "
                                 f"head_channels={self.head_channels}; got {c} at level {level}")
        if self.num_heads is not None:
            object.__setattr__(self, "num_heads", check_int("num_heads", self.num_heads, 1,
                                                            hint=" (or None to use head_channels)"))
            if any(c % self.num_heads for c in self.channels):
                raise ValueError(f"num_heads={self.num_heads} must divide every level's channels; "
                                 f"got channels={self.channels}")
        check_choice("time_conditioning", self.time_conditioning, TIME_CONDITIONING)
        if self.channels[0] % 2:
            raise ValueError(f"channels[0] sets the time embedding's width and must be even; got {self.channels[0]}")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be at least 1; got {self.blocks_per_level}")
        if self.context_dim is not None:
            object.__setattr__(self, "context_dim", check_int("context_dim", self.context_dim, 1, hint=" (the text "
                                                              "encoder's width) or None for an unconditional U-Net"))
        object.__setattr__(self, "transformer_depth", check_int("transformer_depth", self.transformer_depth, 1))
        self.check_size(self.image_size)

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def time_channels(self) -> int:
        return 4 * self.channels[0]

    def head_channels_at(self, channels: int) -> int:
        """Channels per head of an attention layer of this width: head_channels, or channels / num_heads."""
        return self.head_channels if self.num_heads is None else channels // self.num_heads

    @property
    def conditional(self) -> bool:
        """True for a text-conditioned U-Net (one that takes a context)."""
        return self.context_dim is not None

    def check_size(self, size: int, what: str = "image_size") -> None:
        factor = 2 ** (self.levels - 1)
        if size < factor or size % factor:
            raise ValueError(f"{what} must be a multiple of {factor} (this U-Net halves the resolution "
                             f"{self.levels - 1} times); got {size}")

    def __repr__(self) -> str:
        """Fields at their defaults that only SD or text conditioning use are left out."""
        skip = [f for f in ("num_heads", "sd_skips") if getattr(self, f) == UNetConfig.__dataclass_fields__[f].default]
        if not self.conditional:
            skip += [f for f in ("context_dim", "transformer_depth")
                     if getattr(self, f) == UNetConfig.__dataclass_fields__[f].default]
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name not in skip)
        return f"UNetConfig({fields})"





PRESETS: dict[str, UNetConfig] = {
    # quick mode and tests: seconds on a CPU
    "tiny": UNetConfig(image_size=32, channels=(16, 32), blocks_per_level=1, attention=(False, True),
                       head_channels=16, norm_groups=8),
    # 32 px emoji trained on a CPU
    "small": UNetConfig(image_size=32, channels=(32, 64, 64), blocks_per_level=2,
                        attention=(False, True, True), head_channels=32, norm_groups=8),
    # 32 px emoji on a GPU (notebook 04's full mode)
    "base": UNetConfig(image_size=32, channels=(64, 128, 128), blocks_per_level=2,
                       attention=(False, True, True), head_channels=32, norm_groups=8),
}

# Text-conditioned latent U-Nets (notebooks 07 and 09): 4-channel VAE latents (8x8 for 32 px emoji), cross-
# attending to text states of width context_dim. Apart from PRESETS (3 channels, no context; 03 loops over them).
SD_PRESETS: dict[str, UNetConfig] = {
    # quick mode and tests: seconds on a CPU
    "sd_tiny": UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=(32, 64), blocks_per_level=1,
                          attention=(True, True), head_channels=16, norm_groups=8, context_dim=64),
    # the shipped text-to-image model (a GPU, notebook 09's full mode)
    "sd_small": UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=(64, 128), blocks_per_level=1,
                           attention=(True, True), head_channels=32, norm_groups=8, context_dim=128),
}


def get_preset(name: str, **changes) -> UNetConfig:
    """A named config from PRESETS or SD_PRESETS, optionally with fields changed
    (e.g. get_preset("small", image_size=16), get_preset("sd_tiny", context_dim=32))."""
    presets = {**PRESETS, **SD_PRESETS}
    check_choice("U-Net preset", name, tuple(presets))
    return presets[name].replace(**changes) if changes else presets[name]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def preset_table(names: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """One row per preset: name, channels, blocks, attention levels, context_dim (None: unconditional) and
    parameter count (counted, not typed). names: default the pixel-space PRESETS; e.g. list(SD_PRESETS)."""
    rows = []
    with torch.random.fork_rng():          # building models draws random weights; leave the caller's RNG alone
        for name in (list(PRESETS) if names is None else names):
            cfg = get_preset(name)
            rows.append({"preset": name, "channels": cfg.channels, "blocks_per_level": cfg.blocks_per_level,
                         "attention": cfg.attention, "context_dim": cfg.context_dim,
                         "parameters": count_parameters(UNet(cfg))})
    return rows


# --- The pieces --------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps: [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2)).

    Nearby timesteps get nearby vectors, and every frequency from 1 to 1/max_period is present, so an MLP
    can read t at any scale. t may be integer or fractional."""
    if dim % 2:
        raise ValueError(f"the embedding dimension must be even; got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class TimeEmbedding(nn.Module):
    """t -> sinusoids -> Linear -> SiLU -> Linear: one vector per image."""

    def __init__(self, base_channels: int, time_channels: int):
        super().__init__()
        self.base_channels = base_channels
        self.mlp = nn.Sequential(nn.Linear(base_channels, time_channels), nn.SiLU(),
                                 nn.Linear(time_channels, time_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # the sinusoids are computed in float32, then cast to the MLP's dtype (a no-op unless the model was cast)
        return self.mlp(timestep_embedding(t, self.base_channels).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and SiLU, conditioned on the time embedding, plus a residual path.

    "scale_shift": h = GroupNorm(h) * (1 + scale(emb)) + shift(emb) before the second conv (Dhariwal & Nichol);
    "add":         h = h + proj(emb) after the first conv (Ho et al.)."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, norm_groups: int = 8,
                 time_conditioning: str = "scale_shift", dropout: float = 0.0):
        super().__init__()
        self.time_conditioning = time_conditioning
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        n_time = 2 * out_channels if time_conditioning == "scale_shift" else out_channels
        self.time_proj = nn.Linear(time_channels, n_time)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_proj(F.silu(emb))[:, :, None, None]
        if self.time_conditioning == "scale_shift":
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """A 3x3 conv with stride 2. asymmetric=True pads only the right and bottom by one (SD's autoencoder) instead
    of one on every side: the same output size, sampled half a pixel further up and left."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One ResBlock, optionally followed by attention: the unit the U is built from. The attention is
    SelfAttention in an unconditional U-Net and a SpatialTransformer (self- and cross-attention) in a
    text-conditioned one (cfg.context_dim set)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, cfg.time_channels, cfg.norm_groups,
                            cfg.time_conditioning, cfg.dropout)
        head_channels = cfg.head_channels_at(out_channels)
        if not attend:
            self.attn = None
        elif cfg.conditional:
            self.attn = SpatialTransformer(out_channels, cfg.context_dim, head_channels, cfg.transformer_depth,
                                           cfg.norm_groups, cfg.dropout)
        else:
            self.attn = SelfAttention(out_channels, head_channels, cfg.norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.res(x, emb)
        if self.attn is None:
            return h
        if isinstance(self.attn, SpatialTransformer):
            return self.attn(h, context, context_mask)
        return self.attn(h)


class UNetEncoder(Denoiser):
    """The U-Net's way down and its middle: time embedding, conv_in, the down Blocks and Downsamples, mid1 and mid2.
    `encode` runs them and returns the skips the way up will use. UNet is built on it, and a ControlNet
    (course_lib.controlnet) is a trainable copy of it."""

    kind, example = "U-Net", "get_preset('sd_tiny')"

    def __init__(self, config: UNetConfig | None = None, **changes):
        super().__init__()
        cfg = config or UNetConfig()
        cfg = cfg.replace(**changes) if changes else cfg
        self.config = cfg
        ch = cfg.channels
        self.time_embed = TimeEmbedding(ch[0], cfg.time_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Down: at each level, blocks_per_level Blocks (each leaves a skip), then halve the resolution.
        # skip_channels follows the skips `encode` will keep, so the way up knows what it concatenates.
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c_in = ch[0]
        skip_channels = [ch[0]] if cfg.sd_skips else []
        for level, c in enumerate(ch):
            self.down.append(nn.ModuleList(
                Block(c_in if i == 0 else c, c, cfg, cfg.attention[level]) for i in range(cfg.blocks_per_level)))
            skip_channels += [c] * cfg.blocks_per_level
            c_in = c
            last = level == cfg.levels - 1
            self.downsample.append(nn.Identity() if last else Downsample(c))
            if cfg.sd_skips and not last:
                skip_channels.append(c)
        self.skip_channels = tuple(skip_channels)

        # Middle, at the lowest resolution: ResBlock, attention (a SpatialTransformer if conditional), ResBlock.
        self.mid1 = Block(ch[-1], ch[-1], cfg, attend=True)
        self.mid2 = Block(ch[-1], ch[-1], cfg, attend=False)

    def _run(self, block: Block, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
             context_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False,
                              context_fn=recompute_context())
        return block(h, emb, context, context_mask)

    @property
    def input_weight(self) -> torch.Tensor:
        return self.conv_in.weight

    def encode(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
               context_mask: torch.Tensor | None = None, added: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The way down and the middle: (h after mid2, the skips in the order they were kept, the time embedding).
        added: (B, channels[0], H, W) added to conv_in's output (a ControlNet's encoded control image)."""
        t = self.check_input(x, t)
        self.check_context(x, context, context_mask)
        c, m = context, context_mask                      # the same text states go to every attention layer
        emb = self.time_embed(t)
        h = self.conv_in(x)
        if added is not None:
            h = h + added

        skips = [h] if self.config.sd_skips else []      # the U's skip connections, in plain sight
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = self._run(block, h, emb, c, m)
                skips.append(h)
            h = down(h)
            if self.config.sd_skips and not isinstance(down, nn.Identity):
                skips.append(h)                           # SD also keeps each downsampled map

        h = self._run(self.mid1, h, emb, c, m)
        h = self._run(self.mid2, h, emb, c, m)
        return h, skips, emb


class UNet(UNetEncoder):
    """A DDPM-style U-Net: `model(x_t, t)` returns a tensor shaped like x_t; a text-conditioned one
    (config.context_dim set) is called as `model(x_t, t, context, context_mask)` (the inputs' checks:
    course_lib.denoiser). The way down and the middle are UNetEncoder's; the way up is here."""

    def __init__(self, config: UNetConfig | None = None, **changes):
        super().__init__(config, **changes)
        cfg, ch = self.config, self.config.channels
        skip_channels = list(self.skip_channels)

        # Up: mirror image; each Block first concatenates the matching skip from the way down (the last one kept
        # is the first used). With sd_skips there is one more Block per level, for the extra skips.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        c_in = ch[-1]
        for level in reversed(range(cfg.levels)):
            c = ch[level]
            blocks = nn.ModuleList()
            for i in range(cfg.blocks_per_level + int(cfg.sd_skips)):
                blocks.append(Block((c_in if i == 0 else c) + skip_channels.pop(), c, cfg, cfg.attention[level]))
            self.up.append(blocks)
            c_in = c
            self.upsample.append(nn.Identity() if level == 0 else Upsample(c))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, skip_residuals: list[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) or a scalar; for a conditional U-Net context (B, L, context_dim)
        and optionally context_mask (B, L) bool, True at real tokens. skip_residuals (one per skip, shaped like
        it) and mid_residual are added to the skips and the middle's output: a ControlNet's (course_lib.controlnet)."""
        h, skips, emb = self.encode(x, t, context, context_mask)
        if skip_residuals is not None:
            if len(skip_residuals) != len(skips):
                raise ValueError(f"skip_residuals needs one tensor per skip ({len(skips)}); got {len(skip_residuals)}")
            skips = [s + r for s, r in zip(skips, skip_residuals)]
        if mid_residual is not None:
            h = h + mid_residual

        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
            h = up(h)

        return self.conv_out(F.silu(self.norm_out(h)))
