r"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685), for Linear and Conv2d layers.

A frozen weight W (out x in) gets a trainable low-rank update,

    h = W x + (alpha / r) * scale * B A x,      A: (r x in), B: (out x r), r << min(in, out)

A starts random and B at zero, so at initialisation B A = 0 and the adapted model is exactly the
base model ([1], Section 4.1). Only A and B train: r (in + out) numbers per layer instead of in * out.
`alpha / r` keeps the update's size roughly independent of r, so a learning rate found at one rank
still works at another ([1], Section 4.1). `scale` is not in the paper: it multiplies the update at
inference, so 0 gives the base model and 1 the adapted one, and values between blend the two.

For a Conv2d with kernel k, A is a conv with the base layer's kernel, stride and padding from in to r
channels, and B a 1x1 conv from r to out; their product is again a k x k kernel, so merging works too.

Merging adds (alpha / r) scale B A to W in place, after which the layer costs nothing extra at
inference. W + D - D is not always W in floating point, so merging keeps a copy of W (in CPU memory,
not on the GPU) and unmerging puts it back: bit for bit the base weights. A merged layer's scale is
fixed (it is baked into W): changing it is refused until the layer is unmerged.

A rank above min(in, out) (min(in k_h k_w, out) for a conv) adds numbers but no expressiveness, since
B A cannot have a higher rank than that; it is refused.

Fine-tuning (`fit_lora`: inject, then course_lib.finetune.fine_tune) runs through the course's one loop, so it
gets the same clipping, NaN guard, EMA, time budget, checkpoints and exact resume as the base model's
training.

    >>> names = inject_lora(unet, rank=4)              # the attention projections by default
    >>> count_parameters(unet, trainable_only=True)   # only the adapters train
    >>> save_lora("runs/style.safetensors", unet)     # adapters only: tens of kilobytes
    >>> with lora_scale(unet, 0.5): ...               # half-way between base and adapted

[1] E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .checks import check_int
from .finetune import FineTuneLog, fine_tune
from .forward import check_images

if TYPE_CHECKING:
    from .pipeline import TextToImage

# The attention projections of course_lib's U-Net (self- and cross-attention), as in [1]'s main
# experiments (which adapt W_q and W_v) and in most diffusion LoRAs (which adapt all four).
DEFAULT_TARGETS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out")
FORMAT = "course_lib.lora/1"


class LoRALayer(nn.Module):
    """A frozen base layer (nn.Linear or nn.Conv2d) plus a rank-r update (alpha / r) scale B A."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d layers; got {type(base).__name__}")
        rank = check_int("rank", rank, 1)
        if rank > max_rank(base):
            raise ValueError(f"rank {rank} is larger than this layer allows ({describe_layer(base)}): the largest "
                             f"valid rank is {max_rank(base)}, min(in, out)")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None    # W before merge (CPU), while merged
        self.scale = 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        else:
            if base.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            kh, kw = base.kernel_size
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=w.device, dtype=w.dtype))
            self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=w.device, dtype=w.dtype))
        # A random, B zero ([1], Section 4.1); the same uniform init as nn.Linear's weight
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        """The update's multiplier at inference (0: the base layer, 1: adapted); fixed while merged."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"scale must be a finite number; got {value!r}")
        if self.merged and float(value) != self._scale:
            raise ValueError(f"this LoRA layer is merged into its base weight at scale {self._scale:g}; unmerge it "
                             f"first (layer.unmerge() or unmerge_lora(model)), then change the scale to {value:g}")
        self._scale = float(value)

    @property
    def scaling(self) -> float:
        """alpha / r: the fixed factor in front of B A."""
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) scale B A, shaped like the base weight."""
        if isinstance(self.base, nn.Linear):
            delta = self.lora_B @ self.lora_A
        else:
            delta = torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A)
        return delta * (self.scaling * self.scale)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) scale B A x, computed as two thin products (never forming B A)."""
        x = self.dropout(x)
        if isinstance(self.base, nn.Linear):
            h = F.linear(F.linear(x, self.lora_A), self.lora_B)
        else:
            b = self.base
            h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
            h = F.conv2d(h, self.lora_B)
        return h * (self.scaling * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.scale == 0:
            return out
        return out + self.update(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) scale B A, keeping a CPU copy of W; the layer then runs at the base layer's cost."""
        if not self.merged:
            self._unmerged_weight = self.base.weight.detach().to("cpu", copy=True)
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- the W saved by merge: the base weights exactly, bit for bit."""
        if self.merged:
            self.base.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


def max_rank(layer: nn.Linear | nn.Conv2d) -> int:
    """The largest rank B A can have: min(in, out) for a Linear, min(in k_h k_w, out) for a Conv2d."""
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    kh, kw = layer.kernel_size
    return min(layer.in_channels * kh * kw, layer.out_channels)


def describe_layer(layer: nn.Linear | nn.Conv2d) -> str:
    """'Linear 64 -> 48', or 'Conv2d 4 -> 6, kernel 3x3, in*k*k = 36'."""
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features} -> {layer.out_features}"
    kh, kw = layer.kernel_size
    return (f"Conv2d {layer.in_channels} -> {layer.out_channels}, kernel {kh}x{kw}, "
            f"in*k*k = {layer.in_channels * kh * kw}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` in place of the submodule called `name` (as in model.named_modules(), e.g. "down.0.attn.to_q")
    and return the module it replaces. How LoRA and LiDB (course_lib.lidb) wrap a layer and put the plain
    layer back."""
    old = model.get_submodule(name)                   # names the missing part if there is no such module
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return old


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can adapt (Linear and Conv2d), e.g. to choose `targets` from."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and not n.endswith(".base")]


def matching_layers(model: nn.Module, targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS) -> list[str]:
    """The adaptable layers whose names match any of the shell-style patterns in `targets`."""
    if isinstance(targets, str):
        targets = (targets,)
    names = [n for n in adaptable_layers(model) if any(fnmatch.fnmatchcase(n, p) for p in targets)]
    if not names:
        available = adaptable_layers(model)
        raise ValueError(f"no Linear or Conv2d layer matches targets {list(targets)}; the model has "
                         f"{len(available)}, e.g. {available[:8]}")
    return names


def inject_lora(model: nn.Module, targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS, rank: int = 4,
                alpha: float | None = None, dropout: float = 0.0, seed: int | None = 0) -> list[str]:
    """Freeze every parameter of `model` and wrap each layer matching `targets` in a LoRALayer.

    targets  shell-style patterns over module names (see `adaptable_layers(model)`)
    alpha    defaults to rank, so alpha / r = 1
    seed     seeds A's initialisation (None: the global RNG)
    Returns the names of the adapted layers. Adapting a model twice is an error; `remove_lora` first."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; call remove_lora(model) (or merge them) first")
    names = matching_layers(model, targets)
    too_small = [n for n in names if isinstance(rank, int) and rank > max_rank(model.get_submodule(n))]
    if too_small:                                     # checked before anything changes
        first = model.get_submodule(too_small[0])
        raise ValueError(f"rank {rank} is too large for layer {too_small[0]!r} ({describe_layer(first)}): the "
                         f"largest valid rank there is {max_rank(first)}, min(in, out); {len(too_small)} of the "
                         f"{len(names)} matched layers are too small, and the largest rank valid for all is "
                         f"{min(max_rank(model.get_submodule(n)) for n in names)}")
    model.requires_grad_(False)
    rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            replace_module(model, name, LoRALayer(model.get_submodule(name), rank, alpha, dropout))
    model._lora_targets = tuple([targets] if isinstance(targets, str) else targets)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """name -> LoRALayer for every adapted layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _layers(model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model) or load_lora(path, model) first")
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B, for the optimiser."""
    return [p for layer in _layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the update's multiplier on every layer: 0 = base model, 1 = adapted, between = a blend."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    layers = _layers(model)
    merged = [n for n, layer in layers.items() if layer.merged and layer.scale != scale]
    if merged:                                        # checked before any layer changes
        raise ValueError(f"{len(merged)} LoRA layers (e.g. {merged[0]!r}) are merged into the base weights at "
                         f"another scale; unmerge_lora(model) first, then change the scale")
    for layer in layers.values():
        layer.scale = float(scale)


@contextlib.contextmanager
def lora_scale(model: nn.Module, scale: float):
    """Temporarily run at another scale: `with lora_scale(unet, 0.5): images = pipe(...)`. Layers merged
    inside the block must be unmerged before it ends (their scale is baked into the weights), unless they
    were removed (`remove_lora(unet, merge=True)` bakes the LoRA in at 0.5)."""
    layers = _layers(model)
    before = {n: layer.scale for n, layer in layers.items()}
    set_lora_scale(model, scale)
    try:
        yield model
    finally:
        present, stuck = {id(layer) for layer in lora_layers(model).values()}, []
        for n, layer in layers.items():
            if id(layer) in present and layer.merged and layer.scale != before[n]:
                stuck.append(n)
            elif not layer.merged:
                layer.scale = before[n]
        if stuck:
            raise ValueError(f"{len(stuck)} LoRA layers (e.g. {stuck[0]!r}) were merged inside `with lora_scale("
                             f"model, {scale:g})`, so their scale cannot go back to {before[stuck[0]]:g}; they stay "
                             f"merged at {scale:g}. Call unmerge_lora(model) before the block ends")


def merge_lora(model: nn.Module) -> None:
    for layer in _layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in _layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the plain layers back (merged with their update if `merge`, else unchanged); returns `model`."""
    for name, layer in _layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.base)
    if hasattr(model, "_lora_targets"):
        del model._lora_targets
    return model


# --- Sizes -----------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.lora_A": A, "<layer>.lora_B": B}: the adapter and nothing else."""
    out = {}
    for name, layer in _layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach()
        out[f"{name}.lora_B"] = layer.lora_B.detach()
    return out


def adapter_numbers(model: nn.Module) -> int:
    """How many numbers the adapter holds: the sum over layers of r (in + out) (times k*k for A of a conv)."""
    return sum(t.numel() for t in lora_state_dict(model).values())


def lora_numbers_formula(layer: nn.Linear | nn.Conv2d, rank: int) -> int:
    """r (in + out) for a Linear; r (in k_h k_w + out) for a Conv2d: [1]'s count, per layer."""
    if isinstance(layer, nn.Linear):
        return rank * (layer.in_features + layer.out_features)
    kh, kw = layer.kernel_size
    return rank * (layer.in_channels * kh * kw + layer.out_channels)


# --- Fine-tuning the adapters (the loop, FineTune and fine_tune are course_lib.finetune's) -------------------

def fit_lora(pipe: "TextToImage", images: torch.Tensor, captions: list[str], *, rank: int = 4,
             alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0,
             **options) -> FineTuneLog:
    """Inject LoRA into pipe.unet (in place; the base weights stay frozen) and train only the adapters;
    options go to course_lib.finetune.fine_tune (steps, batch_size, lr, caption_dropout, max_seconds, ema,
    progress, checkpoint_path, checkpoint_every, resume, callback). Bad images are refused before anything changes."""
    check_images(images, "images")
    inject_lora(pipe.unet, targets=targets, rank=rank, alpha=alpha, seed=seed)
    adapters = sorted({(layer.rank, layer.alpha, layer.scale) for layer in lora_layers(pipe.unet).values()})
    log = fine_tune(pipe, images, captions, lora_parameters(pipe.unet), seed=seed, info={"lora": adapters},
                    **options)
    pipe.unet.requires_grad_(False)
    return log


# --- Files ---------------------------------------------------------------------------------------------

def save_lora(path: str | Path, model: nn.Module, info: dict | None = None) -> Path:
    """Write only the adapters (float16) with rank, alpha and targets in the metadata, atomically."""
    layers = _layers(model)
    ranks = {layer.rank for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"save_lora writes one rank and alpha for all layers; this model mixes ranks {ranks} "
                         f"and alphas {alphas}")
    tensors = {k: v.to(torch.float16).contiguous().cpu() for k, v in lora_state_dict(model).items()}
    metadata = {"format": FORMAT, "rank": str(ranks.pop()), "alpha": repr(alphas.pop()),
                "targets": json.dumps(list(getattr(model, "_lora_targets", DEFAULT_TARGETS))),
                "layers": json.dumps(sorted(layers)), "info": json.dumps(info or {})}
    return ckpt.atomic_save(tensors, path, metadata)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with rank int, alpha float, targets list, layers list, info dict) of an adapter file,
    read and checksum-verified by course_lib.checkpoint (a damaged, truncated or empty file is refused by name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no LoRA file at {path}")
    tensors, meta = ckpt.read_format(path, FORMAT, "LoRA")
    meta = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "targets": json.loads(meta["targets"]),
            "layers": json.loads(meta["layers"]), "info": json.loads(meta.get("info", "{}"))}
    return tensors, meta


def load_lora(path: str | Path, model: nn.Module) -> dict:
    """Load an adapter into `model`: injects LoRA with the file's rank, alpha and layers when the model has
    none; otherwise the layers must be the same. Returns the file's metadata."""
    tensors, meta = read_lora(path)
    if not lora_layers(model):
        available = set(adaptable_layers(model))
        missing = [n for n in meta["layers"] if n not in available]
        if missing:
            raise ValueError(f"the adapter in {path} adapts layers this model does not have: {missing[:8]}")
        inject_lora(model, targets=tuple(meta["layers"]), rank=meta["rank"], alpha=meta["alpha"])
        model._lora_targets = tuple(meta["targets"])
    layers = _layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError(f"the model's LoRA layers are merged; unmerge_lora(model) before loading {path} into them")
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter {path} does not fit the model's LoRA layers: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with torch.no_grad():
        for name, layer in layers.items():
            for ab in "AB":
                p = getattr(layer, f"lora_{ab}")
                t = tensors[f"{name}.lora_{ab}"]
                if t.shape != p.shape:
                    raise ValueError(f"{name}.lora_{ab} has shape {tuple(t.shape)} in {path}; the model's is "
                                     f"{tuple(p.shape)} (rank {layer.rank})")
                p.copy_(t.to(p.dtype))
    return meta


def stack_lora(path: str | Path, model: nn.Module, scale: float = 1.0) -> dict:
    """Two LoRAs at once (LCM-LoRA's combination with a style LoRA, Luo et al. 2023b: W + s1 B1 A1 + s2 B2 A2): the model's
    adapters are merged into its base weights at their scale and removed (`remove_lora(model, merge=True)`; that
    is final: keep a copy of the base to go back), then the adapter in `path` is loaded at `scale`, where it merges,
    unmerges and rescales on its own. Returns its metadata (read_lora's)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    _, meta = read_lora(path)                         # a bad file is refused before the model changes
    missing = sorted(set(meta["layers"]) - set(adaptable_layers(model)) - set(lora_layers(model)))
    if missing:
        raise ValueError(f"the adapter in {path} adapts layers this model does not have: {missing[:8]}")
    if lora_layers(model):
        remove_lora(model, merge=True)
    meta = load_lora(path, model)
    set_lora_scale(model, scale)
    return meta


__all__ = ["DEFAULT_TARGETS", "LoRALayer", "max_rank", "describe_layer", "replace_module", "adaptable_layers",
           "matching_layers", "inject_lora", "lora_layers", "lora_parameters", "set_lora_scale", "lora_scale",
           "merge_lora", "unmerge_lora", "remove_lora", "lora_state_dict", "adapter_numbers", "lora_numbers_formula",
           "fit_lora", "save_lora", "read_lora", "load_lora", "stack_lora"]
