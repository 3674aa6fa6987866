r"""Peak GPU memory of a training step and of sampling: measured on a GPU, never estimated.

The course promises that every model trains and samples within BUDGET_GIB = 8 GiB of GPU memory.
This module checks the promise by running the work once and reading PyTorch's allocator:

    gc; empty_cache; reset_peak_memory_stats  ->  run  ->  synchronize  ->  max_memory_allocated

    peak_bytes      the most memory held by tensors at any moment: weights, gradients, optimizer
                    state, activations, workspaces (torch.cuda.max_memory_allocated)
    reserved_bytes  the most the caching allocator held from the GPU (max_memory_reserved): peak_bytes
                    plus cached and fragmented blocks, closer to what nvidia-smi shows. `fits` compares
                    this, the larger figure, with the budget. Neither counts the CUDA context itself
                    (a few hundred MB per process, depending on the driver and card).

What runs is the course's own code, not a copy of it: `training_step_memory` measures one `train_step` of
a course_lib.train.Trainer (the one loop, course_lib.loop.Fit, around the one objective,
course_lib.forward.diffusion_loss) on random data of the given shape; `sampling_memory` runs
course_lib.sampling.sample, with classifier-free guidance (course_lib.guidance) for a text-conditioned U-Net.

On a machine without a CUDA GPU there is nothing to measure: the work still runs (so the code
path is exercised), and the report says "no CUDA GPU here: peak GPU memory not measured".

Precision ("auto" resolves by device, see `resolve_precision`):
    fp32    no autocast                               (CPU default)
    bf16    autocast to bfloat16, no loss scaling     (compute capability >= 8.0: Ampere and later)
    fp16    autocast to float16 with a GradScaler     (below 8.0, e.g. Colab's T4 = 7.5, which has fast
            fp16 tensor cores but no native bf16: torch.cuda.is_bf16_supported() can still say yes
            there, through slow emulation, so we decide by compute capability instead)

References:
  [1] Micikevicius et al. Mixed Precision Training. 2018. https://arxiv.org/abs/1710.03740
  [2] Chen, Xu, Zhang, Guestrin. Training Deep Nets with Sublinear Memory Cost (gradient
      checkpointing). 2016. https://arxiv.org/abs/1604.06174
  [3] Song, Meng, Ermon. Denoising Diffusion Implicit Models. 2021. https://arxiv.org/abs/2010.02502
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .checks import check_choice, check_int, has_values
from .forward import check_prediction
from .guidance import GuidedModel
from .precision import GPU_STAND_IN, CUDAAutocastRules, autocast, resolve_precision  # shared with training
from .sampling import sample
from .schedules import NoiseSchedule, make_schedule
from .settings import default_device
from .train import Conditioning, TrainConfig, Trainer

BUDGET_GIB = 8.0
GIB = 2 ** 30
NOT_MEASURED = "no CUDA GPU here: peak GPU memory not measured"


@dataclass
class MemoryReport:
    """What ran, and its peak GPU memory: measured on a GPU, accounted inside `accounting()`, else None."""
    what: str
    peak_bytes: int | None            # torch.cuda.max_memory_allocated during the run (or the accounted peak)
    reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved during the run (not accounted)
    device: str = "cpu"               # the GPU's name, or "cpu", or "accounted, <kernel> attention"
    budget_gib: float = BUDGET_GIB
    precision: str = ""
    categories: dict[str, int] | None = None   # accounted: the bytes of each CATEGORIES entry at the peak

    @property
    def accounted(self) -> bool:
        return self.categories is not None

    @property
    def measured(self) -> bool:
        return self.peak_bytes is not None

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / GIB

    @property
    def fits(self) -> bool | None:
        """Whether the reserved peak (or the allocated peak) is within the budget; None if not measured."""
        if not self.measured:
            return None
        return (self.reserved_bytes or self.peak_bytes) <= self.budget_gib * GIB

    def __str__(self) -> str:
        what = f"{self.what} ({self.precision})" if self.precision else self.what
        if self.accounted:
            parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in self.categories.items() if v)
            verdict = "within" if self.fits else "OVER"
            return (f"{what}: {self.peak_gib:.3f} GiB accounted ({self.device}; {parts}): {verdict} the "
                    f"{self.budget_gib:g} GiB budget")
        if not self.measured:
            return f"{what}: {NOT_MEASURED} (the {self.budget_gib:g} GiB budget is checked on a GPU only)"
        reserved = f", {self.reserved_bytes / GIB:.2f} GiB reserved" if self.reserved_bytes is not None else ""
        verdict = "within" if self.fits else "OVER"
        return (f"{what}: peak {self.peak_gib:.2f} GiB allocated{reserved} on {self.device}: "
                f"{verdict} the {self.budget_gib:g} GiB budget")


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else default_device()


# --- Accounting: the peak without a GPU -------------------------------------------------------------------

# What each of torch's MemTracker categories is called here (the order of a stacked bar).
CATEGORIES = {"Parameter": "weights", "Buffer": "buffers", "Gradient": "gradients", "Optstate": "optimizer state",
              "Activation": "activations", "Temp": "temporaries", "Other": "other"}
ATTENTION = {"flash": "FLASH_ATTENTION", "math": "MATH"}   # kernels a fake run can model (see accounting())
MIB = 2 ** 20


@dataclass(frozen=True)
class GPUModel:
    """What a fake run cannot see of a GPU: the workspaces of its matrix libraries, which PyTorch allocates once
    through its caching allocator (so max_memory_allocated counts them), and the attention kernel it picks."""
    name: str
    workspace_bytes: int
    attention: str


# PyTorch's defaults (aten/src/ATen/cuda/CublasHandlePool.cpp): cuBLAS takes CUBLAS_WORKSPACE_CONFIG
# ":4096:2:16:8" (2 x 4 MiB + 8 x 16 KiB) below compute capability 9 and 32 MiB from Hopper on; cuBLASLt 1 MiB,
# 32 MiB on Hopper. The T4 has no FlashAttention (it needs 8.0) but the memory-efficient kernel, which like
# FlashAttention never stores the scores: "flash" models both.
GPUS = {"H100": GPUModel("H100", 64 * MIB, "flash"), "T4": GPUModel("T4", 8 * MIB + 8 * 16 * 1024 + 1 * MIB, "flash")}
_ACCOUNTING: list[tuple[GPUModel, str]] = []     # the GPU and attention kernel of each accounting() we are in

@contextlib.contextmanager
def accounting(gpu: str = "H100", attention: str | None = None) -> Iterator[None]:
    """Inside, weights are fake (torch's FakeTensorMode: a shape, a dtype and a device, no data; see "How" below)
    and `measure_peak` accounts instead of measuring: it
    runs fn() once under torch's MemTracker, which follows every storage alive, and reports the peak with its
    breakdown by CATEGORIES. Any machine, no GPU; SD 1.5's step in seconds, since nothing is computed.

    gpu: a GPUS entry: its library workspaces are added to every peak (category "workspaces").
    attention: the kernel scaled_dot_product_attention is modelled with (default: the GPU's). "flash":
    FlashAttention or the memory-efficient kernel, which never store the (L x L) scores; "math": the plain path
    (what runs where neither applies), which holds the whole score matrix and its softmax, the largest single
    term at SD 1.5's 4,096 latent tokens. Mixed precision ("bf16" / "fp16" through course_lib.loop.autocast)
    follows CUDA autocast's casting rules (CUDAAutocastRules), not the CPU's.

    How: every nn.Parameter made inside is a fake (FakeTensorMode.from_tensor), and .to() / .half() of a module
    of fakes replaces its tensors (torch refuses to swap fakes in place). Inputs, timesteps and schedules stay
    real; whatever a fake weight touches becomes fake, so the network's work costs nothing. Checks that read
    values skip fakes (course_lib.checks.has_values); a logged loss is NaN.

    What the accounting leaves out: the CUDA context (a few hundred MiB, outside max_memory_allocated too), the
    caching allocator's rounding and fragmentation (reserved_bytes), cuDNN's convolution workspaces, and a copy
    made by copy.deepcopy, which dispatches no operator MemTracker sees (the Trainer's EMA U-Net: one more
    weights' worth, 6 MB for notebook 04's U-Net).
    Validated against the H100's measured rows in tests/test_memory_accounting.py."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    from torch.nn.attention import SDPBackend, sdpa_kernel
    check_choice("GPU", gpu, tuple(GPUS))
    attention = GPUS[gpu].attention if attention is None else attention
    check_choice("attention kernel", attention, tuple(ATTENTION))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    make_parameter = nn.Parameter.__new__

    def fake_parameter(cls, data=None, requires_grad=True):     # every new weight: a fake of its shape
        if data is not None and has_values(data):
            data = mode.from_tensor(data)
        return make_parameter(cls, data, requires_grad)
    convert = nn.Module._apply

    def convert_fake(module: nn.Module, fn, recurse: bool = True):   # .to() / .half() of a module of fakes
        if not any(is_fake(p) for p in module.parameters(recurse=False)):
            return convert(module, fn, recurse)
        for child in module.children() if recurse else ():
            child._apply(fn)
        with torch.no_grad():       # swapped in place, as .to() does, is refused for fakes: replaced instead
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(fn(p), requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = fn(b)
        return module
    _ACCOUNTING.append((GPUS[gpu], attention))
    GPU_STAND_IN.append(CUDAAutocastRules)
    nn.Parameter.__new__, nn.Module._apply = fake_parameter, convert_fake
    try:
        with sdpa_kernel(getattr(SDPBackend, ATTENTION[attention])), warnings.catch_warnings():
            # copy.deepcopy of a fake weight (the Trainer's EMA U-Net) asks for its data pointer: harmless here
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            yield
    finally:
        nn.Parameter.__new__, nn.Module._apply = make_parameter, convert
        _ACCOUNTING.pop()
        GPU_STAND_IN.pop()


def _tracker():
    """torch's MemTracker, told that a root module called again (the next training step, the next sampling step)
    starts a new round of its per-module statistics, which we do not read; its peak and breakdown are kept."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            # MemTracker hooks every parameter's gradient; a frozen one (LoRA's base) refuses hooks: skip those
            frozen = [p for p in module.parameters()
                      if not p.requires_grad and p not in self._param_to_grad_hook_handles]
            for p in frozen:
                self._param_to_grad_hook_handles[p] = ()      # "hooked already": MemTracker passes it by
            try:
                return super()._track_module_params_and_buffers(module, install_grad_hooks)
            finally:
                for p in frozen:
                    del self._param_to_grad_hook_handles[p]

        def _update_peak_stats(self, peak_state) -> None:
            # the global peak only: MemTracker's per-module peaks copy a snapshot per module per new peak (slow)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                if set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
                    self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)
    return Tracker()


def _account(fn: Callable[[], Any], what: str, precision: str, resident: tuple[nn.Module, ...]) -> MemoryReport:
    tracker = _tracker()
    if resident:
        tracker.track_external(*resident)
    with tracker:
        fn()
    gpu, attention = _ACCOUNTING[-1]
    peak = max(tracker.get_tracker_snapshot("peak").values(), key=lambda snap: snap["Total"], default={"Total": 0})
    categories = dict.fromkeys(CATEGORIES.values(), 0) | {"workspaces": gpu.workspace_bytes}
    for kind, nbytes in peak.items():
        if kind != "Total":
            categories[CATEGORIES[getattr(kind, "value", kind)]] += nbytes
    return MemoryReport(what, sum(categories.values()), None, f"accounted as on the {gpu.name}, {attention} attention",
                        precision=precision, categories=categories)


def measure_peak(fn: Callable[[], Any], device: torch.device | str | None = None, what: str = "function",
                 precision: str = "", resident: tuple[nn.Module, ...] = ()) -> MemoryReport:
    """Run fn() once and report the peak GPU memory it reached on `device` (default: the current GPU).

    Inside `accounting()`, the peak is accounted on fake tensors instead (any device); `resident`: modules
    whose weights sit on the GPU throughout (a GPU's allocator counts them anyway; the accounting sees only
    what fn touches unless told). Elsewhere on a CPU, fn still runs and the report says nothing was measured."""
    if _ACCOUNTING:
        return _account(fn, what, precision, resident)
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda" or not torch.cuda.is_available():
        fn()
        return MemoryReport(what, None, None, "cpu", precision=precision)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # so the reserved peak is this run's, not an earlier run's cache
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return MemoryReport(what, torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device),
                        torch.cuda.get_device_name(device), precision=precision)


# --- Precision -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn on the model's gradient checkpointing for the duration (model.config.gradient_checkpointing,
    as course_lib.unet has it, or a model.gradient_checkpointing attribute)."""
    if not enabled:
        yield
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "gradient_checkpointing"):
        model.config = dataclasses.replace(config, gradient_checkpointing=True)
        try:
            yield
        finally:
            model.config = config
    elif hasattr(model, "gradient_checkpointing"):
        old = model.gradient_checkpointing
        model.gradient_checkpointing = True
        try:
            yield
        finally:
            model.gradient_checkpointing = old
    else:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing switch: expected "
                         f"model.config.gradient_checkpointing (as course_lib.unet.UNet) or "
                         f"model.gradient_checkpointing")


def _check_shape(batch_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in batch_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"batch_shape must be (B, C, H, W) with positive sizes; got {tuple(batch_shape)}")
    return shape


# --- A training step and a sampling run ------------------------------------------------------------------

class _Configured(nn.Module):
    """Any denoiser model(x_t, t, *cond) given the two config fields the Trainer reads (in_channels,
    context_dim): a course_lib UNet has them already and is not wrapped."""

    def __init__(self, model: nn.Module, in_channels: int, context_dim: int | None):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(in_channels=in_channels, context_dim=context_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        return self.model(x, t, *cond)


def training_step_memory(model: nn.Module, batch_shape: tuple[int, int, int, int], *, prediction: str = "epsilon",
                         precision: str = "auto", gradient_checkpointing: bool = False,
                         schedule: NoiseSchedule | None = None, lr: float = 1e-4,
                         context: tuple[torch.Tensor, torch.Tensor] | None = None) -> MemoryReport:
    """Peak memory of one step of the course's training loop on random data of batch_shape, on the model's
    device: a course_lib.train.Trainer (the loop of course_lib.loop.Fit around the objective
    course_lib.forward.diffusion_loss) built on batch_shape[0] random images and measured over one `train_step`.

    What the step holds is what training holds: the weights, their EMA copy, gradients, AdamW's two moment
    buffers (created inside the measured step, as on a real first step), the activations of the forward and
    backward pass, and the GradScaler's work with precision "fp16". Parameters with requires_grad=False (a
    frozen base under LoRA) get no gradients and no moments. The model's weights, gradients and train/eval mode
    are restored afterwards (their copy waits on the CPU, outside the measurement). A text-conditioned U-Net
    also gets `context` = (text states (B, L, D), mask (B, L)), as the Trainer's Conditioning."""
    check_prediction(prediction)
    B, C, H, W = _check_shape(batch_shape)  # batch, channels, height, width
    device = _device_of(model)
    schedule = schedule or make_schedule("linear", 1000)
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    was_training = model.training
    conditioning = None
    if context is not None:
        states, mask = (z.detach().cpu() for z in context)
        conditioning = Conditioning(states, mask.bool(), torch.zeros(states.shape[1:]),
                                    torch.ones(states.shape[1], dtype=torch.bool))
    config = getattr(model, "config", None)
    net = model if hasattr(config, "in_channels") else \
        _Configured(model, C, None if context is None else context[0].shape[-1])
    images = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1

    try:
        with _checkpointing(model, gradient_checkpointing):
            trainer = Trainer(net, images, TrainConfig(steps=1, batch_size=B, lr=lr, warmup=0, prediction=prediction,
                                                       T=schedule.T, precision=precision, latents=True),
                              device=device, conditioning=conditioning)
            trainer.fixed_schedule = schedule                       # the schedule given (its T is the config's)
            what = f"training step, batch {(B, C, H, W)}" + (", gradient checkpointing" if gradient_checkpointing
                                                               else "")
            return measure_peak(trainer.train_step, device, what, trainer.precision)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def sampling_memory(model: nn.Module, batch_shape: tuple[int, int, int, int], steps: int = 10, *,
                    prediction: str = "epsilon", precision: str = "auto",
                    schedule: NoiseSchedule | None = None, context: tuple[torch.Tensor, torch.Tensor] | None = None,
                    guidance_scale: float = 1.0, clip_x0: bool | None = None) -> MemoryReport:
    """Peak memory of sampling a batch with `steps` model calls (course_lib.sampling's DDIM, eta = 0),
    on the model's device. Every sampler that calls the model once per step holds about the same memory.
    A text-conditioned U-Net gets `context` = (states, mask); with guidance_scale != 1 it runs with
    classifier-free guidance (twice the batch per call), the empty context being zeros.
    clip_x0: clamp x0 estimates to [-1, 1] as for images; default True for an unconditional model and False
    with a context (a latent model); pass False for any model of latents."""
    check_prediction(prediction)
    B, C, H, W = _check_shape(batch_shape)
    steps = check_int("steps", steps, 1)
    device = _device_of(model)
    precision = resolve_precision(precision, device)
    schedule = schedule or make_schedule("linear", 1000)
    if steps > schedule.T:
        raise ValueError(f"steps must be at most the schedule's T = {schedule.T}; got {steps}")
    was_training = model.training

    net = model
    if context is not None:
        states, mask = context
        net = GuidedModel(model, states, mask, torch.zeros_like(states), torch.ones_like(mask), guidance_scale)

    def run() -> None:
        model.eval()
        with autocast(precision, device):
            sample(net, schedule, (B, C, H, W), sampler="ddim", steps=steps, prediction=prediction, device=device,
                   clip_x0=(context is None) if clip_x0 is None else clip_x0)

    try:
        return measure_peak(run, device, f"sampling, batch {(B, C, H, W)}, {steps} steps", precision)
    finally:
        model.train(was_training)
