r"""HyperDreamBooth (Ruiz et al. 2023, arXiv 2307.06949): personalise from one image, fast, with few numbers.

Three pieces ([1], Section 4):

1. Lightweight DreamBooth (LiDB, course_lib.lidb). Rank-1 LoRA, with each factor split again through a
   frozen random orthogonal basis, so a layer trains r (a + b) = 150 numbers whatever its size: 6,000 per
   subject on the tiny SD, against 34k for rank-4 LoRA and 3.4M for full fine-tuning. `fit_lidb` here
   optimises them for many subjects at once.

2. A hypernetwork H that predicts the LiDB numbers from one image of the subject: an image encoder
   (here the mini CLIP's image tower, trained on) gives tokens; a small transformer decoder with one
   query per adapted layer reads them and outputs that layer's 150 numbers. It refines iteratively
   ([1], Section 4.2): start at w = 0; each pass gets the current w back as input and adds a correction.
   Training: the diffusion loss of the U-Net with the predicted weights, on the input image, plus a
   loss to LiDB weights pre-optimised for each training subject (made affordable by optimising all
   subjects at once: every sample in a batch carries its own subject's weights, `LiDB.set`).

3. Rank-relaxed fast fine-tuning ([1], Section 4.3): turn the predicted rank-1 update into an ordinary
   LoRA of higher rank (its first component is the prediction, the rest start at zero) and fine-tune all
   of it for a few dozen steps on the one image.

Every training run here (LiDBFit, HyperFit, and fast fine-tuning's CaptionedFineTune) goes through the
course's one loop (course_lib.finetune, course_lib.loop), with its checkpoints and exact resume.

[1] N. Ruiz et al., "HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models", 2023.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from . import lora as lora_lib
from .attention import TransformerBlock
from .clip import ImageEncoder, ImageEncoderConfig
from .dreambooth import IDENTIFIER, Subject, TONES, add_identifier, personalised_pipeline
from .finetune import CaptionedFineTune, FineTune, captioned_loss, draw
# LiDB itself is course_lib.lidb's; its names stay reachable here too (hd.LiDB in notebook 12 and the tests)
from .lidb import LiDB, LiDBConfig, LiDBLayer, lidb_numbers, semi_orthogonal
from .loop import FitConfig
from .pipeline import TextToImage
from .vae import encode_latents

FORMAT = "course_lib.hypernetwork/1"


# --- Subjects as training data ----------------------------------------------------------------------------

@dataclass
class SubjectData:
    """Latents and text states of many subjects' tone images, flattened: sample k is subject[k]."""
    latents: torch.Tensor        # (K, 4, 8, 8) scaled
    context: torch.Tensor        # (K, L, D) text states of "sks <class>: <tone> skin tone"
    mask: torch.Tensor           # (K, L)
    subject: torch.Tensor        # (K,) long: which subject
    tone: torch.Tensor           # (K,) long: index into TONES
    images: torch.Tensor         # (K, 3, H, W) the pixels (the hypernetwork's input)


def subject_data(pipe: TextToImage, subjects: list[Subject], tones: tuple[str, ...] = TONES) -> SubjectData:
    """Encode the chosen tones of every subject with the pipeline's VAE and text encoder (which must know
    the identifier: a pipeline from `personal_pipeline`)."""
    if IDENTIFIER not in pipe.tokenizer.added:
        raise ValueError(f"the pipeline's tokenizer has no {IDENTIFIER!r} token; use personal_pipeline(pipe)")
    idx = [TONES.index(t) for t in tones]
    images = torch.cat([s.images[idx] for s in subjects])
    prompts = [s.prompt(t) for s in subjects for t in tones]
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device)
    c, m = pipe.encode(prompts)
    subject = torch.arange(len(subjects)).repeat_interleave(len(idx))
    tone = torch.tensor(idx).repeat(len(subjects))
    return SubjectData(z.to(pipe.device), c, m, subject, tone, images)


def personal_pipeline(pipe: TextToImage, seed: int = 0) -> TextToImage:
    """A copy of `pipe` whose tokenizer knows the identifier and whose U-Net is a copy (safe to adapt)."""
    tokenizer, clip, _ = add_identifier(pipe.tokenizer, pipe.clip, IDENTIFIER, seed=seed)
    return personalised_pipeline(pipe, copy.deepcopy(pipe.unet), tokenizer, clip)


# --- LiDB training (one subject, or many at once) -------------------------------------------------------------

@dataclass
class FitResult:
    weights: torch.Tensor         # (S, layers, numbers)
    losses: list[float]
    seconds: float
    steps: int


def _fixed(lidb: LiDB, data: SubjectData) -> list[torch.Tensor]:
    """What LiDB training uses without training it: the subjects' data, the frozen bases and the U-Net."""
    bases = [b for layer in lidb.layers.values() for b in (layer.A_aux, layer.B_aux)]
    return [data.latents, data.context, data.mask, data.subject, data.images, *bases, *lidb.unet.parameters()]


def _lidb_info(lidb: LiDB) -> dict:
    return {**asdict(lidb.config), "targets": list(lidb.config.targets), "layers": lidb.names}


class LiDBFit(FineTune):
    """fit_lidb's run: the LiDB numbers of S subjects are the rows of a table, and each sample of a batch runs
    with its own subject's row (LiDB.set), so S subjects cost one U-Net pass per batch, not S.

    The table is an embedding with sparse gradients, trained by SparseAdam ("lazy" Adam): a step updates only the
    subjects in its batch, where dense Adam would also move every absent subject along its old momentum. Over all
    271 training subjects lr 3e-2 diverged (with dense Adam and with this); 1e-2 is stable. No clipping."""

    def __init__(self, pipe: TextToImage, lidb: LiDB, data: SubjectData, start: torch.Tensor, *, steps: int,
                 lr: float, batch_size: int, seed: int = 0):
        S = start.shape[0]
        self.table = nn.Embedding(S, lidb.numbers, sparse=True)
        with torch.no_grad():
            self.table.weight.copy_(start.reshape(S, -1))
        super().__init__(FitConfig(steps=steps, lr=lr, grad_clip=None),
                         torch.optim.SparseAdam(self.table.parameters(), lr=lr), pipe.device, seed)
        self.pipe, self.lidb, self.data, self.start, self.batch_size = pipe, lidb, data, start, batch_size

    def loss(self) -> torch.Tensor:
        d, g = self.data, self.generator
        i = draw(len(d.latents), self.batch_size, g)
        self.lidb.set(self.table(d.subject[i]).view(len(i), *self.lidb.shape).to(self.pipe.device))
        return captioned_loss(self.pipe, d.latents[i], d.context[i], d.mask[i], g, unet=self.lidb.unet)

    def fixed_tensors(self) -> list[torch.Tensor]:
        return [*_fixed(self.lidb, self.data), self.start]

    def run_info(self) -> dict:
        return {**super().run_info(), "batch_size": self.batch_size, "lidb": _lidb_info(self.lidb),
                "subjects": self.start.shape[0]}

    def finish(self) -> None:
        super().finish()
        self.lidb.set(None)


def fit_lidb(pipe: TextToImage, lidb: LiDB, data: SubjectData, *, steps: int, batch_size: int = 32,
             lr: float = 1e-2, init: torch.Tensor | None = None, seed: int = 0, max_seconds: float | None = None,
             progress: bool = False, checkpoint_path: str | Path | None = None, checkpoint_every: int = 100,
             resume: bool = True, callback: Callable[[FineTune], None] | None = None) -> FitResult:
    """Optimise LiDB weights for every subject in `data` at once (a LiDBFit): each sample of a batch runs with its
    own subject's numbers. Returns weights (S, layers, numbers). checkpoint_path, resume: as in lora.fine_tune."""
    S = int(data.subject.max()) + 1
    start = lidb.init_weights(S) if init is None else init.clone().float()
    run = LiDBFit(pipe, lidb, data, start, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
            max_seconds=max_seconds, progress=progress, callback=callback,
            desc=f"LiDB ({S} subject{'s' if S > 1 else ''})")
    return FitResult(run.table.weight.detach().view(S, *lidb.shape).clone(), run.history["loss"], run.seconds,
                     run.step)


# --- 2. The hypernetwork ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HyperConfig:
    layers: int                                    # LiDB layers to predict (40 for the tiny SD)
    numbers: int                                   # numbers per layer, r (a + b)
    width: int = 128
    depth: int = 2                                 # transformer decoder blocks
    iterations: int = 4                            # refinement passes
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "HyperConfig":
        d = json.loads(text)
        d["image"] = ImageEncoderConfig(**d["image"])
        return cls(**d)


class HyperNetwork(nn.Module):
    """image (B, 3, H, W) -> LiDB weights (B, layers, numbers), refined over `iterations` passes."""

    def __init__(self, config: HyperConfig):
        super().__init__()
        self.config = cfg = config
        self.image = ImageEncoder(cfg.image)
        feat = cfg.image.channels[-1]
        self.to_tokens = nn.Linear(feat, cfg.width)
        self.pooled_token = nn.Linear(cfg.image.width, cfg.width)
        self.queries = nn.Parameter(torch.randn(cfg.layers, cfg.width) * 0.02)
        self.weights_in = nn.Linear(cfg.numbers, cfg.width)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.width, cfg.width) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.numbers)
        nn.init.zeros_(self.head.weight)             # the first prediction is the starting point w0
        nn.init.zeros_(self.head.bias)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + h w, width): the pooled image vector and each position of the last feature map."""
        enc = self.image
        pooled = enc(images)
        h = images
        if h.shape[-1] != enc.config.image_size:
            h = nn.functional.interpolate(h, size=(enc.config.image_size,) * 2, mode="area")
        for stage in enc.stages:
            h = stage["down"](h)
            h = h + stage["res"](h)
        tokens = self.to_tokens(h.flatten(2).transpose(1, 2))
        return torch.cat([self.pooled_token(pooled)[:, None], tokens], dim=1)

    def forward(self, images: torch.Tensor, start: torch.Tensor | None = None, iterations: int | None = None,
                return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """start: (layers, numbers) or (B, layers, numbers), the weights the first pass refines (LiDB's
        init_weights, so the zero head predicts the base model). return_all: every pass's prediction."""
        cfg = self.config
        ctx = self.image_tokens(images)
        B = images.shape[0]
        w = torch.zeros(B, cfg.layers, cfg.numbers, device=images.device) if start is None else \
            start.to(images.device).expand(B, cfg.layers, cfg.numbers)
        outs = []
        for _ in range(cfg.iterations if iterations is None else iterations):
            h = self.queries + self.weights_in(w)
            for block in self.blocks:
                h = block(h, ctx)
            w = w + self.head(self.norm(h))
            outs.append(w)
        return outs if return_all else w


def hyper_config_for(lidb: LiDB, **changes) -> HyperConfig:
    return HyperConfig(layers=lidb.shape[0], numbers=lidb.shape[1], **changes)


@dataclass
class HyperTrainResult:
    losses: list[float]
    diffusion: list[float]
    weight: list[float]
    seconds: float
    steps: int


class HyperFit(FineTune):
    """train_hypernetwork's run: L = the diffusion loss with the predicted weights on the input image + weight_loss
    x the mean squared distance to the subject's pre-optimised weights ([1], Section 4.2). AdamW, weight decay
    0.01, gradients clipped to norm 1; the hypernetwork is in train mode while it runs."""

    def __init__(self, hyper: HyperNetwork, pipe: TextToImage, lidb: LiDB, data: SubjectData, targets: torch.Tensor,
                 *, steps: int, lr: float, batch_size: int, weight_loss: float, seed: int = 0):
        start = lidb.init_weights(1)[0].to(pipe.device)
        optimizer = torch.optim.AdamW(hyper.parameters(), lr=lr, weight_decay=0.01)
        super().__init__(FitConfig(steps=steps, lr=lr, grad_clip=1.0), optimizer, pipe.device, seed, module=hyper)
        self.hyper, self.pipe, self.lidb, self.data, self.targets = hyper, pipe, lidb, data, targets
        self.start, self.batch_size, self.weight_loss = start, batch_size, weight_loss

    def loss(self) -> tuple[torch.Tensor, dict]:
        d, g = self.data, self.generator
        i = draw(len(d.latents), self.batch_size, g)
        w = self.hyper(d.images[i].to(self.pipe.device), self.start)
        self.lidb.set(w)
        diffusion = captioned_loss(self.pipe, d.latents[i], d.context[i], d.mask[i], g, unet=self.lidb.unet)
        weight = (w - self.targets[d.subject[i]].to(w.device)).pow(2).mean()
        return diffusion + self.weight_loss * weight, {"diffusion": diffusion.item(), "weight": weight.item()}

    def fixed_tensors(self) -> list[torch.Tensor]:
        return [*_fixed(self.lidb, self.data), self.targets]

    def run_info(self) -> dict:
        return {**super().run_info(), "batch_size": self.batch_size, "weight_loss": self.weight_loss,
                "hyper": json.loads(self.hyper.config.to_json()), "lidb": _lidb_info(self.lidb)}

    def finish(self) -> None:
        super().finish()
        self.lidb.set(None)


def train_hypernetwork(hyper: HyperNetwork, pipe: TextToImage, lidb: LiDB, data: SubjectData,
                       targets: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 3e-4,
                       weight_loss: float = 1.0, seed: int = 0, max_seconds: float | None = None,
                       progress: bool = False, checkpoint_path: str | Path | None = None,
                       checkpoint_every: int = 100, resume: bool = True,
                       callback: Callable[[FineTune], None] | None = None) -> HyperTrainResult:
    """L = diffusion loss with the predicted weights on the input image + weight_loss * mean squared distance
    to the subject's pre-optimised weights `targets` (S, layers, numbers) ([1], Section 4.2), in a HyperFit.
    checkpoint_path, resume: as in course_lib.lora.fine_tune."""
    run = HyperFit(hyper, pipe, lidb, data, targets, steps=steps, lr=lr, batch_size=batch_size,
                   weight_loss=weight_loss, seed=seed)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume,
            max_seconds=max_seconds, progress=progress, callback=callback, desc="hypernetwork")
    h = run.history
    return HyperTrainResult(h["loss"], h.get("diffusion", []), h.get("weight", []), run.seconds, run.step)


def save_hypernetwork(path: str | Path, hyper: HyperNetwork, lidb_config: LiDBConfig, lidb_seed: int,
                      info: dict | None = None) -> Path:
    """float16 weights, the config, and the LiDB config and seed (the frozen bases are rebuilt from it)."""
    meta = {"format": FORMAT, "config": hyper.config.to_json(),
            "lidb": json.dumps({**asdict(lidb_config), "targets": list(lidb_config.targets)}),
            "lidb_seed": str(lidb_seed), "info": json.dumps(info or {})}
    return ckpt.atomic_save(ckpt.compact_state(hyper), path, meta)


def load_hypernetwork(path: str | Path, device: torch.device | str | None = None,
                      ) -> tuple[HyperNetwork, LiDBConfig, int, dict]:
    """(hypernetwork in eval mode, the LiDB config and seed it predicts for, info)."""
    tensors, meta = ckpt.read_format(path, FORMAT, "hypernetwork")
    hyper = HyperNetwork(HyperConfig.from_json(meta["config"]))
    hyper.load_state_dict({k: v.float() for k, v in tensors.items()})
    hyper.eval().requires_grad_(False)
    if device is not None:
        hyper.to(device)
    lidb = json.loads(meta["lidb"])
    lidb["targets"] = tuple(lidb["targets"])
    return hyper, LiDBConfig(**lidb), int(meta["lidb_seed"]), json.loads(meta.get("info", "{}"))


# --- 3. Rank-relaxed fast fine-tuning ------------------------------------------------------------------------

def fast_finetune(pipe: TextToImage, lidb: LiDB, weights: torch.Tensor, images: torch.Tensor, prompts: list[str],
                  *, rank: int = 4, steps: int = 40, lr: float = 1e-3, batch_size: int = 4, seed: int = 0,
                  checkpoint_path: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
                  callback: Callable[[FineTune], None] | None = None) -> FitResult:
    """Relax the predicted rank-1 LiDB update to rank `rank` LoRA (lidb.to_lora) and fine-tune it for `steps`
    on the subject's image(s), without caption dropout (a CaptionedFineTune). `pipe` must be the pipeline whose
    U-Net holds `lidb`; after this call that U-Net carries LoRA layers instead (its LiDB layers are gone).
    checkpoint_path, resume: as in course_lib.lora.fine_tune."""
    lidb.to_lora(weights, rank=rank, seed=seed)
    unet = lidb.unet
    params = lora_lib.lora_parameters(unet)
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)
    c, m = pipe.encode(prompts)
    run = CaptionedFineTune(pipe, unet, params, z, c, m, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    run.run(checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume, callback=callback,
            desc="fast fine-tuning")
    unet.requires_grad_(False)
    return FitResult(weights, run.history["loss"], run.seconds, run.step)


__all__ = ["LiDBConfig", "semi_orthogonal", "LiDBLayer", "LiDB", "lidb_numbers", "SubjectData", "subject_data",
           "personal_pipeline", "FitResult", "LiDBFit", "fit_lidb", "HyperConfig", "HyperNetwork", "hyper_config_for",
           "HyperTrainResult", "HyperFit", "train_hypernetwork", "save_hypernetwork", "load_hypernetwork",
           "fast_finetune"]
