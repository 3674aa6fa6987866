r"""The transformer text encoder: token ids to one state per token (notebook 08, section 2).

    ids (B, L) from course_lib.tokenizer --token + position embeddings--> (B, L, width)
        --EncoderBlock x layers--> --LayerNorm--> hidden states (B, L, width), zero at padding

The U-Net cross-attends to these states (course_lib.unet, notebook 09); the mini CLIP pools them into one
vector per caption (course_lib.clip); SD 1.5's CLIP text encoder is this module with causal=True and
quick_gelu (course_lib.sd, notebook 18).

Each block is the transformer encoder layer of [1] in its pre-LayerNorm form [2] (as GPT-2 [3] and CLIP [4]
use): x + attn(LN(x)), then x + MLP(LN(x)). Position embeddings are learned, and a final LayerNorm follows
the last block. Attention is bidirectional (every token sees every real token) unless config.causal (each
token sees itself and earlier tokens, as CLIP's), and padded positions are masked out as keys, so padding
never changes a real token's state; padded positions of the output are set to zero.

    attention(x) = softmax(Q K^T / sqrt(d) + mask) V,  Q, K, V = x W_q, x W_k, x W_v   ([1] eq. 1, per head)

References:
  [1] Vaswani et al. 2017, Attention Is All You Need, https://arxiv.org/abs/1706.03762
  [2] Xiong et al. 2020, On Layer Normalization in the Transformer Architecture, https://arxiv.org/abs/2002.04745
  [3] Radford et al. 2019, Language Models are Unsupervised Multitask Learners (GPT-2),
      https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf
  [4] Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision (CLIP),
      https://arxiv.org/abs/2103.00020
  [5] Hendrycks & Gimpel 2016, Gaussian Error Linear Units (GELUs), https://arxiv.org/abs/1606.08415
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_choice
from .tokenizer import SPECIALS, UNK


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's fast approximation of GELU ([5] section 2), kept by every model
    trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int                  # the tokenizer's
    max_length: int = 32             # token positions (learned position embeddings), BOS and EOS included
    width: int = 128                 # the hidden state size, also what the U-Net's cross-attention reads
    layers: int = 4
    heads: int = 4                   # must divide width
    mlp_ratio: int = 4               # MLP hidden size = mlp_ratio * width
    dropout: float = 0.0
    causal: bool = False             # each token sees only itself and earlier tokens (CLIP's text encoder)
    activation: str = "gelu"         # the MLP's: "gelu", or "quick_gelu" x * sigmoid(1.702 x) (OpenAI CLIP)

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "width", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if self.vocab_size <= UNK:
            raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special tokens; got {self.vocab_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS); got {self.max_length}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")


class Attention(nn.Module):
    """Multi-head self-attention over tokens ([1] section 3.2). `keep` says which keys each query may attend
    to: a padding mask (B, L), True at real tokens, or a full (B or 1, 1, L, L) bool mask (TextEncoder's,
    which adds causality)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)  # (B, heads, L, d)
        if keep is not None and keep.ndim == 2:                     # (B, L) padding mask: the same for every query
            keep = keep[:, None, None, :]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(h, "b h l d -> b l (h d)"))


class EncoderBlock(nn.Module):
    """One pre-LayerNorm transformer encoder layer over tokens: x + attn(LN(x)), then x + MLP(LN(x))
    ([1] with the norm moved first, [2]). Self-attention only; the U-Net's block with cross-attention is
    course_lib.attention.TransformerBlock."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), ACTIVATIONS[activation](),
                                 nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), keep))
        return x + self.drop(self.mlp(self.norm2(x)))


class TextEncoder(nn.Module):
    """ids (B, L), mask (B, L) -> hidden states (B, L, width); token + learned position embeddings,
    pre-LN encoder blocks, a final LayerNorm. Padded positions come out as zeros.

    mask=None treats every position as real: nothing is masked and nothing zeroed. That is how Stable
    Diffusion runs CLIP's causal encoder (config.causal): padding comes after EOS, so no real token can see it,
    and the U-Net cross-attends to all 77 states, the padding's included."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = cfg = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.activation)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def check_input(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        cfg = self.config
        if ids.ndim != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"ids must be an integer tensor (B, L); got dtype {ids.dtype}, shape {tuple(ids.shape)}")
        if mask is not None and (mask.shape != ids.shape or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor shaped like ids {tuple(ids.shape)}; got dtype {mask.dtype}, "
                             f"shape {tuple(mask.shape)}")
        if ids.shape[1] > cfg.max_length:
            raise ValueError(f"at most max_length={cfg.max_length} tokens; got {ids.shape[1]}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}; got "
                             f"{ids.min().item()}..{ids.max().item()}")
        if mask is not None and ids.shape[0] and not mask.any(dim=1).all():
            raise ValueError("every row of mask needs at least one True (real) token; a tokenizer gives BOS and EOS")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self.check_input(ids, mask)
        B, L = ids.shape                                           # batch, tokens
        x = self.token_embedding(ids) + self.position_embedding[:L]   # (B, L, width)
        keep = None                                                # which keys each query may attend to
        if mask is not None:
            keep = mask[:, None, None, :]                          # (B, 1, 1, L): real tokens only
        if self.config.causal:
            causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()   # query i sees keys 0..i
            keep = causal[None, None] if keep is None else keep & causal
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        return x if mask is None else x * mask[..., None]

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over real tokens, (B, L, width) -> (B, width).

        CLIP pools the state at EOS, which works because its encoder is causal: the last token is the only
        one that has seen the whole text. Here attention is bidirectional, so every token has seen the whole
        text and no position is special; the mean over the real tokens uses all of them."""
        m = mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


__all__ = ["TextEncoderConfig", "QuickGELU", "ACTIVATIONS", "Attention", "EncoderBlock", "TextEncoder"]
