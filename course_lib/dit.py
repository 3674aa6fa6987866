r"""The diffusion transformer (DiT): a noisy image as a sequence of patches through adaLN-Zero transformer blocks.

    x_t (B, C, H, W) --patchify--> (B, N, p*p*C) --Linear--> + 2-D sin-cos positions --> tokens (B, N, width)
                                                              N = (H/p)(W/p) patches of p x p values
    t --sinusoids--> MLP --> c (B, width)   (+ the pooled text, projected, for a text-conditioned DiT)
    tokens --[DiTBlock(tokens, c)] x depth--> FinalLayer(tokens, c) --unpatchify--> output (B, C_out, H, W)

A DiT (Peebles & Xie 2023 [1]) replaces the U-Net's convolutions by a plain transformer over patches; the only
image-shaped things left are `patchify` and `unpatchify`, and the 2-D positions the tokens carry (`sincos_2d`, a
fixed table as in [1] and SD 3 [2]: a larger input than the table was built for is refused, a smaller one takes
the table's centre, as SD 3 crops it).

adaLN-Zero ([1], Sec. 3.2). The conditioning vector c enters every block through its layer norms: one Linear on
SiLU(c) regresses, per block, a shift beta, a scale gamma and a gate alpha for the attention and for the MLP:

    Notation: x the tokens (B, N, width); c (B, width); LN a LayerNorm without its own weights;
              modulate(h, beta, gamma) = h (1 + gamma) + beta.
    1. (beta1, gamma1, alpha1, beta2, gamma2, alpha2) = Linear(SiLU(c))                        (6 x (B, 1, width))
    2. x = x + alpha1 * Attention(modulate(LN(x), beta1, gamma1))
    3. x = x + alpha2 * MLP(modulate(LN(x), beta2, gamma2))

The Linear of step 1 starts at zero ("-Zero"): every gate alpha is 0, so each block is exactly the identity at
initialisation, and the final layer's Linear starts at zero too, so a new DiT predicts exactly 0 ([1] found this
best of the conditioning schemes it tried). The attention may RMS-normalise each head's queries and keys first
(`qk_norm`, SD 3 [2], Sec. 5.3.2: it keeps the attention logits from growing in mixed precision).

Conditioning. The time enters as the U-Net's does (course_lib.unet.TimeEmbedding: sinusoids of t, then an MLP;
the same t convention, course_lib.denoiser). This DiT has no class labels: it is unconditional, or, with
context_dim set, conditioned on the text through c alone: c = time embedding + `TextPool(context, mask)`, the
masked mean of the text states through Linear -> SiLU -> Linear. That is a single vector per prompt, where SD 3
uses CLIP's pooled output (the text encoder's final state at the end token, projected into CLIP's joint space by
its contrastively trained projection; SD 3 concatenates those of two CLIPs). The course's mini CLIP gives token
states only, so the pooling is done here and learnt with the denoiser. The pooled vector carries the gist of a
prompt, not its tokens: the tokens themselves enter SD 3's MMDiT (course_lib.mmdit), which reuses every piece here.

References:
  [1] Peebles, Xie 2023, Scalable Diffusion Models with Transformers. https://arxiv.org/abs/2212.09748
  [2] Esser et al. 2024, Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (SD 3).
      https://arxiv.org/abs/2403.03206
  [3] Zhang, Sennrich 2019, Root Mean Square Layer Normalization. https://arxiv.org/abs/1910.07467
  [4] Vaswani et al. 2017, Attention Is All You Need (the sinusoids). https://arxiv.org/abs/1706.03762
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attend
from .checks import check_choice, check_int
from .config import JSONConfig
from .denoiser import Denoiser
from .unet import TimeEmbedding

NORM_EPS = 1e-6           # every LayerNorm and RMSNorm here (DiT's and SD 3's)


@dataclass(frozen=True)
class DiTConfig(JSONConfig):
    """Everything that defines a DiT. image_size sets the positional table (image_size / patch_size patches a side),
    so it is the largest input the network takes; any multiple of patch_size up to it works."""
    image_size: int = 8                 # side of the largest input (a VAE latent: 8 for 32 px emoji)
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2                 # a token is a patch_size x patch_size patch of every channel
    width: int = 128                    # the tokens' width (DiT's hidden size)
    depth: int = 4                      # transformer blocks
    heads: int = 4                      # attention heads; width must be divisible by heads
    mlp_ratio: int = 4                  # the MLP's hidden width, in widths
    time_frequencies: int = 256         # sinusoids of t fed to the time MLP (DiT's and SD 3's 256)
    context_dim: int | None = None      # width of the text states; None: unconditional
    qk_norm: bool = False               # RMSNorm on each head's queries and keys (the MMDiT's default: True)

    def __post_init__(self):
        for name in ("image_size", "in_channels", "out_channels", "patch_size", "width", "depth", "heads",
                     "mlp_ratio", "time_frequencies"):
            check_int(name, getattr(self, name), 1)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size}): "
                             f"the positional table holds image_size / patch_size patches a side")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads}): each head takes "
                             f"width / heads channels")
        if self.width % 4:
            raise ValueError(f"width must be divisible by 4 (the 2-D sin-cos positions give a quarter of it to the "
                             f"sines and cosines of each axis); got {self.width}")
        if self.time_frequencies % 2:
            raise ValueError(f"time_frequencies must be even (a cosine and a sine each); got {self.time_frequencies}")
        if self.context_dim is not None:
            check_int("context_dim", self.context_dim, 1, hint=" (the text encoder's width) or None")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be True or False (RMSNorm on queries and keys); got {self.qk_norm!r}")

    @property
    def grid(self) -> int:
        """Patches a side of the positional table."""
        return self.image_size // self.patch_size

    @property
    def conditional(self) -> bool:
        return self.context_dim is not None

    def check_size(self, size: int, what: str = "image_size") -> None:
        if size < self.patch_size or size % self.patch_size:
            raise ValueError(f"{what} must be a multiple of patch_size={self.patch_size} (the transformer cuts the "
                             f"input into {self.patch_size}x{self.patch_size} patches); got {size}")


# Latent-space DiTs for the 4x8x8 latents of 32 px emoji (16 tokens of 2x2 patches), text through the pooled vector.
DIT_PRESETS: dict[str, DiTConfig] = {
    "dit_tiny": DiTConfig(width=64, depth=2, heads=4, context_dim=64),       # 0.19M params; tests, quick mode
    "dit_small": DiTConfig(width=128, depth=6, heads=4, context_dim=128),    # 1.90M params
}


def named_config(presets: dict[str, DiTConfig], name: str, what: str, **changes) -> DiTConfig:
    """presets[name] with fields changed; an unknown name is refused, listing the known ones."""
    check_choice(what, name, tuple(presets))
    return presets[name].replace(**changes)


def dit_preset(name: str, **changes) -> DiTConfig:
    """A named config of DIT_PRESETS, optionally with fields changed (dit_preset("dit_tiny", context_dim=None))."""
    return named_config(DIT_PRESETS, name, "DiT preset", **changes)


# --- images as sequences ------------------------------------------------------------------------------

def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): row-major p x p patches (N = (H/p)(W/p)), each its values (p1, p2, c)-ordered."""
    if x.ndim != 4 or x.shape[2] % patch_size or x.shape[3] % patch_size:
        raise ValueError(f"patchify needs (B, C, H, W) with H and W multiples of patch_size={patch_size}; "
                         f"got {tuple(x.shape)}")
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, rows * cols, p*p*C) -> (B, C, rows * p, cols * p)."""
    if tokens.ndim != 3 or tokens.shape[1] != rows * cols or tokens.shape[2] % patch_size ** 2:
        raise ValueError(f"unpatchify needs (B, rows * cols, p*p*C) = (B, {rows * cols}, a multiple of "
                         f"{patch_size ** 2}); got {tuple(tokens.shape)}")
    return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=rows, w=cols, p1=patch_size, p2=patch_size)


def sincos_2d(dim: int, rows: int, cols: int, max_period: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D positions (rows * cols, dim), row-major: the token at row r, column c gets
    [sin(c w), cos(c w), sin(r w), cos(r w)], w_k = max_period^(-k / (dim/4)), k < dim / 4 (MAE's and DiT's table;
    the sinusoids of Vaswani et al. [4] along each axis). Computed in float64, returned in float32."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a width divisible by 4; got {dim}")
    quarter = dim // 4
    freqs = max_period ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs                                  # (rows * cols, dim / 4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.cat([axis(c), axis(r)], dim=1).float()


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of the text states (B, L, D) over the real tokens (mask (B, L), True at real tokens; None: all):
    (B, D). Padding gets weight exactly 0, so what it holds changes nothing."""
    if mask is None:
        return context.mean(dim=1)
    weights = mask.to(context.dtype)[..., None]                              # (B, L, 1)
    return (context * weights).sum(dim=1) / weights.sum(dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's x (1 + scale) + shift: a layer norm's affine weights regressed from the conditioning."""
    return x * (1 + scale) + shift


# --- the pieces -----------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """patchify, a Linear to the tokens' width (DiT's stride-p convolution, written as what it is), plus each
    patch's position from the fixed `sincos_2d` table (a buffer, never trained and not saved)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.patch_size, self.grid, self.image_size = cfg.patch_size, cfg.grid, cfg.image_size
        self.proj = nn.Linear(cfg.patch_size ** 2 * cfg.in_channels, cfg.width)
        self.register_buffer("table", sincos_2d(cfg.width, cfg.grid, cfg.grid), persistent=False)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """(rows * cols, width): the table's centre rows x cols patches (SD 3's crop); a larger grid is refused."""
        G = self.grid
        if rows > G or cols > G:
            raise ValueError(f"the positional table holds {G}x{G} patches (config.image_size {self.image_size} / "
                             f"patch_size {self.patch_size}); this input needs {rows}x{cols} ({rows * self.patch_size}"
                             f"x{cols * self.patch_size} values): build the transformer with image_size >= "
                             f"{max(rows, cols) * self.patch_size}")
        top, left = (G - rows) // 2, (G - cols) // 2
        return self.table.view(G, G, -1)[top:top + rows, left:left + cols].reshape(rows * cols, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape                          # batch, channels, height, width
        p = self.patch_size
        return self.proj(patchify(x, p)) + self.positions(H // p, W // p).to(x.dtype)   # (B, N, width)


class TextPool(nn.Module):
    """One vector per prompt: the masked mean of the text states, through Linear -> SiLU -> Linear (the shape of
    SD 3's projection of CLIP's pooled output; the pooling is ours, see the module's docstring)."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(context_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(masked_mean(context, mask))                          # (B, width)


class Modulation(nn.Module):
    """adaLN-Zero's regression: Linear(SiLU(c)) -> n tensors (B, 1, width) (shifts, scales, gates), zero at init."""

    def __init__(self, width: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(width, n * width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c))[:, None, :].chunk(self.n, dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019 [3]): QK-norm's normaliser."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT and SD 3) -> Linear, hidden width ratio * width."""

    def __init__(self, width: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """An adaLN-Zero transformer block (the module's docstring, steps 1-3), in two halves that an MMDiT block
    (course_lib.mmdit) calls on each of its streams around one joint attention: `attention_inputs` (step 1 and
    the queries, keys and values of step 2) and `after_attention` (the rest). pre_only: the first half alone
    (SD 3's last text stream, whose output nobody reads): only a shift and a scale, no output projection, no MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, qk_norm: bool = False, pre_only: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.modulation = Modulation(width, 2 if pre_only else 6)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width // heads) if qk_norm else nn.Identity()
        if not pre_only:
            self.out = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
            self.mlp = MLP(width, mlp_ratio)

    def attention_inputs(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          tuple[torch.Tensor, ...]]:
        """(q, k, v), each (B, heads, N, d), from modulate(LN(x), beta1, gamma1); and the rest of the block's
        modulation (alpha1, beta2, gamma2, alpha2) for `after_attention`."""
        shift, scale, *rest = self.modulation(c)
        q, k, v = rearrange(self.qkv(modulate(self.norm1(x), shift, scale)), "b n (three heads d) -> three b heads n d",
                            three=3, heads=self.heads)
        return self.q_norm(q), self.k_norm(k), v, tuple(rest)

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor, rest: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Steps 2 and 3 after the attention: gated residuals of the attention's output and of the MLP."""
        gate1, shift2, scale2, gate2 = rest
        x = x + gate1 * self.out(rearrange(attended, "b heads n d -> b n (heads d)"))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, width) tokens, c (B, width) the conditioning vector."""
        q, k, v, rest = self.attention_inputs(x, c)
        return self.after_attention(x, attend(q, k, v), rest)

    def extra_repr(self) -> str:
        return f"heads={self.heads}" + (", pre_only" if self.pre_only else "")


class FinalLayer(nn.Module):
    """adaLN (a shift and a scale from c, no gate) then a Linear to each patch's values; both start at zero, so
    a new network predicts exactly 0."""

    def __init__(self, width: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.modulation = Modulation(width, 2)
        self.linear = nn.Linear(width, patch_values)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)
        return self.linear(modulate(self.norm(x), shift, scale))              # (B, N, p*p*C_out)


class DiT(Denoiser):
    """A diffusion transformer, drop-in for the U-Net: `model(x_t, t)` (or `model(x_t, t, context, context_mask)`
    with config.context_dim set) returns a tensor shaped like x_t.

    forward = the conditioning vector c (`conditioning`), then `backbone(x_t, c)`: patches in, `run_blocks`, the
    final layer, patches out. course_lib.mmdit.MMDiT changes the blocks only."""

    kind, example = "DiT", "dit_preset('dit_tiny')"

    def __init__(self, config: DiTConfig | None = None, **changes):
        super().__init__()
        cfg = config or DiTConfig()
        self.config = cfg = cfg.replace(**changes) if changes else cfg
        self.time_embed = TimeEmbedding(cfg.time_frequencies, cfg.width)
        self.text_pool = TextPool(cfg.context_dim, cfg.width) if cfg.conditional else None
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(self.block(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(cfg.width, cfg.patch_size ** 2 * cfg.out_channels)

    def block(self, cfg: DiTConfig, index: int) -> nn.Module:
        """Block `index` of the stack: here a DiTBlock."""
        return DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)

    @property
    def input_weight(self) -> torch.Tensor:
        return self.patch_embed.proj.weight

    def conditioning(self, t: torch.Tensor, context: torch.Tensor | None = None,
                     context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """c (B, width): the time embedding, plus the pooled text for a text-conditioned network."""
        c = self.time_embed(t)
        return c if self.text_pool is None else c + self.text_pool(context, context_mask)

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None,
                   context_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, c)
        return h

    def backbone(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                 context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after the conditioning vector c (B, width): x (B, C, H, W) -> tokens -> blocks -> patches."""
        B, C, H, W = x.shape                          # batch, channels, height, width
        p = self.config.patch_size
        h = self.patch_embed(x)                       # (B, N, width), N = (H/p)(W/p)
        h = self.run_blocks(h, c, context, context_mask)
        return unpatchify(self.final(h, c), p, H // p, W // p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) or a scalar; for a conditional network context (B, L, context_dim)
        and optionally context_mask (B, L) bool, True at real tokens."""
        t = self.check_input(x, t)
        self.check_context(x, context, context_mask)
        return self.backbone(x, self.conditioning(t, context, context_mask), context, context_mask)


__all__ = ["DiTConfig", "DIT_PRESETS", "named_config", "dit_preset", "patchify", "unpatchify", "sincos_2d",
           "masked_mean", "modulate", "PatchEmbed", "TextPool", "Modulation", "RMSNorm", "MLP", "DiTBlock", "FinalLayer", "DiT"]
