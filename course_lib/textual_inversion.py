r"""Textual inversion (Gal et al. 2022, arXiv 2208.01618): a subject as one new word, and nothing else trained.

DreamBooth (course_lib.dreambooth) adds a new token and then changes the U-Net so that the token's text states
draw the subject. Textual inversion keeps *every* weight of the model frozen, the U-Net, the VAE and the text
encoder alike, and learns only the new token's embedding row: a vector v* in the text encoder's input space,

    v* = argmin_v  E || eps - eps_theta(z_t, t, c_theta("a photo of S*"; v)) ||^2      ([1], Eq. 2)

with the usual denoising loss on the subject's images, its gradient flowing back through the frozen text
encoder to the one row. It is the smallest personalisation there is: at SD 1.5's size 768 numbers (a few
kilobytes), at the tiny SD's the text width. It can only find what the frozen model can already draw, which is
the price of its size.

Here the row starts at the embedding of an initial word ([1] starts from a coarse description, e.g. "person"),
and `NewTokenEmbedding` keeps the old rows frozen while the new one trains, so the check "every other weight is
bit-identical after training" holds by construction and is tested.

[1] R. Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion",
    2022. https://arxiv.org/abs/2208.01618
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dreambooth import add_identifier, personalised_pipeline
from .finetune import FineTune, captioned_loss, draw
from .loop import FitConfig
from .pipeline import TextToImage
from .vae import encode_latents

PLACEHOLDER = "sks"


class NewTokenEmbedding(nn.Module):
    """An embedding table whose last row trains while the others stay fixed (a buffer): nn.Embedding's
    interface (weight, num_embeddings, embedding_dim, forward(ids))."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.register_buffer("frozen", table.weight.detach()[:-1].clone())
        self.new = nn.Parameter(table.weight.detach()[-1:].clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.new])

    @property
    def num_embeddings(self) -> int:
        return self.frozen.shape[0] + 1

    @property
    def embedding_dim(self) -> int:
        return self.frozen.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def to_embedding(self) -> nn.Embedding:
        """A plain, frozen nn.Embedding with the learned row (for inference and saving)."""
        table = nn.Embedding(self.num_embeddings, self.embedding_dim).to(self.frozen.device, self.frozen.dtype)
        with torch.no_grad():
            table.weight.copy_(self.weight)
        return table.requires_grad_(False)


class TextualInversionFit(FineTune):
    """The denoising loss through the frozen text encoder: each step draws batch_size images (with repeats),
    encodes their captions with the current embedding row (the gradient reaches it), and calls
    course_lib.finetune.captioned_loss with the frozen U-Net."""

    def __init__(self, pipe: TextToImage, embedding: NewTokenEmbedding, z: torch.Tensor, ids: torch.Tensor,
                 mask: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int = 0):
        config = FitConfig(steps=steps, lr=lr, grad_clip=1.0)
        super().__init__(config, torch.optim.AdamW([embedding.new], lr=lr, weight_decay=0.0), pipe.device, seed)
        self.pipe, self.embedding, self.z, self.ids, self.mask = pipe, embedding, z, ids, mask
        self.batch_size = batch_size

    def loss(self) -> torch.Tensor:
        g = self.generator
        i = draw(len(self.z), self.batch_size, g)
        context = self.pipe.clip.text_states(self.ids[i], self.mask[i])
        return captioned_loss(self.pipe, self.z[i], context, self.mask[i], g)

    def fixed_tensors(self) -> list[torch.Tensor]:
        return [self.z, self.ids, self.mask, self.embedding.frozen, *self.pipe.unet.parameters()]

    def run_info(self) -> dict:
        return {**super().run_info(), "batch_size": self.batch_size, "n_images": len(self.z)}


@dataclass
class TextualInversionResult:
    pipe: TextToImage          # the base U-Net and VAE, the text encoder with the learned row
    embedding: torch.Tensor    # (width,) the learned row
    token: int                 # its id
    losses: list[float]
    seconds: float
    steps: int
    trainable: int             # numbers trained: the text width


def textual_inversion(pipe: TextToImage, images: torch.Tensor, prompts: list[str], *, word: str = PLACEHOLDER,
                      init_word: str | None = None, steps: int = 400, lr: float = 5e-3, batch_size: int = 4,
                      seed: int = 0, max_seconds: float | None = None, progress: bool = False,
                      checkpoint_path: str | Path | None = None, checkpoint_every: int = 100,
                      resume: bool = True) -> TextualInversionResult:
    """Learn one new token `word` for the subject of `images` (K, 3, H, W) in [-1, 1], captioned `prompts` (each
    containing `word`, e.g. "sks person: light skin tone"). init_word: start the row at that word's embedding
    (a word the tokenizer keeps whole, e.g. the class noun "person"; a word it splits into pieces is refused);
    None: a random row (as DreamBooth's identifier). `pipe` is not changed; the result's pipeline shares its U-Net
    and VAE, frozen. checkpoint_path: as every fine-tuner's (checkpoint every checkpoint_every steps; with
    resume, continue from the file if it exists; resume=False keeps it under a new name)."""
    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"need one prompt per image and at least one image; got {len(images)} and {len(prompts)}")
    if not all(word in p.split() for p in prompts):
        raise ValueError(f"every prompt must contain the word {word!r}; got {prompts}")
    tokenizer, clip, token = add_identifier(pipe.tokenizer, pipe.clip, word, seed=seed)
    if init_word is not None:
        init, pieces = pipe.tokenizer.encode(init_word)[1:-1], pipe.tokenizer.tokens(init_word)  # no BOS, EOS
        if len(init) != 1 or "<unk>" in pieces:
            raise ValueError(f"init_word {init_word!r} is {len(pieces)} tokenizer pieces {pieces}, not one word the "
                             f"tokenizer knows whole: its first piece would say nothing of the word. Choose a word "
                             f"of one piece (e.g. the class noun 'person'), or init_word=None for a random row.")
        with torch.no_grad():
            clip.text.token_embedding.weight[-1] = clip.text.token_embedding.weight[init[0]]
    clip.requires_grad_(False)
    embedding = NewTokenEmbedding(clip.text.token_embedding)
    clip.text.token_embedding = embedding
    personal = personalised_pipeline(pipe, pipe.unet, tokenizer, clip)
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)
    ids, mask = tokenizer(prompts, max_length=clip.config.text.max_length)
    run = TextualInversionFit(personal, embedding, z, ids.to(pipe.device), mask.to(pipe.device), steps=steps, lr=lr,
                              batch_size=batch_size, seed=seed)
    t0 = time.perf_counter()
    clip.eval()                                                   # dropout off: the encoder is frozen
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    pipe.unet.requires_grad_(False)                               # no gradients kept for the shared U-Net
    try:
        run.run(max_seconds=max_seconds, progress=progress, desc="textual inversion", resume=resume,
                checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every)
    finally:
        for p, flag in zip(pipe.unet.parameters(), flags):
            p.requires_grad_(flag)
    seconds = time.perf_counter() - t0
    clip.text.token_embedding = embedding.to_embedding()
    learned = clip.text.token_embedding.weight[-1].detach().clone()
    return TextualInversionResult(personal, learned, token, run.history["loss"], seconds, run.step, learned.numel())


__all__ = ["PLACEHOLDER", "NewTokenEmbedding", "TextualInversionFit", "TextualInversionResult", "textual_inversion"]
