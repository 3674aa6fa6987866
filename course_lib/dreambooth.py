r"""DreamBooth (Ruiz et al. 2022, arXiv 2208.12242): teach a text-to-image model one new subject.

The recipe ([1], Section 4):
  1. Bind the subject to an identifier: a token the model has no prior for. Here it is a genuinely new
     token ("sks"), added to the tokenizer, with a random embedding row in the (frozen) text encoder.
  2. Fine-tune the U-Net on 3-5 images of the subject captioned "sks <class noun>" (e.g. "sks person").
  3. Prior preservation: the model also keeps training on images that the *base* model generated for
     the bare class prompt ("person"), so that "person" keeps meaning any person (no language drift)
     and the outputs stay varied:

        L = E || eps - eps_theta(z_t, t, "sks person") ||^2  +  lambda E || eps' - eps_theta(z'_t, t', "person") ||^2

     with z the subject's latents and z' the class images' latents ([1], Eq. 2; lambda = 1 there).

A subject in this course: an emoji the base model never saw (one held out from its training), with
its six skin-tone renderings. The prompts can ask for a tone, "sks person: dark skin tone", and the
held-out tones are real images of the subject to measure against. See `emoji_subjects`.

Both variants live here: full fine-tuning (every U-Net weight trains) and LoRA (course_lib.lora; only
the adapters train, the file is tiny). Both write into a copy; the base pipeline is never changed. Both
train in the course's one loop (`DreamBoothFit`, a course_lib.finetune.CaptionedFineTune), so a run can
checkpoint and resume exactly.

[1] N. Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation", 2022.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import lora as lora_lib
from .clip import MiniCLIP
from .checks import check_choice
from .data import TONES, load_emoji  # TONES: the six tone modifiers, "" the default yellow
from .finetune import CaptionedFineTune, FineTune, captioned_loss, draw
from .pipeline import TextToImage
from .tokenizer import Tokenizer
from .vae import encode_latents

IDENTIFIER = "sks"
CLASS_NOUNS = {"hand": "hand", "hands": "hand", "body-parts": "body part", "person": "person",
               "family": "person"}


# --- The identifier ---------------------------------------------------------------------------------

def add_identifier(tokenizer: Tokenizer, clip: MiniCLIP, word: str = IDENTIFIER, seed: int = 0,
                   ) -> tuple[Tokenizer, MiniCLIP, int]:
    """(new tokenizer, new clip, token id): copies of both where `word` is one new token whose embedding row is
    random, drawn with the per-dimension spread of the existing rows, so the word carries no prior meaning.

    The originals are not changed. The text encoder stays frozen in DreamBooth as in [1]'s Stable Diffusion
    runs: only the U-Net learns what the new token's text states mean."""
    tokenizer = Tokenizer(tokenizer.merges, tokenizer.max_length, tokenizer.added)
    token = tokenizer.add_word(word)
    clip = copy.deepcopy(clip)
    table = clip.text.token_embedding
    old = table.weight.detach()
    g = torch.Generator().manual_seed(seed)
    row = old.float().mean(0) + old.float().std(0) * torch.randn(old.shape[1], generator=g)
    new = nn.Embedding(old.shape[0] + 1, old.shape[1]).to(old.device, old.dtype)
    with torch.no_grad():
        new.weight[:-1] = old
        new.weight[-1] = row.to(old.dtype)
    new.requires_grad_(table.weight.requires_grad)
    clip.text.token_embedding = new
    text_config = dataclasses.replace(clip.config.text, vocab_size=tokenizer.vocab_size)
    clip.config = dataclasses.replace(clip.config, text=text_config)
    clip.text.config = text_config
    return tokenizer, clip, token


def personalised_pipeline(pipe: TextToImage, unet: nn.Module, tokenizer: Tokenizer, clip: MiniCLIP) -> TextToImage:
    """A pipeline sharing `pipe`'s VAE and schedule, with another U-Net and text side."""
    return TextToImage(unet, pipe.schedule, clip, tokenizer, pipe.vae, pipe.scale_factor, pipe.prediction,
                       device=pipe.device)


# --- Subjects -----------------------------------------------------------------------------------------

@dataclass
class Subject:
    """One subject: its name in the data, class noun, and its images in the six tones (TONES order)."""
    name: str                    # e.g. "woman mage"
    class_noun: str              # e.g. "person"
    images: torch.Tensor         # (6, 3, H, W) in [-1, 1], TONES order
    split: str

    def prompt(self, tone: str = "", identifier: str | None = IDENTIFIER) -> str:
        """"sks person: dark skin tone" (identifier None: the class prompt "person: dark skin tone")."""
        check_choice("tone", tone, TONES)
        head = self.class_noun if identifier is None else f"{identifier} {self.class_noun}"
        return head + (f": {tone} skin tone" if tone else "")

    def caption(self, tone: str = "") -> str:
        """The data's own caption, e.g. "woman mage: dark skin tone"."""
        return self.name + (f": {tone} skin tone" if tone else "")

    def __repr__(self) -> str:
        return f"Subject({self.name!r}, class {self.class_noun!r}, {self.images.shape[0]} tones, {self.split})"


def class_noun(subcategory: str) -> str:
    """A plain noun for an emoji subcategory: hand-*, hands -> hand; person-*, family -> person; body-parts."""
    for prefix, noun in CLASS_NOUNS.items():
        if subcategory == prefix or subcategory.startswith(prefix + "-"):
            return noun
    raise ValueError(f"no class noun for subcategory {subcategory!r}; known: {sorted(CLASS_NOUNS)} and their "
                     f"'-...' forms")


def emoji_subjects(split: str = "heldout", size: int = 32, style: str = "noto") -> list[Subject]:
    """Every emoji with all six tone renderings in the split, sorted by name. "heldout" ones (29) are
    subjects the base model never saw; "train" ones (271) are what a hypernetwork learns from."""
    data = load_emoji(size=size, split=split, style=style)
    index = {c: i for i, c in enumerate(data.captions)}
    subjects = []
    for caption, sub in zip(data.captions, data.subcategories):
        if ":" in caption:
            continue
        names = [caption + (f": {tone} skin tone" if tone else "") for tone in TONES]
        if all(n in index for n in names):
            images = data.images[[index[n] for n in names]]
            subjects.append(Subject(caption, class_noun(sub), images, split))
    return sorted(subjects, key=lambda s: s.name)


def get_subject(name: str, split: str = "heldout", size: int = 32) -> Subject:
    subjects = {s.name: s for s in emoji_subjects(split, size)}
    if name not in subjects:
        raise ValueError(f"no subject {name!r} in split {split!r}; valid are: {', '.join(sorted(subjects))}")
    return subjects[name]


# --- The loss -------------------------------------------------------------------------------------------

def dreambooth_loss(unet: nn.Module, pipe: TextToImage, subject: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    prior: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, prior_weight: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """([1], Eq. 2): L = L_subject + prior_weight * L_prior, each the mean denoising loss of its half of
    the batch: course_lib.finetune.captioned_loss with `unet` (the copy being fine-tuned). subject and prior are (latents,
    context, mask). Returns (L, {"subject": .., "prior": ..})."""
    z, c, m = subject
    if prior is None or prior_weight == 0:
        loss = captioned_loss(pipe, z, c, m, generator, unet=unet)
        return loss, {"subject": loss.item(), "prior": 0.0}
    zp, cp, mp = prior
    # one forward pass for both halves, then split: the same numbers as two passes
    per_sample = captioned_loss(pipe, torch.cat([z, zp]), torch.cat([c, cp]), torch.cat([m, mp]), generator,
                                     unet=unet, reduce=False)
    subject_loss, prior_loss = per_sample[:len(z)].mean(), per_sample[len(z):].mean()
    return subject_loss + prior_weight * prior_loss, {"subject": subject_loss.item(), "prior": prior_loss.item()}


# --- Fine-tuning -------------------------------------------------------------------------------------------

@dataclass
class DreamBoothConfig:
    method: str = "full"            # "full": every U-Net weight; "lora": adapters only
    steps: int = 200
    lr: float | None = None         # None: 2e-5 for full (as [1] for SD: 5e-6 at 860M), 1e-3 for LoRA
    batch_size: int = 4             # subject images per step (repeated if fewer); as many class images
    prior_weight: float = 1.0       # lambda; 0 turns prior preservation off
    prior_images: int = 32          # class images generated by the base model
    prior_steps: int = 20           # sampler steps for them
    guidance_scale: float = 3.0
    rank: int = 4                   # LoRA only
    targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    identifier: str = IDENTIFIER
    seed: int = 0
    max_seconds: float | None = None

    def __post_init__(self):
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora'; got {self.method!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {self.steps} and {self.batch_size}")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0; got {self.prior_weight}")
        if self.lr is None:
            self.lr = 2e-5 if self.method == "full" else 1e-3


@dataclass
class DreamBoothResult:
    pipe: TextToImage               # the personalised pipeline ("sks" known)
    losses: list[float]
    seconds: float                  # fine-tuning only (class images not included)
    prior_seconds: float            # generating the class images
    trainable: int                  # numbers that trained
    steps: int
    config: DreamBoothConfig
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def class_images(pipe: TextToImage, prompts: list[str], n: int, *, steps: int = 20, guidance_scale: float = 3.0,
                 seed: int = 10_000) -> tuple[torch.Tensor, list[str]]:
    """n scaled latents the base model makes for the class prompts (cycled), and their prompts."""
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    latents = pipe(prompts, seed=seed, steps=steps, guidance_scale=guidance_scale, return_latents=True)
    return latents, prompts


class DreamBoothFit(CaptionedFineTune):
    """([1], Eq. 2) in the one loop: each step draws batch_size subject images and (with a prior) as many class
    images, with repeats, and logs both halves of the loss."""

    def __init__(self, pipe: TextToImage, unet: nn.Module, params: list[nn.Parameter], subject: tuple,
                 prior: tuple | None, cfg: DreamBoothConfig):
        super().__init__(pipe, unet, params, *subject, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                         seed=cfg.seed)
        self.prior, self.prior_weight, self.method = prior, cfg.prior_weight, cfg.method

    def loss(self) -> tuple[torch.Tensor, dict]:
        g = self.generator
        i = draw(len(self.z), self.batch_size, g)                                   # subject images, with repeats
        batch_prior = None
        if self.prior is not None:
            j = draw(len(self.prior[0]), self.batch_size, g)
            batch_prior = tuple(x[j] for x in self.prior)
        return dreambooth_loss(self.unet, self.pipe, (self.z[i], self.context[i], self.mask[i]), batch_prior,
                               self.prior_weight, g)

    def fixed_tensors(self) -> list[torch.Tensor]:
        return [*super().fixed_tensors(), *(self.prior or ())]

    def run_info(self) -> dict:
        return {**super().run_info(), "dreambooth": self.method, "prior_weight": self.prior_weight,
                "n_prior": len(self.prior[0]) if self.prior is not None else 0}


def dreambooth(pipe: TextToImage, images: torch.Tensor, prompts: list[str], class_prompts: list[str] | None = None,
               config: DreamBoothConfig | None = None, progress: bool = False, *,
               checkpoint_path: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
               callback: Callable[[FineTune], None] | None = None) -> DreamBoothResult:
    """Personalise a copy of `pipe` on `images` (K, 3, H, W) in [-1, 1] captioned `prompts` (each containing
    config.identifier, e.g. "sks person: light skin tone"). class_prompts: the same prompts without the
    identifier, for prior preservation (needed unless config.prior_weight == 0). checkpoint_path, resume:
    as in course_lib.lora.fine_tune (the class images are made again, from their seed, before resuming)."""
    cfg = config or DreamBoothConfig()
    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"need one prompt per image and at least one image; got {len(images)} and {len(prompts)}")
    if not all(cfg.identifier in p.split() or p.startswith(cfg.identifier + " ") for p in prompts):
        raise ValueError(f"every prompt must contain the identifier {cfg.identifier!r}; got {prompts}")
    if cfg.prior_weight > 0 and not class_prompts:
        raise ValueError("prior preservation (prior_weight > 0) needs class_prompts, e.g. ['person']")
    device = pipe.device
    tokenizer, clip, _ = add_identifier(pipe.tokenizer, pipe.clip, cfg.identifier, seed=cfg.seed)

    prior = None
    t0 = time.perf_counter()
    if cfg.prior_weight > 0:
        zp, pp = class_images(pipe, class_prompts, cfg.prior_images, steps=cfg.prior_steps,
                              guidance_scale=cfg.guidance_scale, seed=cfg.seed + 10_000)
        cp, mp = pipe.encode(pp)
        prior = (zp.to(device), cp, mp)
    prior_seconds = time.perf_counter() - t0

    unet = copy.deepcopy(pipe.unet)
    if cfg.method == "lora":
        lora_lib.inject_lora(unet, targets=cfg.targets, rank=cfg.rank, seed=cfg.seed)
        params = lora_lib.lora_parameters(unet)
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    personal = personalised_pipeline(pipe, unet, tokenizer, clip)
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=device).to(device)
    c, m = personal.encode(prompts)
    run = DreamBoothFit(pipe, unet, params, (z, c, m), prior, cfg)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
            max_seconds=cfg.max_seconds, progress=progress, callback=callback, desc=f"DreamBooth ({cfg.method})")
    unet.requires_grad_(False)
    h = run.history
    history = [{"subject": s, "prior": p} for s, p in zip(h.get("subject", []), h.get("prior", []))]
    return DreamBoothResult(personal, h["loss"], run.seconds, prior_seconds, sum(p.numel() for p in params),
                            run.step, cfg, history)


__all__ = ["IDENTIFIER", "TONES", "add_identifier", "personalised_pipeline", "Subject", "class_noun",
           "emoji_subjects", "get_subject", "dreambooth_loss", "DreamBoothConfig",
           "DreamBoothResult", "class_images", "DreamBoothFit", "dreambooth"]
