r"""The 8 GB budget of a LoRA step on SD 1.5, part by part: a planner a learner can move (the budget notebook).

A training step's peak GPU memory is a sum of parts, each known best in its own way:

    weights       closed form: every network's parameter count times its bytes (float32 4, float16 / bfloat16 2;
                  an NF4 base, QLoRA's: the U-Net's linear layers at NF4's bytes a weight, the rest float16)
    adapters      closed form: LoRA's numbers, r (in + out) for each of the U-Net's attention projections, kept
                  in float32 (4 bytes), their gradients (4) and AdamW's two moments (8, or about 2 with 8-bit AdamW)
    activations   accounted (course_lib.memory.accounting) for batches of one and two images at each resolution,
                  with and without gradient checkpointing, and for each attention kernel: what the step saves for
                  backward plus its temporaries at the peak; a batch of b: a1 + (b - 1)(a2 - a1), a straight line
                  through the two (part of it, the prompt's encoding and the optimizer step, does not grow)
    workspaces    the GPU's matrix libraries' workspaces (course_lib.memory.GPUS)

Accounting one configuration takes seconds to minutes, too slow for a slider, so the activations of a grid of
configurations are accounted once (`account_activations`, `python scripts/budget_cache.py`) and read from
results/budget_activations.json; the closed forms are computed on the spot. tests/test_budget.py checks the sum
against direct accountings of whole steps (the rows of results/memory_sd15_accounted_*.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .checks import check_choice, check_int
from .lora import DEFAULT_TARGETS, lora_numbers_formula, matching_layers
from .memory import GIB, GPUS, accounting, measure_peak
from .quantize import MIN_8BIT_SIZE

CACHE = Path(__file__).resolve().parent.parent / "results" / "budget_activations.json"
SIZES = (256, 512, 768)
ATTENTION = ("flash", "math", "math, sliced")      # the kernel; "math, sliced": one (image, head) pair at a time
WEIGHTS = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "nf4": None}   # bytes a base weight (NF4: see nf4_bytes)
OPTIMIZERS = {"AdamW": 8.0, "8-bit AdamW": 2.0 + 8 / 2048}      # bytes of moments a trained number
PARTS = ("weights", "adapters + gradients + optimizer", "activations", "workspaces")


@lru_cache(maxsize=1)
def nf4_bytes() -> float:
    """Bytes a weight in NF4 with double quantisation (course_lib.quantize), measured on a 64 x 4,096 weight."""
    from .quantize import nf4_quantize
    return nf4_quantize(torch.zeros(64, 4096)).nbytes / (64 * 4096)


@lru_cache(maxsize=2)
def counts(preset: str = "sd15") -> dict[str, int]:
    """Parameter counts of the preset's networks, built on the meta device (no memory): the U-Net's, its share in
    linear layers NF4 would quantise (course_lib.quantize.nf4_linears: at least 64 inputs), the VAE's, the text
    encoder's, and LoRA's numbers for rank 1 on the default targets (a rank-r adapter has r times as many)."""
    from .sd import sd_preset
    from .text import TextEncoder
    from .unet import UNet
    from .vae import VAE
    cfg = sd_preset(preset)
    with torch.device("meta"):
        unet, vae, text = UNet(cfg.unet), VAE(cfg.vae), TextEncoder(cfg.text)
    linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear) and m.in_features >= 64)
    adapted = [unet.get_submodule(name) for name in matching_layers(unet, DEFAULT_TARGETS)]
    return {"unet": sum(p.numel() for p in unet.parameters()), "unet_linear": linear,
            "vae": sum(p.numel() for p in vae.parameters()), "text_encoder": sum(p.numel() for p in text.parameters()),
            "lora_per_rank": sum(lora_numbers_formula(m, 1) for m in adapted),
            "lora_shapes": tuple((m.in_features, m.out_features) for m in adapted)}


def weights_bytes(weights: str = "fp16", preset: str = "sd15") -> float:
    """The three networks' weights: the U-Net in `weights` (NF4: its linear layers only, the rest float16), the VAE
    and text encoder in float16 (float32 with "fp32")."""
    check_choice("weights", weights, tuple(WEIGHTS))
    n = counts(preset)
    if weights == "nf4":
        unet = n["unet_linear"] * nf4_bytes() + (n["unet"] - n["unet_linear"]) * 2
    else:
        unet = n["unet"] * WEIGHTS[weights]
    return unet + (n["vae"] + n["text_encoder"]) * (4 if weights == "fp32" else 2)


def adapter_bytes(rank: int = 4, optimizer: str = "AdamW", preset: str = "sd15") -> float:
    """LoRA's float32 numbers, their gradients and the optimizer's moments. 8-bit AdamW keeps float32 moments for
    a tensor (each A is rank x d_in, each B d_out x rank) of fewer than quantize.MIN_8BIT_SIZE numbers."""
    check_int("LoRA rank", rank, 1)
    check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
    n = counts(preset)
    sizes = [rank * d for shape in n["lora_shapes"] for d in shape]
    moments = sum(size * (OPTIMIZERS[optimizer] if size >= MIN_8BIT_SIZE else OPTIMIZERS["AdamW"]) for size in sizes)
    return n["lora_per_rank"] * rank * 8 + moments


def account_activations(size: int, checkpointing: bool, attention: str, gpu: str = "T4", preset: str = "sd15",
                        batch: int = 1) -> dict:
    """Account two LoRA steps (rank 4, float16 base, AdamW: course_lib.sd.LoRAFineTune) at size x size and return the
    peak's parts in bytes: {"peak", "weights", "gradients", "optimizer state", "activations" (activations, temporaries,
    buffers and the rest at the peak), "workspaces"}."""
    from .attention import sliced_attention
    from .sd import LoRAFineTune, StableDiffusion
    check_choice("attention", attention, ATTENTION)
    with accounting(gpu, "flash" if attention == "flash" else "math"):
        sd = StableDiffusion.random(preset, dtype=torch.float16)
        image = torch.zeros(batch, 3, size, size)

        def step():
            with sliced_attention(1 if attention == "math, sliced" else None):
                LoRAFineTune(sd, image, ["a photo of a dog"] * batch, steps=2, rank=4, batch_size=batch,
                             gradient_checkpointing=checkpointing).run(progress=False)
        report = measure_peak(step, what=f"LoRA step at {size} px", resident=(sd.unet, sd.vae, sd.text_encoder))
    c = report.categories
    fixed = ("weights", "gradients", "optimizer state", "workspaces")
    return {"peak": report.peak_bytes, **{k: c[k] for k in fixed},
            "activations": report.peak_bytes - sum(c[k] for k in fixed)}


@lru_cache(maxsize=1)
def _cache() -> dict:
    if not CACHE.exists():
        raise FileNotFoundError(f"{CACHE} is missing: run `python scripts/budget_cache.py` to account the activations")
    return json.loads(CACHE.read_text())


def cache_key(size: int, checkpointing: bool, attention: str, batch: int) -> str:
    return f"{size} px|{'checkpointing' if checkpointing else 'no checkpointing'}|{attention}|batch {batch}"


def activation_bytes(size: int, checkpointing: bool, attention: str, batch: int = 1) -> float:
    """A batch's activations and temporaries at the peak of a LoRA step: the straight line through the accounted
    batches of one and two (results/budget_activations.json)."""
    check_choice("attention", attention, ATTENTION)
    check_choice("size", size, SIZES)
    check_int("batch", batch, 1)
    one, two = (_cache()["runs"][cache_key(size, checkpointing, attention, b)]["activations"] for b in (1, 2))
    return one + (batch - 1) * (two - one)


@dataclass
class Plan:
    """A LoRA step's peak, part by part (bytes), against a budget."""
    parts: dict[str, float]
    budget_gib: float = 8.0

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values()) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib

    def __str__(self) -> str:
        rows = [f"{name:34s} {value / GIB:6.2f} GiB" for name, value in self.parts.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join(rows + [f"{'total (accounted)':34s} {self.total_gib:6.2f} GiB: {verdict} in "
                                 f"{self.budget_gib:g} GiB"])


def plan(size: int = 512, batch: int = 1, weights: str = "fp16", checkpointing: bool = True,
         attention: str = "flash", rank: int = 4, optimizer: str = "AdamW", gpu: str = "T4",
         budget_gib: float = 8.0) -> Plan:
    """The peak of a LoRA step on SD 1.5, part by part: closed forms for weights and adapters, accounted
    activations for the batch, the GPU's workspaces."""
    check_int("batch", batch, 1)
    check_choice("GPU", gpu, tuple(GPUS))
    if not (isinstance(budget_gib, (int, float)) and math.isfinite(budget_gib) and budget_gib > 0):
        raise ValueError(f"budget_gib must be a positive number; got {budget_gib!r}")
    return Plan({"weights": weights_bytes(weights), "adapters + gradients + optimizer": adapter_bytes(rank, optimizer),
                 "activations": activation_bytes(size, checkpointing, attention, batch),
                 "workspaces": GPUS[gpu].workspace_bytes}, budget_gib)


__all__ = ["CACHE", "SIZES", "ATTENTION", "WEIGHTS", "OPTIMIZERS", "PARTS", "nf4_bytes", "counts", "weights_bytes",
           "adapter_bytes", "account_activations", "cache_key", "activation_bytes", "Plan", "plan"]
