r"""The U-Net that predicts the noise: time embedding, ResBlocks, attention, and the U itself.

The network takes a noisy image x_t and its timestep t and returns a tensor of the same shape
(the predicted noise, clean image or v, depending on how it is trained; see course_lib.forward).

    t  --sinusoids--> MLP --> emb  (one vector per image, fed to every ResBlock)

    x_t -> conv_in -> [ResBlock (+Attention)] x n -> Downsample ---------------------------> ...
                          |  skip                                                          |
                          v                                                                 v
    out <- conv_out <- [cat(h, skip) -> ResBlock (+Attention)] x n <- Upsample <- ... <- middle

Pieces (each a few lines below):
    timestep_embedding   sinusoids of t at geometric frequencies (Vaswani et al. 2017; Ho et al. 2020)
    ResBlock             GroupNorm -> SiLU -> conv -> add time (scale-and-shift or addition) -> GroupNorm
                         -> SiLU -> conv, plus a residual path (He et al. 2016)
    SelfAttention        multi-head self-attention over the H*W positions, with
                         torch.nn.functional.scaled_dot_product_attention
    Downsample/Upsample  a stride-2 conv; nearest-neighbour x2 then a conv
    UNet                 the U: the skip connections are a plain Python list in `forward`

The layout follows DDPM (Ho et al. 2020, arXiv 2006.11239) with the scale-and-shift time conditioning
of Dhariwal & Nichol 2021 (arXiv 2105.05233). `UNetConfig` is the whole description of a network;
`PRESETS` names the sizes the course uses and `preset_table()` counts their parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

TIME_CONDITIONING = ("scale_shift", "add")


@dataclass(frozen=True)
class UNetConfig:
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
            if (attend or level == len(self.channels) - 1) and c % self.head_channels:
                raise ValueError(f"levels with attention (and the last level) need channels divisible by "
                                 f"head_channels={self.head_channels}; got {c} at level {level}")
        if self.time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"unknown time_conditioning {self.time_conditioning!r}; valid are "
                             f"{', '.join(TIME_CONDITIONING)}")
        if self.channels[0] % 2:
            raise ValueError(f"channels[0] sets the time embedding's width and must be even; got {self.channels[0]}")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be at least 1; got {self.blocks_per_level}")
        self.check_size(self.image_size)

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def time_channels(self) -> int:
        return 4 * self.channels[0]

    def check_size(self, size: int, what: str = "image_size") -> None:
        factor = 2 ** (self.levels - 1)
        if size < factor or size % factor:
            raise ValueError(f"{what} must be a multiple of {factor} (this U-Net halves the resolution "
                             f"{self.levels - 1} times); got {size}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        return cls(**json.loads(text))

    def replace(self, **changes) -> "UNetConfig":
        return dataclasses.replace(self, **changes)


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


def get_preset(name: str, **changes) -> UNetConfig:
    """A named config, optionally with fields changed (e.g. get_preset("small", image_size=16))."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; valid are {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def preset_table() -> list[dict]:
    """One row per preset: name, channels, blocks, attention levels and parameter count (counted, not typed)."""
    rows = []
    with torch.random.fork_rng():          # building models draws random weights; leave the caller's RNG alone
        for name, cfg in PRESETS.items():
            rows.append({"preset": name, "channels": cfg.channels, "blocks_per_level": cfg.blocks_per_level,
                         "attention": cfg.attention, "parameters": count_parameters(UNet(cfg))})
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
        return self.mlp(timestep_embedding(t, self.base_channels))


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


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, for (B, heads, N, d) tensors. SDPA computes the same thing
    without storing the N x N matrix when it can (flash / memory-efficient kernels)."""
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual path."""

    def __init__(self, channels: int, head_channels: int = 32, norm_groups: int = 8):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"channels ({channels}) must be divisible by head_channels ({head_channels})")
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, naive: bool = False) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                        # (B, N, C), N = H*W
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        q, k, v = (z.reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        h = naive_attention(q, k, v) if naive else F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(B, H * W, C)                              # heads back together
        return x + self.out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One ResBlock, optionally followed by self-attention: the unit the U is built from."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, cfg.time_channels, cfg.norm_groups,
                            cfg.time_conditioning, cfg.dropout)
        self.attn = SelfAttention(out_channels, cfg.head_channels, cfg.norm_groups) if attend else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    """A DDPM-style U-Net: `model(x_t, t)` returns a tensor shaped like x_t."""

    def __init__(self, config: UNetConfig | None = None, **changes):
        super().__init__()
        cfg = config or UNetConfig()
        cfg = cfg.replace(**changes) if changes else cfg
        self.config = cfg
        ch = cfg.channels
        self.time_embed = TimeEmbedding(ch[0], cfg.time_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Down: at each level, blocks_per_level Blocks (each leaves a skip), then halve the resolution.
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_in = ch[0]
        for level, c in enumerate(ch):
            self.down.append(nn.ModuleList(
                Block(c_in if i == 0 else c, c, cfg, cfg.attention[level]) for i in range(cfg.blocks_per_level)))
            c_in = c
            last = level == cfg.levels - 1
            self.downsample.append(nn.Identity() if last else Downsample(c))

        # Middle, at the lowest resolution: ResBlock, attention, ResBlock.
        self.mid1 = Block(ch[-1], ch[-1], cfg, attend=True)
        self.mid2 = Block(ch[-1], ch[-1], cfg, attend=False)

        # Up: mirror image; each Block first concatenates the matching skip from the way down.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        c_in = ch[-1]
        for level in reversed(range(cfg.levels)):
            c = ch[level]
            self.up.append(nn.ModuleList(
                Block((c_in if i == 0 else c) + c, c, cfg, cfg.attention[level]) for i in range(cfg.blocks_per_level)))
            c_in = c
            self.upsample.append(nn.Identity() if level == 0 else Upsample(c))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _run(self, block: Block, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def check_input(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        cfg = self.config
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor (images scaled to [-1, 1]); got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}")
        cfg.check_size(x.shape[2], "image height")
        cfg.check_size(x.shape[3], "image width")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be one timestep per image, shape ({x.shape[0]},); got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        t = self.check_input(x, t)
        emb = self.time_embed(t)
        h = self.conv_in(x)

        skips = []                                        # the U's skip connections, in plain sight
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = self._run(block, h, emb)
                skips.append(h)
            h = down(h)

        h = self._run(self.mid1, h, emb)
        h = self._run(self.mid2, h, emb)

        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)

        return self.conv_out(F.silu(self.norm_out(h)))
