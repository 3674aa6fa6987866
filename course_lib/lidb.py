r"""Lightweight DreamBooth (LiDB), the first piece of HyperDreamBooth (Ruiz et al. 2023, arXiv 2307.06949).

Rank-1 LoRA, with each factor split again through a frozen random orthogonal basis ([1], Section 4.1;
a = 100, b = 50 there):

    A = A_train A_aux      A_train: (r x a) trained,  A_aux: (a x in) frozen, orthonormal rows/columns
    B = B_aux B_train      B_aux: (out x b) frozen,   B_train: (b x r) trained
    W' = W + (alpha / r) B A

so a layer trains r (a + b) = 150 numbers whatever its size. On the tiny SD's 40 attention projections
that is 6,000 numbers per subject, against 34k for rank-4 LoRA and 3.4M for full fine-tuning.

The trained numbers are not parameters of the layers but a tensor handed to them (`LiDB.set`), one row
per sample if asked: a batch can carry many subjects at once, which is what makes pre-optimising the
weights of hundreds of training subjects, and a hypernetwork that predicts them, affordable
(course_lib.hyperdreambooth). `LiDB.to_lora` relaxes a rank-1 update into an ordinary LoRA ([1], 4.3).

[1] N. Ruiz et al., "HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models", 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import lora as lora_lib
from .checks import check_int


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
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))

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
            lora_lib.replace_module(unet, name, layer)
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
            lora_lib.replace_module(self.unet, name, layer.base)
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


__all__ = ["LiDBConfig", "semi_orthogonal", "LiDBLayer", "LiDB", "lidb_numbers"]
