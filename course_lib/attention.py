r"""Attention for the U-Net: self-attention over a feature map (notebook 03) and the text-conditioning
transformer of Stable Diffusion (notebook 09).

Pieces, bottom-up:
    naive_attention     softmax(Q K^T / sqrt(d) + M) V written out (Vaswani et al. 2017, Eq. 1 [1]); the layers
                        below call torch's scaled_dot_product_attention (SDPA), which computes the same thing
                        without storing the N_q x N_k matrix when it can, and take naive=True to compare
    check_context       what text states (B, L, D) and their padding mask (B, L) must be (the U-Net checks them)
    SelfAttention       multi-head self-attention over the H*W positions of a feature map, with GroupNorm and a
                        residual path: the attention of the unconditional U-Net (course_lib.unet) and of the VAE
    CrossAttention      attention from image tokens to context tokens (the text), with a padding mask
    FeedForward         GEGLU (Shazeer 2020 [3])
    TransformerBlock    self-attention, cross-attention, feed-forward, each pre-LayerNorm with a residual path
    SpatialTransformer  a feature map as tokens through TransformerBlocks and back (Rombach et al. 2022 [2])
    sliced_attention    a block inside which every layer above attends `size` (batch x head) pairs at a time

Attention in slices (memory: the 8 GB budget). softmax(Q K^T / sqrt(d)) V is independent for each image
and each head, so it can be computed for a few (image, head) pairs at a time and concatenated: the same numbers
(exactly, up to float summation order), in more, smaller calls. With FlashAttention or the memory-efficient kernel
the scores are never stored and slicing saves nothing; with the plain ("math") kernel, all a T4 has for some
shapes, the scores of every pair are held at once, B x heads x N_q x N_k numbers (SD 1.5 at 512 px: 2 x 8 x 4,096
x 4,096 in float16, 512 MiB per layer), and slicing holds size x N_q x N_k instead (diffusers'
enable_attention_slicing does the same).

Conditioning on text ([2], Sec. 3.3 and Fig. 3). A text encoder turns a prompt into L token states, the context
c of shape (B, L, D). With `UNetConfig(context_dim=D)` every attention layer of the U becomes a
SpatialTransformer, where each image position can look at every text token:

    x (B, C, H, W) -> GroupNorm -> 1x1 conv (proj_in) -> tokens (B, H*W, C)
        -> [TransformerBlock] x transformer_depth -> back to (B, C, H, W) -> 1x1 conv (proj_out) -> + x

    TransformerBlock, pre-LayerNorm, each part with a residual path (SD's BasicTransformerBlock):
        h = h + SelfAttention(LayerNorm(h))          image tokens attend to each other
        h = h + CrossAttention(LayerNorm(h), c)      ... and to the text: Q from h, K and V from c
        h = h + FeedForward(LayerNorm(h))            GEGLU

    CrossAttention:  Q = h W_q (B, N, C),  K = c W_k,  V = c W_v (B, L, C),
                     out = softmax(Q K^T / sqrt(d) + M) V,   M = 0 at real tokens, -inf at padding
    (per head, d = head_channels). The mask (B, L), True at real tokens, keeps padding out of the softmax,
    so what a padded prompt produces does not depend on what the padding holds.

proj_out starts at zero, so a new SpatialTransformer is the identity and training begins from the plain
ResBlock path. The context is the same at every timestep and every level; the timestep still enters through
the U-Net's ResBlocks.

References:
  [1] Vaswani et al. 2017, Attention Is All You Need. https://arxiv.org/abs/1706.03762
  [2] Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models.
      https://arxiv.org/abs/2112.10752
  [3] Shazeer 2020, GLU Variants Improve Transformer. https://arxiv.org/abs/2002.05202
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_int, has_values

_slice_size: int | None = None          # set by `sliced_attention`; None: every (image, head) pair at once


@contextlib.contextmanager
def sliced_attention(size: int | None):
    """Within the block, every SelfAttention and CrossAttention computes `size` (batch x head) pairs at a time
    (None: all at once, the default). Exact; it trades memory of the math kernel's scores for more kernel calls."""
    global _slice_size
    if size is not None:
        check_int("the attention slice size", size, 1, hint=" ((image, head) pairs computed at a time)")
    previous, _slice_size = _slice_size, size
    try:
        yield
    finally:
        _slice_size = previous


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """scaled_dot_product_attention of q (B, heads, N_q, d) against k, v (B, heads, N_k, d), mask broadcastable to
    (B, heads, N_q, N_k); inside `sliced_attention(size)`, `size` (image, head) pairs at a time."""
    if _slice_size is None or _slice_size >= q.shape[0] * q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    B, heads = q.shape[:2]
    pairs = [t.reshape(B * heads, 1, *t.shape[2:]) for t in (q, k, v)]     # (B*heads, 1, N, d): one pair a row
    if mask is not None:
        mask = mask.expand(B, heads, *mask.shape[2:]).reshape(B * heads, 1, *mask.shape[2:])
    out = [F.scaled_dot_product_attention(*(t[i:i + _slice_size] for t in pairs),
                                          attn_mask=None if mask is None else mask[i:i + _slice_size])
           for i in range(0, B * heads, _slice_size)]
    return torch.cat(out).reshape(B, heads, *q.shape[2:])


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


def check_context(context: torch.Tensor, mask: torch.Tensor | None, batch: int, dim: int) -> None:
    """Text states for cross-attention: a float tensor (B, L, D), and optionally a bool mask (B, L), True at real
    tokens, with at least one True per row (a row of padding only would be 0/0 = NaN in the softmax)."""
    B, D = batch, dim
    if not isinstance(context, torch.Tensor) or not context.is_floating_point():
        raise TypeError(f"context must be a float tensor of shape ({B}, L, {D}); got "
                        f"{context.dtype if isinstance(context, torch.Tensor) else type(context).__name__}")
    if context.ndim != 3 or context.shape[0] != B or context.shape[2] != D:
        raise ValueError(f"context must have shape (B, L, context_dim) = ({B}, L, {D}), one row of text states "
                         f"per image; got {tuple(context.shape)}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"context_mask must be a bool tensor, True at real tokens and False at padding; "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != context.shape[:2]:
        raise ValueError(f"context_mask must have shape (B, L) = {tuple(context.shape[:2])}, like context's "
                         f"first two axes; got {tuple(mask.shape)}")
    if has_values(mask) and not bool(mask.any(dim=1).all()):
        raise ValueError("every row of context_mask needs at least one True (a real token): a prompt of "
                         "padding only leaves cross-attention nothing to attend to")


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
        B, C, H, W = x.shape                                                    # batch, channels, height, width
        tokens = self.norm(x).flatten(2).transpose(1, 2)                        # (B, N, C), N = H*W
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        q, k, v = (z.reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2)
                   for z in (q, k, v))                                          # (B, heads, N, d) each
        h = naive_attention(q, k, v) if naive else attend(q, k, v)
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
            h = attend(q, k, v, attn_mask)                                       # (B, heads, N, d)
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
