r"""Fewer bytes a number: block-wise quantisation, 8-bit Adam, NF4 weights, stochastic rounding.

Where the memory of training goes (course_lib.memory accounts it): AdamW keeps two float32 moments per weight,
8 bytes, twice the float32 weights themselves. Three ideas shrink the parts that do not need 32 bits:

Block-wise quantisation [1]. Cut a tensor into blocks of B values; keep each block's absolute maximum
(float32) and each value as the index of the nearest of 256 codes in [-1, 1]:

    q_i = argmin_j | x_i / absmax(block) - code_j |,        x_i ~ code[q_i] * absmax(block)

One byte a value plus 4 / B. Blocks keep one outlier from flattening a whole tensor's resolution. The codes
are *dynamic* [1]: dense near zero and sparse near 1 (a decimal exponent and a linear fraction per code), since
optimiser moments span many orders of magnitude. The second moment is never negative, so it gets codes over
[0, 1] only: twice the resolution.

8-bit Adam [1] (`AdamW8bit`). Both moments stored block-wise quantised (m signed, v unsigned, B = 2048):
each step dequantises them, takes the ordinary AdamW step in float32, and quantises them again. 2.004 bytes a
weight instead of 8.

NF4 [2] (`nf4_quantize`). Weights of a trained network are close to normal, so 4-bit codes placed at the
normal distribution's quantiles give every code the same share of values ("information-theoretically optimal").
Blocks of 64; the 64-value blocks' float32 absmax values are themselves quantised to 8 bits in blocks of 256
("double quantisation", another 0.37 bits a weight saved). 0.516 bytes a weight: SD 1.5's 860M-weight U-Net
in 0.44 GB. QLoRA trains LoRA adapters on such a frozen base, dequantising each weight as it is used.

Stochastic rounding [3] (`stochastic_round_bf16`). Training in pure bfloat16 (no float32 master copy) fails
when updates are smaller than half a bf16 step of the weight: rounding to nearest drops them every time. Rounding
up with probability equal to the distance covered keeps them on average: E[round(x)] = x. For a float32 x this is
adding 16 random bits below bf16's last bit and truncating.

Weights on disk (`save_8bit`, `read_8bit`): the same block-wise scheme with 255 evenly spaced codes (absmax
int8, blocks of 64) keeps a trained network's weights in about a byte each, for a file too big to ship in
float16 (the course's ControlNet); read back to float32, each weight within half a code step.

References:
  [1] Dettmers, Lewis, Shleifer, Zettlemoyer. 8-bit Optimizers via Block-wise Quantization. 2022.
      https://arxiv.org/abs/2110.02861
  [2] Dettmers, Pagnoni, Holtzman, Zettlemoyer. QLoRA: Efficient Finetuning of Quantized LLMs. 2023.
      https://arxiv.org/abs/2305.14314
  [3] Zamirai, Zhang, Aberger, De Sa. Revisiting BFloat16 Training. 2020. https://arxiv.org/abs/2010.06192
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .checks import check_int, has_values


# --- Codes ------------------------------------------------------------------------------------------------

def dynamic_codes(signed: bool = True) -> torch.Tensor:
    """The 256 sorted codes of dynamic quantisation [1]: each is sign * 10^-e * f, with e = 0.. the number of
    leading zero bits, one indicator bit, and the remaining bits a linear fraction f in (0.1, 1]. Small e: few
    fraction bits near 1; large e: reaching down to 1e-6 or so. Includes 0 and +-1."""
    bits = 7 if signed else 8                            # what is left after the sign bit
    values = [0.0, 1.0]
    for e in range(bits):
        fraction_bits = bits - 1 - e
        n = 2 ** fraction_bits
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        values += (10.0 ** -e * (edges[:-1] + edges[1:]) / 2).tolist()   # the middles of n equal steps
    positive = torch.tensor(sorted(set(values)), dtype=torch.float64)    # 0, then 2^bits - 1 codes, then 1
    # one code too many for 8 bits: the smallest magnitude goes (from the negative side when signed)
    codes = torch.cat([-positive[2:].flip(0), positive]) if signed else torch.cat([positive[:1], positive[2:]])
    return codes.float()


def nf4_codes() -> torch.Tensor:
    """NormalFloat4 [2]: 16 codes at quantiles of N(0, 1), 8 positive and 7 negative plus an exact zero,
    normalised to [-1, 1] (the asymmetry gives zero its own code). offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2."""
    offset = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    ppf = lambda p: torch.special.ndtri(p)
    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    codes = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (codes / codes.abs().max()).float()


# --- Block-wise quantisation --------------------------------------------------------------------------------

@dataclass
class Quantized:
    """A tensor as code indices (uint8, two 4-bit indices a byte when packed) and per-block scales."""
    index: torch.Tensor          # uint8
    absmax: torch.Tensor         # float32, one per block (or the double-quantised form, see nf4_quantize)
    shape: tuple[int, ...]
    block: int
    packed: bool = False
    absmax_index: torch.Tensor | None = None     # double quantisation: absmax as 8-bit codes...
    absmax_scale: torch.Tensor | None = None     # ... of blocks of 256, with their own float32 scale
    absmax_mean: float = 0.0

    @property
    def nbytes(self) -> int:
        parts = [self.index] + ([self.absmax_index, self.absmax_scale] if self.absmax_index is not None
                                else [self.absmax])
        return sum(t.numel() * t.element_size() for t in parts)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    block = check_int("block", block, 1, hint=" (values per block)")
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    return (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(-1, block)


def _nearest(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The index of the nearest code for every value (codes sorted)."""
    middles = (codes[1:] + codes[:-1]) / 2
    return torch.bucketize(values.contiguous(), middles.to(values.device), out_int32=True).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, codes: torch.Tensor, block: int = 2048) -> Quantized:
    """x as the index of its nearest code after dividing each block by its absolute maximum."""
    blocks = _blocks(x, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    index = _nearest(blocks / absmax[:, None], codes)        # (the division copies: x itself is untouched)
    return Quantized(index.reshape(-1), absmax, tuple(x.shape), block)


def dequantize_blockwise(q: Quantized, codes: torch.Tensor) -> torch.Tensor:
    n = math.prod(q.shape)
    index = _unpack(q.index) if q.packed else q.index
    values = codes.to(q.index.device)[index.long()].view(-1, q.block) * _absmax(q)[:, None]
    return values.reshape(-1)[:n].view(q.shape)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)


def _absmax(q: Quantized) -> torch.Tensor:
    if q.absmax_index is None:
        return q.absmax
    codes = dynamic_codes(signed=True).to(q.absmax_scale.device)
    scaled = codes[q.absmax_index.long()].view(-1, 256) * q.absmax_scale[:, None]
    return scaled.reshape(-1)[:q.absmax.numel()] + q.absmax_mean


def nf4_quantize(weight: torch.Tensor, block: int = 64, double: bool = True) -> Quantized:
    """NF4 [2]: blocks of 64, two 4-bit codes a byte; with double, the blocks' absmax values quantised to 8 bits
    in blocks of 256 after subtracting their mean (QLoRA's double quantisation)."""
    q = quantize_blockwise(weight, nf4_codes(), block)
    index = q.index.view(-1, 2)
    q.index, q.packed = (index[:, 0] << 4) | index[:, 1], True
    if double:
        mean = float(q.absmax.mean()) if has_values(q.absmax) else 0.0
        inner = quantize_blockwise(q.absmax - mean, dynamic_codes(signed=True), 256)
        q.absmax_index, q.absmax_scale, q.absmax_mean = inner.index, inner.absmax, mean
    return q


def nf4_dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_blockwise(q, nf4_codes()).to(dtype)


class NF4Linear(nn.Linear):
    """A frozen nn.Linear whose weight is kept in NF4 with double quantisation (QLoRA's base [2]) and
    dequantised to `dtype` each time it is used: `.weight` is that dequantised tensor, so course_lib.lora's
    adapters wrap it like any nn.Linear (their own weights stay in full precision and train)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None, block: int = 64):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = dtype or linear.weight.dtype
        q = nf4_quantize(linear.weight.detach(), block)
        self.register_buffer("index", q.index)
        self.register_buffer("absmax_index", q.absmax_index)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.absmax_mean, self.block, self.n_blocks = q.absmax_mean, block, q.absmax.numel()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        q = Quantized(self.index, torch.empty(self.n_blocks, device="meta"), (self.out_features,
                      self.in_features), self.block, packed=True, absmax_index=self.absmax_index,
                      absmax_scale=self.absmax_scale, absmax_mean=self.absmax_mean)
        return nf4_dequantize(q, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, NF4 in blocks of {self.block}, bias={self.bias is not None}"


def nf4_linears(model: nn.Module, dtype: torch.dtype | None = None, min_features: int = 64) -> int:
    """Replace every nn.Linear of `model` with at least `min_features` inputs by an NF4Linear (QLoRA's frozen
    base), in place; returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear and child.in_features >= min_features:
            setattr(model, name, NF4Linear(child, dtype))
            count += 1
        else:
            count += nf4_linears(child, dtype, min_features)
    return count


# --- Stochastic rounding ----------------------------------------------------------------------------------

def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (float32) to bfloat16, rounding up or down at random with E[result] = x: 16 random bits added below
    bf16's last bit, then the low 16 bits dropped (bf16 is float32's upper half, sign and magnitude)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32,
                          device="cpu").to(bits.device)
    rounded = (bits + noise) & -65536                    # -65536 = 0xFFFF0000 as a signed 32-bit int
    return rounded.view(torch.float32).to(torch.bfloat16)


# --- 8-bit AdamW -------------------------------------------------------------------------------------------

MIN_8BIT_SIZE = 4096   # AdamW8bit keeps float32 moments for smaller tensors (bitsandbytes' min_8bit_size)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with both moments stored as 8-bit block-wise dynamic codes [1] (block 2048); the step itself in
    float32. A bfloat16 parameter (pure bf16 training) is updated with stochastic rounding: no float32 master
    copy. State per weight: 2 bytes + 8 bytes per 2,048 (the blocks' scales), against AdamW's 8. A tensor of fewer
    than min_8bit_size numbers keeps float32 moments (bitsandbytes' rule, same default): padded to a whole block,
    its 8-bit state would be larger (a LoRA's A and B are such tensors)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, block: int = 2048, seed: int = 0, min_8bit_size: int = MIN_8BIT_SIZE):
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0, betas in [0, 1), eps > 0, weight_decay >= 0; got {lr}, {betas}, "
                             f"{eps}, {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block=block,
                                      min_8bit_size=check_int("min_8bit_size", min_8bit_size, 0)))
        self.generator = torch.Generator().manual_seed(seed)
        self.signed, self.unsigned = dynamic_codes(True), dynamic_codes(False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, small = self.state[p], p.numel() < group["min_8bit_size"]
                if not state:
                    zeros = torch.zeros(p.shape, device=p.device)
                    state["step"] = 0
                    if small:
                        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                    else:
                        state["m_index"], state["m_absmax"] = self._store(zeros, self.signed, group["block"])
                        state["v_index"], state["v_absmax"] = self._store(zeros, self.unsigned, group["block"])
                state["step"] += 1
                t, grad = state["step"], p.grad.float()
                m = (state["exp_avg"] if small else self._load(state, "m", p.shape, self.signed, group["block"]))
                v = (state["exp_avg_sq"] if small else self._load(state, "v", p.shape, self.unsigned, group["block"]))
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2)
                v.addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)).div_((v / (1 - beta2 ** t)).sqrt_().add_(group["eps"]))
                new = p.float() if p.dtype == torch.bfloat16 else p   # float32: updated in place
                new.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                if p.dtype == torch.bfloat16:
                    p.copy_(stochastic_round_bf16(new, self.generator))
                del update, new
                if not small:
                    state["m_index"], state["m_absmax"] = self._store(m, self.signed, group["block"])
                    state["v_index"], state["v_absmax"] = self._store(v, self.unsigned, group["block"])
        return loss

    @staticmethod
    def _store(x: torch.Tensor, codes: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = quantize_blockwise(x, codes, block)
        return q.index, q.absmax

    @staticmethod
    def _load(state: dict, name: str, shape, codes: torch.Tensor, block: int) -> torch.Tensor:
        q = Quantized(state[f"{name}_index"], state[f"{name}_absmax"], tuple(shape), block)
        return dequantize_blockwise(q, codes)


# --- Weights in 8 bits on disk ------------------------------------------------------------------------------

WEIGHTS_8BIT_FORMAT = "course_lib.weights8/1"


def linear_codes() -> torch.Tensor:
    """255 evenly spaced codes in [-1, 1], 0 among them: absmax int8. Weights of a trained network spread evenly
    around zero, unlike optimiser moments (which need the dynamic codes' orders of magnitude)."""
    return torch.arange(-127, 128, dtype=torch.float32) / 127


def save_8bit(path, state: dict[str, torch.Tensor], info: dict | None = None, block: int = 64,
              min_size: int = MIN_8BIT_SIZE) -> Path:
    """A state dict on disk in about one byte a weight: each floating tensor of at least `min_size` numbers as
    block-wise absmax int8 (linear_codes, one float32 scale per `block` values: error at most half a code step,
    absmax / 254), smaller ones and the rest as float16; atomic and checksummed (course_lib.checkpoint). Read back
    with read_8bit. Where the float16 file would be too big to ship (a ControlNet's copy of the encoder)."""
    block = check_int("block", block, 1, hint=" (values per block)")
    tensors, shapes = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.numel() >= min_size:
            q = quantize_blockwise(t, linear_codes(), block)
            tensors[f"{name}.index"], tensors[f"{name}.absmax"], shapes[name] = q.index, q.absmax, list(t.shape)
        else:
            tensors[name] = t.half() if t.is_floating_point() else t
    meta = {"format": WEIGHTS_8BIT_FORMAT, "block": str(block), "shapes": json.dumps(shapes),
            "info": json.dumps(info or {})}
    return ckpt.atomic_save(tensors, path, meta)


def read_8bit(path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in `dtype`, info) from a save_8bit file, its checksum verified; another format is refused."""
    tensors, meta = ckpt.read_format(path, WEIGHTS_8BIT_FORMAT, "8-bit weights")
    block, shapes = int(meta["block"]), json.loads(meta["shapes"])
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()
             if not k.endswith((".index", ".absmax"))}
    for name, shape in shapes.items():
        q = Quantized(tensors[f"{name}.index"], tensors[f"{name}.absmax"], tuple(shape), block)
        state[name] = dequantize_blockwise(q, linear_codes()).to(dtype)
    return state, json.loads(meta["info"])

