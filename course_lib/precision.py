r"""Mixed precision: which one a device gets, and the autocast context that applies it.

    fp32    no autocast                               (CPU default)
    bf16    autocast to bfloat16, no loss scaling     (compute capability >= 8.0: Ampere and later)
    fp16    autocast to float16 with a GradScaler     (below 8.0, e.g. Colab's T4 = 7.5, which has fast fp16
            tensor cores but no native bf16; the scaler is course_lib.loop's)

Under autocast, matrix products and convolutions run in the low precision while norms, softmax, reductions
and losses run in float32 (PyTorch's "Automatic Mixed Precision" op lists); course_lib.memory.accounting
models a GPU's rules on a CPU with the stand-in it puts in GPU_STAND_IN.

References:
  [1] Micikevicius et al. Mixed Precision Training. 2018. https://arxiv.org/abs/1710.03740
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import noop_context_fn

from .checks import check_choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' on a GPU of compute capability >= 8.0, 'fp16' on older GPUs (a T4 is 7.5: fast fp16,
    no native bf16), 'fp32' on a CPU. 'fp16' needs a CUDA GPU (its gradient scaler is CUDA-only)."""
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' (with a GradScaler) needs a CUDA GPU; on a CPU use 'fp32' or 'bf16'")
        return precision
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision ('fp32': none). While course_lib.memory.accounting models a
    GPU, its stand-in (CUDA's casting rules, on fake tensors) instead of the device's own."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if GPU_STAND_IN:
        return GPU_STAND_IN[-1](dtype)
    return torch.autocast(device.type, dtype=dtype)


# Set while course_lib.memory.accounting models a GPU on this machine: the autocast it stands in with. Fit then
# also steps its optimizer with foreach kernels, a GPU's default (whose temporaries hold a copy of every moment).
GPU_STAND_IN: list[Callable[[torch.dtype], contextlib.AbstractContextManager]] = []


def gpu_autocast(device: torch.device | str, dtype: torch.dtype = torch.float16,
                 enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on a GPU only (a CPU runs the weights' own dtype): torch.autocast on CUDA, the
    accounting's stand-in while course_lib.memory.accounting models a GPU, nothing otherwise."""
    device = torch.device(device)
    if not enabled or (device.type != "cuda" and not GPU_STAND_IN):
        return contextlib.nullcontext()
    return GPU_STAND_IN[-1](dtype) if GPU_STAND_IN else torch.autocast(device.type, dtype=dtype)


ACTIVE_STAND_IN: list = []      # the stand-in autocasts entered and not yet left (innermost last)


def recompute_context() -> Callable[[], tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]]:
    """For torch.utils.checkpoint's context_fn: torch re-enters its own autocast when it recomputes a block in
    the backward pass, but not a stand-in, so one active now is entered again around the recomputation."""
    if not ACTIVE_STAND_IN:
        return noop_context_fn
    again = ACTIVE_STAND_IN[-1]
    return lambda: (contextlib.nullcontext(), type(again)(again.dtype))


# CUDA autocast's rules (PyTorch's "Automatic Mixed Precision" reference, "CUDA Ops that can autocast to ..."):
# matrix products and convolutions run in the low precision; reductions, norms, softmax and losses in float32;
# everything else runs in the dtype it is given. A CPU's autocast has other lists (it keeps GroupNorm in bf16,
# say), so a fake run on the CPU models a GPU's mixed precision with these rules, applied by CUDAAutocastRules.
AUTOCAST_LOW = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
                "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv", "prelu",
                "scaled_dot_product_attention", "einsum"}
AUTOCAST_FP32 = {"group_norm", "layer_norm", "softmax", "log_softmax", "softmin", "cross_entropy", "nll_loss",
                 "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div", "binary_cross_entropy_with_logits", "norm",
                 "normalize", "cosine_similarity", "pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log1p",
                 "log2", "log10", "rsqrt", "reciprocal", "sum", "prod", "cumsum", "cumprod", "softplus", "cdist",
                 "erfinv", "acos", "asin", "cosh", "sinh", "tan", "__rdiv__", "__rtruediv__"}


class CUDAAutocastRules(torch.overrides.TorchFunctionMode):
    """CUDA autocast's casting rules as a torch function mode: each call's floating tensors are cast before the
    call, above autograd, so that what backward keeps is what it keeps under torch.autocast on a GPU."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __enter__(self):
        ACTIVE_STAND_IN.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        ACTIVE_STAND_IN.remove(self)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = self.dtype if name in AUTOCAST_LOW else torch.float32 if name in AUTOCAST_FP32 else None
        if target is not None:
            cast = lambda x: (x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point()
                              and x.dtype != target else x)
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)
