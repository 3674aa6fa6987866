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
    CrossAttention, FeedForward, TransformerBlock, SpatialTransformer
                         text conditioning, used in place of SelfAttention when context_dim is set (below)
    UNet                 the U: the skip connections are a plain Python list in `forward`

The layout follows DDPM (Ho et al. 2020, arXiv 2006.11239) with the scale-and-shift time conditioning
of Dhariwal & Nichol 2021 (arXiv 2105.05233). `UNetConfig` is the whole description of a network;
`PRESETS` names the pixel-space sizes the course uses, `SD_PRESETS` the text-conditioned latent ones,
and `preset_table()` counts their parameters.

Conditioning on text (Stable Diffusion; Rombach et al. 2022, arXiv 2112.10752, Sec. 3.3 and Fig. 3).
A text encoder turns a prompt into L token states, the context c of shape (B, L, D). With
`UNetConfig(context_dim=D)` every attention layer of the U becomes a SpatialTransformer, where each image
position can look at every text token:

    x (B, C, H, W) -> GroupNorm -> 1x1 conv (proj_in) -> tokens (B, H*W, C)
        -> [TransformerBlock] x transformer_depth -> back to (B, C, H, W) -> 1x1 conv (proj_out) -> + x

    TransformerBlock, pre-LayerNorm, each part with a residual path (SD's BasicTransformerBlock):
        h = h + SelfAttention(LayerNorm(h))          image tokens attend to each other
        h = h + CrossAttention(LayerNorm(h), c)      ... and to the text: Q from h, K and V from c
        h = h + FeedForward(LayerNorm(h))            GEGLU (Shazeer 2020, arXiv 2002.05202)

    CrossAttention:  Q = h W_q (B, N, C),  K = c W_k,  V = c W_v (B, L, C),
                     out = softmax(Q K^T / sqrt(d) + M) V,   M = 0 at real tokens, -inf at padding
    (per head, d = head_channels). The mask (B, L), True at real tokens, keeps padding out of the softmax,
    so what a padded prompt produces does not depend on what the padding holds.

Stable Diffusion's own U-Net (course_lib.sd) is this network with three settings: `num_heads=8` (a fixed
number of heads, so wider levels get wider heads), `time_conditioning="add"`, and `sd_skips=True`: conv_in's
output and every downsampled map are kept as skips too, and each level on the way up has one more Block to
use them (for SD 1.5: 12 skips, 3 Blocks per level going up).

proj_out starts at zero, so a new SpatialTransformer is the identity and training begins from the plain
ResBlock path. The context is the same at every timestep and every level; the timestep still enters through
the ResBlocks. `UNet(x_t, t, context, context_mask)`; an unconditional U-Net (context_dim=None, the
default) is exactly the DDPM network above and takes no context.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
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
            if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
                raise ValueError(f"num_heads must be a positive int (or None to use head_channels); "
                                 f"got {self.num_heads!r}")
            bad = [c for c in self.channels if c % self.num_heads]
            if bad:
                raise ValueError(f"num_heads={self.num_heads} must divide every level's channels; "
                                 f"got channels={self.channels}")
        if self.time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"unknown time_conditioning {self.time_conditioning!r}; valid are "
                             f"{', '.join(TIME_CONDITIONING)}")
        if self.channels[0] % 2:
            raise ValueError(f"channels[0] sets the time embedding's width and must be even; got {self.channels[0]}")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be at least 1; got {self.blocks_per_level}")
        if self.context_dim is not None and (isinstance(self.context_dim, bool) or not isinstance(self.context_dim, int)
                                             or self.context_dim < 1):
            raise ValueError(f"context_dim must be a positive int (the text encoder's width) or None for an "
                             f"unconditional U-Net; got {self.context_dim!r}")
        if isinstance(self.transformer_depth, bool) or not isinstance(self.transformer_depth, int) \
                or self.transformer_depth < 1:
            raise ValueError(f"transformer_depth must be an int of at least 1; got {self.transformer_depth!r}")
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
        # An unconditional config leaves out the conditioning fields at their defaults, so it reads as it
        # did before they existed.
        skip = [f for f in ("num_heads", "sd_skips") if getattr(self, f) == UNetConfig.__dataclass_fields__[f].default]
        if not self.conditional:
            skip += [f for f in ("context_dim", "transformer_depth")
                     if getattr(self, f) == UNetConfig.__dataclass_fields__[f].default]
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name not in skip)
        return f"UNetConfig({fields})"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        """The inverse of to_json. Fields added since a file was written take their defaults, so older
        files (written before context_dim existed) load as the unconditional U-Nets they are."""
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

# Text-conditioned latent U-Nets (notebooks 07 and 09): they denoise 4-channel VAE latents (8x8 for 32 px
# emoji) and cross-attend to text states of width context_dim. Kept apart from PRESETS, whose entries all
# take 3-channel images and no context (notebook 03 loops over them).
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
    if name not in presets:
        raise ValueError(f"unknown U-Net preset {name!r}; valid are {', '.join(presets)}")
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


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, for q (B, heads, N_q, d) and k, v (B, heads, N_k, d). SDPA
    computes the same thing without storing the N_q x N_k matrix when it can (flash / memory-efficient kernels).

    mask: optional bool, broadcastable to (B, heads, N_q, N_k), True where a query may attend to a key (SDPA's
    convention for a bool attn_mask). Masked scores become -inf, so they get weight exactly 0 after the
    softmax; every query needs at least one key it may attend to, or its row is 0/0 = NaN."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])               # (B, heads, N_q, N_k)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True: attend); got dtype {mask.dtype}")
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual path."""

    def __init__(self, channels: int, head_channels: int = 32, norm_groups: int = 8, eps: float = 1e-5):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"channels ({channels}) must be divisible by head_channels ({head_channels})")
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(norm_groups, channels, eps=eps)
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


class CrossAttention(nn.Module):
    r"""Multi-head attention from image tokens x (B, N, C) to context tokens c (B, L, D), e.g. text states.

        Q = x W_q,  K = c W_k,  V = c W_v          (no biases, as in SD; K and V map D -> C)
        out = W_out concat_heads(softmax(Q K^T / sqrt(d) + M) V),    d = head_channels

    M is 0 where mask (B, L) is True (a real token) and -inf at padding. With context=None it is plain
    self-attention over x (the first attention of a TransformerBlock; then context_dim must equal query_dim).
    There is no norm and no residual here: TransformerBlock adds both."""

    def __init__(self, query_dim: int, context_dim: int, head_channels: int = 32):
        super().__init__()
        if query_dim % head_channels:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by head_channels ({head_channels})")
        self.heads = query_dim // head_channels
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                naive: bool = False) -> torch.Tensor:
        context = x if context is None else context
        B, N, C = x.shape              # batch, image tokens, channels
        L = context.shape[1]           # context tokens
        q = rearrange(self.to_q(x), "b n (heads d) -> b heads n d", heads=self.heads)
        k = rearrange(self.to_k(context), "b l (heads d) -> b heads l d", heads=self.heads)
        v = rearrange(self.to_v(context), "b l (heads d) -> b heads l d", heads=self.heads)
        attn_mask = None
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, True at real tokens; got dtype {mask.dtype}")
            if mask.shape != (B, L):
                raise ValueError(f"mask must have shape (B, L) = ({B}, {L}); got {tuple(mask.shape)}")
            attn_mask = mask[:, None, None, :]                                   # (B, 1, 1, L): every head, every query
        if naive:
            h = naive_attention(q, k, v, attn_mask)
        else:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)     # (B, heads, N, d)
        return self.to_out(rearrange(h, "b heads n d -> b n (heads d)"))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020, arXiv 2002.05202), as in SD: [a, g] = proj(x), out(a * GELU(g)).

    The gate g decides, per channel, how much of a passes; inner width mult * dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = mult * dim
        self.proj = nn.Linear(dim, 2 * inner)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(a * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, and a GEGLU feed-forward, each added to
    the tokens (SD's BasicTransformerBlock; Rombach et al. 2022, Fig. 3)."""

    def __init__(self, dim: int, context_dim: int, head_channels: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, head_channels)              # self-attention (context = tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, head_channels)      # cross-attention to the text
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("TransformerBlock needs a context (B, L, context_dim) to cross-attend to")
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A feature map as H*W tokens through `depth` TransformerBlocks, with a residual path (Rombach et al. 2022):
    GroupNorm -> 1x1 conv -> tokens -> blocks -> feature map -> 1x1 conv (zero at init) -> + x."""

    def __init__(self, channels: int, context_dim: int, head_channels: int = 32, depth: int = 1,
                 norm_groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)           # SD's eps
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, head_channels, dropout)
                                    for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)      # a new transformer adds nothing: x passes through unchanged
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape                      # batch, channels, height, width
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")   # (B, H*W, C)
        for block in self.blocks:
            h = block(h, context, mask)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


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


class UNet(nn.Module):
    """A DDPM-style U-Net: `model(x_t, t)` returns a tensor shaped like x_t; a text-conditioned one
    (config.context_dim set) is called as `model(x_t, t, context, context_mask)`."""

    def __init__(self, config: UNetConfig | None = None, **changes):
        super().__init__()
        cfg = config or UNetConfig()
        cfg = cfg.replace(**changes) if changes else cfg
        self.config = cfg
        ch = cfg.channels
        self.time_embed = TimeEmbedding(ch[0], cfg.time_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Down: at each level, blocks_per_level Blocks (each leaves a skip), then halve the resolution.
        # skip_channels follows the skips forward will keep, so the way up knows what it concatenates.
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
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

        # Middle, at the lowest resolution: ResBlock, attention (a SpatialTransformer if conditional), ResBlock.
        self.mid1 = Block(ch[-1], ch[-1], cfg, attend=True)
        self.mid2 = Block(ch[-1], ch[-1], cfg, attend=False)

        # Up: mirror image; each Block first concatenates the matching skip from the way down (the last one kept
        # is the first used). With sd_skips there is one more Block per level, for the extra skips.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
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

    def _run(self, block: Block, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
             context_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False)
        return block(h, emb, context, context_mask)

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

    def check_context(self, x: torch.Tensor, context: torch.Tensor | None,
                      context_mask: torch.Tensor | None) -> None:
        """A conditional U-Net needs context (B, L, context_dim) and takes an optional bool mask (B, L) with at
        least one True per row; an unconditional one takes neither."""
        D = self.config.context_dim
        if D is None:
            if context is not None or context_mask is not None:
                raise ValueError("this U-Net is unconditional (config.context_dim is None) and takes no context; "
                                 "build one with context_dim set (e.g. get_preset('sd_tiny')) to condition on text")
            return
        B = x.shape[0]
        if context is None:
            raise ValueError(f"this U-Net is text-conditioned (context_dim={D}): pass context, the text encoder's "
                             f"states, shape (B, L, {D}) = ({B}, tokens, {D}); for an unconditional prediction "
                             f"pass the empty prompt's states")
        if not isinstance(context, torch.Tensor) or not context.is_floating_point():
            raise TypeError(f"context must be a float tensor of shape ({B}, L, {D}); got "
                            f"{context.dtype if isinstance(context, torch.Tensor) else type(context).__name__}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != D:
            raise ValueError(f"context must have shape (B, L, context_dim) = ({B}, L, {D}), one row of text states "
                             f"per image; got {tuple(context.shape)}")
        if context_mask is not None:
            if not isinstance(context_mask, torch.Tensor) or context_mask.dtype != torch.bool:
                raise TypeError(f"context_mask must be a bool tensor, True at real tokens and False at padding; "
                                f"got {getattr(context_mask, 'dtype', type(context_mask).__name__)}")
            if context_mask.shape != context.shape[:2]:
                raise ValueError(f"context_mask must have shape (B, L) = {tuple(context.shape[:2])}, like context's "
                                 f"first two axes; got {tuple(context_mask.shape)}")
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError("every row of context_mask needs at least one True (a real token): a prompt of "
                                 "padding only leaves cross-attention nothing to attend to")

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) or a scalar; for a conditional U-Net context (B, L, context_dim)
        and optionally context_mask (B, L) bool, True at real tokens."""
        t = self.check_input(x, t)
        self.check_context(x, context, context_mask)
        c, m = context, context_mask                      # the same text states go to every attention layer
        emb = self.time_embed(t)
        h = self.conv_in(x)

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

        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, c, m)
            h = up(h)

        return self.conv_out(F.silu(self.norm_out(h)))
