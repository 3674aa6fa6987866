r"""HyperDreamBooth (Ruiz et al. 2023, arXiv 2307.06949): personalise from one image, fast, with few numbers.

Three pieces ([1], Section 4):

1. Lightweight DreamBooth (LiDB). Rank-1 LoRA, with each factor split again through a frozen random
   orthogonal basis (a = 100, b = 50 in [1]):

        A = A_train A_aux      A_train: (r x a) trained,  A_aux: (a x in) frozen, orthonormal rows/columns
        B = B_aux B_train      B_aux: (out x b) frozen,   B_train: (b x r) trained
        W' = W + (alpha / r) B A

   so a layer trains r (a + b) = 150 numbers whatever its size. On the tiny SD's 48 attention projections
   that is 7,200 numbers per subject, against 34k for rank-4 LoRA and 3.4M for full fine-tuning.

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

[1] N. Ruiz et al., "HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models", 2023.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import lora as lora_lib
from .dreambooth import IDENTIFIER, Subject, TONES, add_identifier, diffusion_loss, personalised_pipeline
from .pipeline import TextToImage
from .text import ImageEncoder, ImageEncoderConfig
from .unet import TransformerBlock
from .vae import encode_latents

FORMAT = "course_lib.hypernetwork/1"


# --- 1. LiDB ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LiDBConfig:
    rank: int = 1
    a: int = 100                  # A_aux's rows: the trained A_train lives in this many dimensions
    b: int = 50                   # B_aux's columns
    alpha: float = 1.0
    targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("rank", "a", "b"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")

    @property
    def numbers_per_layer(self) -> int:
        """r a (A_train) + b r (B_train): the same for every layer, whatever its shape."""
        return self.rank * (self.a + self.b)


def semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random (rows x cols) matrix with orthonormal rows (rows <= cols) or orthonormal columns (rows > cols),
    from the QR decomposition of a Gaussian matrix (signs fixed so the distribution is uniform)."""
    big, small = max(rows, cols), min(rows, cols)
    q, r = torch.linalg.qr(torch.randn(big, small, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))             # (big, small), orthonormal columns
    return (q if rows > cols else q.T).float().contiguous()


class LiDBLayer(nn.Module):
    """A frozen nn.Linear plus the LiDB update, with the trained numbers supplied per sample (`weights`)."""

    def __init__(self, base: nn.Linear, config: LiDBConfig, generator: torch.Generator):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LiDB adapts nn.Linear layers; got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.config = config
        dev = base.weight.device
        self.register_buffer("A_aux", semi_orthogonal(config.a, base.in_features, generator).to(dev))
        self.register_buffer("B_aux", semi_orthogonal(base.out_features, config.b, generator).to(dev))
        self.weights: torch.Tensor | None = None        # (N, r (a + b)), set by LiDB.set

    def factors(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weights (N, r (a + b)) -> A (N, r, in), B (N, out, r)."""
        r, a, b = self.config.rank, self.config.a, self.config.b
        A_train = weights[:, :r * a].reshape(-1, r, a)
        B_train = weights[:, r * a:].reshape(-1, b, r)
        return A_train @ self.A_aux, self.B_aux @ B_train

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """(N, out, in): (alpha / r) B A for each sample's numbers."""
        A, B = self.factors(weights)
        return (self.config.alpha / self.config.rank) * (B @ A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        w = self.weights
        if w is None:
            return out
        N = x.shape[0]
        if w.shape[0] != N:
            if N % w.shape[0]:
                raise ValueError(f"LiDB weights are set for {w.shape[0]} samples; the batch has {N}. Set one "
                                 f"row (shared), or one per sample")
            w = w.repeat(N // w.shape[0], 1)   # one row shared, or a guided batch [cond; uncond] of 2 N
        A, B = self.factors(w.to(x.dtype))
        h = torch.einsum("n...i,nri->n...r", x, A)
        return out + (self.config.alpha / self.config.rank) * torch.einsum("n...r,nor->n...o", h, B)


class LiDB:
    """LiDB layers in a U-Net. The numbers for all layers form one tensor (N, layers, numbers_per_layer).

        lidb = LiDB(unet)                       # wraps the attention projections, freezes the U-Net
        w = lidb.init_weights(n_subjects)       # A_train shared random, B_train zero: the base model
        lidb.set(w[subject_of_each_sample])     # then unet(...) runs each sample with its own update
    """

    def __init__(self, unet: nn.Module, config: LiDBConfig | None = None, seed: int = 0):
        self.config = cfg = config or LiDBConfig()
        self.unet = unet
        names = lora_lib.matching_layers(unet, cfg.targets)
        unet.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.layers: dict[str, LiDBLayer] = {}
        for name in names:
            layer = LiDBLayer(unet.get_submodule(name), cfg, g)
            lora_lib._set_child(unet, name, layer)
            self.layers[name] = layer
        self.names = names
        self._init_A = torch.randn(len(names), cfg.rank * cfg.a, generator=g) / math.sqrt(cfg.a)

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, numbers per layer)."""
        return len(self.names), self.config.numbers_per_layer

    @property
    def numbers(self) -> int:
        """Trained numbers per subject: layers x r (a + b)."""
        return self.shape[0] * self.shape[1]

    def init_weights(self, n: int = 1) -> torch.Tensor:
        """(n, layers, numbers): A_train the same random start for every subject, B_train zero, so the
        update is zero (the base model) and subjects differ only by what they learned."""
        w = torch.zeros(n, *self.shape)
        w[:, :, :self._init_A.shape[1]] = self._init_A
        return w

    def check(self, weights: torch.Tensor) -> torch.Tensor:
        if weights.ndim == 2:
            weights = weights[None]
        if weights.ndim != 3 or tuple(weights.shape[1:]) != self.shape:
            raise ValueError(f"LiDB weights must be (N, {self.shape[0]}, {self.shape[1]}) (subjects, layers, "
                             f"r(a+b)); got {tuple(weights.shape)}")
        return weights

    def set(self, weights: torch.Tensor | None) -> None:
        """Use these numbers from now on: (N, layers, numbers), N = 1 (shared) or one row per sample."""
        if weights is None:
            for layer in self.layers.values():
                layer.weights = None
            return
        weights = self.check(weights)
        for i, layer in enumerate(self.layers.values()):
            layer.weights = weights[:, i]

    def remove(self) -> nn.Module:
        """Put the plain layers back; returns the U-Net."""
        for name, layer in self.layers.items():
            lora_lib._set_child(self.unet, name, layer.base)
        return self.unet

    def to_lora(self, weights: torch.Tensor, rank: int = 4, seed: int = 0) -> None:
        """Rank relaxation ([1], Section 4.3): replace the LiDB layers by LoRA layers of `rank` whose first
        component is exactly this LiDB update and whose other components start at zero (A random, B zero).
        The U-Net's output is unchanged; afterwards all r (in + out) numbers per layer can train."""
        weights = self.check(weights)
        if weights.shape[0] != 1:
            raise ValueError(f"to_lora takes one subject's weights (1, ...); got {weights.shape[0]}")
        cfg = self.config
        factors = {name: layer.factors(weights[:, i].to(layer.A_aux.device))
                   for i, (name, layer) in enumerate(self.layers.items())}
        self.remove()
        # alpha = rank keeps (alpha / r) = 1 = LiDB's alpha / r for rank 1
        lora_lib.inject_lora(self.unet, targets=tuple(self.names), rank=rank,
                             alpha=float(rank) * cfg.alpha / cfg.rank, seed=seed)
        with torch.no_grad():
            for name, layer in lora_lib.lora_layers(self.unet).items():
                A, B = factors[name]
                layer.lora_A[:cfg.rank] = A[0]
                layer.lora_B.zero_()
                layer.lora_B[:, :cfg.rank] = B[0]
        self.unet._lora_targets = cfg.targets


def lidb_numbers(unet: nn.Module, config: LiDBConfig | None = None) -> dict[str, int]:
    """Trained numbers per subject: LiDB, rank-r LoRA on the same layers, and full fine-tuning."""
    cfg = config or LiDBConfig()
    layers = [unet.get_submodule(n) for n in lora_lib.matching_layers(unet, cfg.targets)]
    return {"lidb": len(layers) * cfg.numbers_per_layer,
            "lora_rank1": sum(lora_lib.lora_numbers_formula(m, 1) for m in layers),
            "lora_rank4": sum(lora_lib.lora_numbers_formula(m, 4) for m in layers),
            "full": sum(p.numel() for p in unet.parameters())}


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


def fit_lidb(pipe: TextToImage, lidb: LiDB, data: SubjectData, *, steps: int, batch_size: int = 32,
             lr: float = 1e-2, init: torch.Tensor | None = None, seed: int = 0, max_seconds: float | None = None,
             progress: bool = False) -> FitResult:
    """Optimise LiDB weights for every subject in `data` at once: each sample of a batch runs with its own
    subject's numbers, so S subjects cost one U-Net pass per batch, not S. Returns weights (S, layers, numbers)."""
    S = int(data.subject.max()) + 1
    start = lidb.init_weights(S) if init is None else init.clone().float()
    # One row per subject in an embedding table with sparse gradients, and SparseAdam ("lazy" Adam): a step
    # updates only the subjects in its batch, where dense Adam would also move every absent subject along its old
    # momentum. Over all 271 training subjects lr 3e-2 diverged (with dense Adam and with this); 1e-2 is stable.
    table = nn.Embedding(S, lidb.numbers, sparse=True)
    with torch.no_grad():
        table.weight.copy_(start.reshape(S, -1))
    opt = torch.optim.SparseAdam(table.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"LiDB ({S} subject{'s' if S > 1 else ''})")
    done = 0
    try:
        for _ in it:
            i = torch.randint(0, len(data.latents), (batch_size,), generator=g)
            lidb.set(table(data.subject[i]).view(len(i), *lidb.shape).to(pipe.device))
            loss = diffusion_loss(lidb.unet, pipe, data.latents[i], data.context[i], data.mask[i], g)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"LiDB loss became {loss.item()} at step {done}; lower lr ({lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            done += 1
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
    finally:
        lidb.set(None)
    return FitResult(table.weight.detach().view(S, *lidb.shape).clone(), losses, time.perf_counter() - t0, done)


# --- 2. The hypernetwork ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HyperConfig:
    layers: int                                    # LiDB layers to predict (48 for the tiny SD)
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


def train_hypernetwork(hyper: HyperNetwork, pipe: TextToImage, lidb: LiDB, data: SubjectData,
                       targets: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 3e-4,
                       weight_loss: float = 1.0, seed: int = 0, max_seconds: float | None = None,
                       progress: bool = False) -> HyperTrainResult:
    """L = diffusion loss with the predicted weights on the input image + weight_loss * mean squared distance
    to the subject's pre-optimised weights `targets` (S, layers, numbers) ([1], Section 4.2)."""
    start = lidb.init_weights(1)[0].to(pipe.device)
    opt = torch.optim.AdamW(hyper.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    hyper.train()
    losses, diff, wl = [], [], []
    t0 = time.perf_counter()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="hypernetwork")
    done = 0
    try:
        for _ in it:
            i = torch.randint(0, len(data.latents), (batch_size,), generator=g)
            w = hyper(data.images[i].to(pipe.device), start)
            lidb.set(w)
            d = diffusion_loss(lidb.unet, pipe, data.latents[i], data.context[i], data.mask[i], g)
            r = (w - targets[data.subject[i]].to(w.device)).pow(2).mean()
            loss = d + weight_loss * r
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"hypernetwork loss became {loss.item()} at step {done}; lower lr ({lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            diff.append(d.item())
            wl.append(r.item())
            done += 1
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
    finally:
        lidb.set(None)
        hyper.eval()
    return HyperTrainResult(losses, diff, wl, time.perf_counter() - t0, done)


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
                  ) -> FitResult:
    """Relax the predicted rank-1 LiDB update to rank `rank` LoRA (lidb.to_lora) and fine-tune it for `steps`
    on the subject's image(s). `pipe` must be the pipeline whose U-Net holds `lidb`; after this call that
    U-Net carries LoRA layers instead (its LiDB layers are gone)."""
    lidb.to_lora(weights, rank=rank, seed=seed)
    unet = lidb.unet
    params = lora_lib.lora_parameters(unet)
    z = encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)
    c, m = pipe.encode(prompts)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    unet.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(z), (batch_size,), generator=g)
        loss = diffusion_loss(unet, pipe, z[i], c[i], m[i], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    return FitResult(weights, losses, time.perf_counter() - t0, steps)


__all__ = ["LiDBConfig", "semi_orthogonal", "LiDBLayer", "LiDB", "lidb_numbers", "SubjectData", "subject_data",
           "personal_pipeline", "FitResult", "fit_lidb", "HyperConfig", "HyperNetwork", "hyper_config_for",
           "HyperTrainResult", "train_hypernetwork", "save_hypernetwork", "load_hypernetwork", "fast_finetune"]
