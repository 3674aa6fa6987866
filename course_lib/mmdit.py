r"""SD 3's multimodal diffusion transformer (MMDiT): text tokens and image patches in two streams, one attention.

    text states (B, L, D) --Linear--> text tokens (B, L, width) ----------+
                                                                          |  [MMDiTBlock] x depth
    x_t (B, C, H, W) --patchify, Linear, + positions--> patches (B, N, width)  --> FinalLayer --> unpatchify
    c = time embedding + pooled text (B, width): every block's adaLN modulation, in both streams

The U-Net and the DiT look at the text from the image's side only (cross-attention, or a pooled vector). SD 3
(Esser et al. 2024 [1], Sec. 4 and Fig. 2) lets the text tokens change too: the tokens of both modalities go
through the blocks side by side, each stream with its own weights, and meet in one attention:

    Notation: x the image tokens (B, N, width), y the text tokens (B, L, width), c (B, width), m the text mask
              (B, L), True at real tokens; [y; x] the concatenation along the sequence (B, L + N, width).
    1. each stream its own adaLN-Zero modulation from the same c, its own Q, K, V (course_lib.dit.DiTBlock's
       first half): (q_y, k_y, v_y) from y, (q_x, k_x, v_x) from x; with qk_norm each head's q and k RMS-normalised
    2. ONE attention over the concatenation: softmax([q_y; q_x] [k_y; k_x]^T / sqrt(d) + M) [v_y; v_x],
       M = -inf at the keys of padded text tokens (m False) and 0 elsewhere: every token, text or image, attends
       to every real token of both streams (`joint_attention`)
    3. split the result back into its text and image rows; each stream its own output projection, gates and MLP
       (DiTBlock's second half)

So an MMDiT block is two DiT blocks that share one attention; that is how it is written (`MMDiTBlock`). The last
block's text stream is read by nobody (only the image tokens go on to the final layer), so, as in SD 3, it keeps
only what the attention needs from it: its modulation's shift and scale, and its Q, K, V projection.

What this tiny MMDiT keeps from SD 3 and what it changes. Kept: the two streams with separate weights and a joint
attention; adaLN-Zero from the timestep embedding plus a pooled text vector; QK-normalisation by RMSNorm per head
(SD 3.5's, and SD 3's recipe for stable mixed-precision training at scale, [1] Sec. 5.3.2); patches with 2-D
sin-cos positions; the discarded last text stream. Changed: one text encoder (the course's mini CLIP) in place of
two CLIPs and T5; the pooled vector is the masked mean of the token states, projected in the model
(course_lib.dit.TextPool), where SD 3 uses CLIP's own pooled output; and the padding is masked in the joint
attention, where SD 3 attends to its padded T5 and CLIP states as they are. SD 3's timestep shift for larger images
is a property of the flow path, not of the network: course_lib.schedules.FlowSchedule(shift=...).

References:
  [1] Esser et al. 2024, Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (SD 3).
      https://arxiv.org/abs/2403.03206
  [2] Peebles, Xie 2023, Scalable Diffusion Models with Transformers. https://arxiv.org/abs/2212.09748
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import attend
from .dit import DiT, DiTBlock, DiTConfig, named_config


@dataclass(frozen=True)
class MMDiTConfig(DiTConfig):
    """A DiTConfig whose text is a second stream of tokens: context_dim is required, and qk_norm is on by default."""
    context_dim: int | None = 128       # the text encoder's width (the shipped mini CLIP: 128)
    qk_norm: bool = True                # RMSNorm on each head's queries and keys (SD 3.5)

    def __post_init__(self):
        if self.context_dim is None:
            raise ValueError("an MMDiT joins a text stream to the image stream, so context_dim must be the text "
                             "encoder's width (e.g. 128 for the shipped mini CLIP); an unconditional transformer is "
                             "a DiT (course_lib.dit)")
        super().__post_init__()


# Tiny SD 3s for the 4x8x8 latents of 32 px emoji (16 image tokens of 2x2 patches) and the mini CLIP's text states.
MMDIT_PRESETS: dict[str, MMDiTConfig] = {
    "mmdit_tiny": MMDiTConfig(width=64, depth=2, heads=4, context_dim=64),      # 0.29M params; tests, quick mode
    "mmdit_small": MMDiTConfig(width=128, depth=4, heads=4, context_dim=128),   # 2.30M params
}


def mmdit_preset(name: str, **changes) -> MMDiTConfig:
    """A named config of MMDIT_PRESETS, optionally with fields changed (mmdit_preset("mmdit_tiny", depth=3))."""
    return named_config(MMDIT_PRESETS, name, "MMDiT preset", **changes)


def joint_attention(text: tuple[torch.Tensor, ...], image: tuple[torch.Tensor, ...],
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 of the module's docstring: one attention over [text; image]. text = (q, k, v) of the text stream,
    each (B, heads, L, d); image = (q, k, v) of the image stream, each (B, heads, N, d); mask (B, L) bool, True
    at real text tokens (None: all real). Returns the attention's (text rows (B, heads, L, d), image rows
    (B, heads, N, d)): the same numbers as plain attention over the concatenated sequence, split back."""
    L, N = text[0].shape[2], image[0].shape[2]                      # text tokens, image tokens
    q, k, v = (torch.cat([y, x], dim=2) for y, x in zip(text, image))          # (B, heads, L + N, d)
    keys = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (q.shape[0], L):
            raise ValueError(f"the text mask must be bool (B, L) = ({q.shape[0]}, {L}), True at real tokens; got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        keys = torch.cat([mask, mask.new_ones(mask.shape[0], N)], dim=1)[:, None, None, :]   # (B, 1, 1, L + N)
    out = attend(q, k, v, keys)
    return out[:, :, :L], out[:, :, L:]


class MMDiTBlock(nn.Module):
    """The two streams side by side, each a DiTBlock's weights, joined by one attention (the module's docstring).
    last: the text stream keeps only what the attention needs (pre_only) and the block returns no text."""

    def __init__(self, cfg: MMDiTConfig, last: bool = False):
        super().__init__()
        self.text = DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, pre_only=last)
        self.image = DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)

    def forward(self, image: torch.Tensor, text: torch.Tensor, c: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image (B, N, width), text (B, L, width), c (B, width), mask (B, L) -> (image, text or None if last)."""
        *image_qkv, image_rest = self.image.attention_inputs(image, c)          # 1. each stream its own weights
        *text_qkv, text_rest = self.text.attention_inputs(text, c)
        text_out, image_out = joint_attention(text_qkv, image_qkv, mask)         # 2. one attention over both
        image = self.image.after_attention(image, image_out, image_rest)         # 3. each stream its own again
        text = None if self.text.pre_only else self.text.after_attention(text, text_out, text_rest)
        return image, text


class MMDiT(DiT):
    """A tiny SD 3 transformer, drop-in for the U-Net: `model(x_t, t, context, context_mask)` returns a tensor shaped
    like x_t. A DiT (course_lib.dit: patches, positions, time and pooled text, final layer) whose blocks carry the
    text tokens as a second stream."""

    kind, example = "MMDiT", "mmdit_preset('mmdit_tiny')"

    def __init__(self, config: MMDiTConfig | None = None, **changes):
        config = config or MMDiTConfig()
        if not isinstance(config, MMDiTConfig):
            raise TypeError(f"an MMDiT is built from an MMDiTConfig (course_lib.mmdit); got {type(config).__name__} "
                            f"(a DiTConfig builds course_lib.dit.DiT)")
        super().__init__(config, **changes)
        self.context_embed = nn.Linear(self.config.context_dim, self.config.width)   # text states -> text tokens

    def block(self, cfg: MMDiTConfig, index: int) -> nn.Module:
        """Block `index`: an MMDiTBlock; the last one's text stream is pre-only."""
        return MMDiTBlock(cfg, last=index == cfg.depth - 1)

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None,
                   context_mask: torch.Tensor | None) -> torch.Tensor:
        """The image tokens h (B, N, width) and the text tokens, from context (B, L, context_dim), through the
        blocks together; the image tokens come out."""
        text = self.context_embed(context)                        # (B, L, width)
        for block in self.blocks:
            h, text = block(h, text, c, context_mask)
        return h


__all__ = ["MMDiTConfig", "MMDIT_PRESETS", "mmdit_preset", "joint_attention", "MMDiTBlock", "MMDiT"]
