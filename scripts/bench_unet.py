"""Benchmark course_lib's U-Net against diffusers' UNet2DModel of the same design.

    python scripts/bench_unet.py                              # CPU: presets small and base at 32 px
    python scripts/bench_unet.py --device cuda --batch 128    # a GPU: float32 and autocast, peak memory
    python scripts/bench_unet.py --presets tiny --repeats 3   # a quick look

What is compared. diffusers' UNet2DModel is built with the same channels, attention placement
(AttnDownBlock2D / AttnUpBlock2D where the preset attends, DownBlock2D / UpBlock2D elsewhere, attention
in the middle), head size, GroupNorm groups and scale-and-shift time conditioning, so its ResBlocks,
attention, time MLP and resampling are the same layers as ours (tests/test_unet.py checks that the
blocks give identical outputs with copied weights). The two U's differ in one place: diffusers' up path
has `layers_per_block + 1` ResBlocks per level and also keeps the outputs of conv_in and of each
downsampler as skips (the DDPM layout), while ours has `blocks_per_level` ResBlocks on each side (the
layout of lucidrains' denoising-diffusion-pytorch). No `layers_per_block` gives the same parameter count,
so both neighbours are measured: layers_per_block = blocks_per_level - 1 (fewer parameters than ours) and
= blocks_per_level (more). Besides the time ratio, the table gives the ratio of time per forward FLOP,
which compares the implementations' efficiency independently of the size difference.

Measured: a training step (forward, MSE loss against random noise, backward, AdamW step) and a
sampling step (forward under torch.no_grad), float32; on CUDA also under autocast (bf16 from compute
capability 8.0, else fp16 with a gradient scaler) and the peak memory of a step. Each measurement:
warm-up steps, then the median of --repeats, the models alternating (order flipped each round) so
they share the machine's noise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course_lib.settings import describe_machine, timed
from course_lib.unet import PRESETS, UNet, UNetConfig, count_parameters, get_preset


def diffusers_unet(cfg: UNetConfig, layers_per_block: int) -> nn.Module:
    """diffusers' UNet2DModel with the same channels, attention, heads, groups and time conditioning."""
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.channels, layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up,
        attention_head_dim=cfg.head_channels, norm_num_groups=cfg.norm_groups,
        attn_norm_num_groups=cfg.norm_groups,   # else the middle attention has no GroupNorm with scale_shift
        resnet_time_scale_shift="default" if cfg.time_conditioning == "add" else "scale_shift",
        flip_sin_to_cos=True, freq_shift=0, dropout=cfg.dropout)


class Diffusers(nn.Module):
    """Gives UNet2DModel our call signature: model(x, t) -> tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t).sample


def forward_flops(model: nn.Module, cfg: UNetConfig) -> float:
    """Forward FLOPs for one image (SDPA's math kernel, so the attention products are counted too)."""
    x, t = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model.cpu()(x, t)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model with its optimizer and fixed inputs; `train_step` and `sample_step` time one step each."""

    def __init__(self, name: str, model: nn.Module, cfg: UNetConfig, batch: int, device: torch.device,
                 amp_dtype: torch.dtype | None):
        self.name, self.device, self.amp_dtype = name, device, amp_dtype
        self.model = model.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        gen = torch.Generator().manual_seed(0)
        shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        self.x = torch.randn(shape, generator=gen).to(device)
        self.noise = torch.randn(shape, generator=gen).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> float:
        """Seconds of one bare step (course_lib.settings.timed). Written out rather than run by course_lib.loop.Fit:
        the benchmark times the same few operations for both U-Nets, without the loop's guards and logging."""
        self.model.train()
        return timed(self._train_step)[1]

    def _train_step(self) -> None:
        with self.autocast():
            loss = F.mse_loss(self.model(self.x, self.t).float(), self.noise)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    @torch.no_grad()
    def sample_step(self) -> float:
        self.model.eval()
        return timed(self._forward)[1]

    def _forward(self) -> None:
        with self.autocast():
            self.model(self.x, self.t)

    def peak_memory(self, step: str) -> float:
        """Peak memory allocated during one step, above what was allocated before it (MiB)."""
        sync(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        getattr(self, step)()
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def median_times(runners: list[Runner], step: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step for each runner, alternating runners and flipping their order each round."""
    for runner in runners:
        for _ in range(warmup):
            getattr(runner, step)()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(repeats):
        for runner in (runners if i % 2 == 0 else runners[::-1]):
            times[runner.name].append(getattr(runner, step)())
    return {name: statistics.median(ts) for name, ts in times.items()}


def amp_dtypes(device: torch.device) -> list[torch.dtype | None]:
    """float32 always; on CUDA also autocast, bf16 from compute capability 8.0 (Ampere), else fp16."""
    if device.type != "cuda":
        return [None]
    major, _ = torch.cuda.get_device_capability(device)
    return [None, torch.bfloat16 if major >= 8 else torch.float16]


def bench_preset(name: str, args, device: torch.device) -> list[dict]:
    cfg = get_preset(name, image_size=args.size)
    torch.manual_seed(0)
    models = {"ours": UNet(cfg)}
    for lpb in sorted({max(1, cfg.blocks_per_level - 1), cfg.blocks_per_level}):
        models[f"diffusers lpb={lpb}"] = Diffusers(diffusers_unet(cfg, lpb))
    info = {n: (count_parameters(m), forward_flops(m, cfg)) for n, m in models.items()}
    rows = []
    for amp in amp_dtypes(device):
        precision = "float32" if amp is None else f"autocast {str(amp).replace('torch.', '')}"
        runners = [Runner(n, m, cfg, args.batch, device, amp) for n, m in models.items()]
        train = median_times(runners, "train_step", args.warmup, args.repeats)
        sample = median_times(runners, "sample_step", args.warmup, args.repeats)
        memory = {}
        if device.type == "cuda":
            memory = {r.name: (r.peak_memory("train_step"), r.peak_memory("sample_step")) for r in runners}
        for n in models:
            rows.append(dict(preset=name, precision=precision, model=n, params=info[n][0], gflop=info[n][1] / 1e9,
                             train=train[n], sample=sample[n], memory=memory.get(n)))
        del runners
    return rows


def table(rows: list[dict], batch: int) -> str:
    """Markdown: one row per model; diffusers rows carry the ratios ours / theirs (below 1: ours is faster)."""
    has_memory = any(r["memory"] for r in rows)
    head = ["preset", "precision", "model", "params", "fwd GFLOP/img", f"train step (ms, batch {batch})",
            "sampling step (ms)"]
    head += ["train peak (MiB)", "sampling peak (MiB)"] if has_memory else []
    head += ["ours/theirs train", "ours/theirs sampling", "ours/theirs per FLOP (train, sampling)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = {(r["preset"], r["precision"]): r for r in rows if r["model"] == "ours"}
    for r in rows:
        o = ours[(r["preset"], r["precision"])]
        cells = [r["preset"], r["precision"], r["model"], f"{r['params'] / 1e6:.2f} M" +
                 ("" if r is o else f" ({r['params'] / o['params']:.2f}x ours)"),
                 f"{r['gflop']:.2f}", f"{r['train'] * 1e3:.0f}", f"{r['sample'] * 1e3:.0f}"]
        if has_memory:
            cells += [f"{r['memory'][0]:.0f}", f"{r['memory'][1]:.0f}"]
        if r is o:
            cells += ["", "", ""]
        else:
            flop = o["gflop"] / r["gflop"]
            cells += [f"{o['train'] / r['train']:.2f}", f"{o['sample'] / r['sample']:.2f}",
                      f"{o['train'] / r['train'] / flop:.2f}, {o['sample'] / r['sample'] / flop:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 16 on CPU, 128 on CUDA)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per model (the median is reported)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    ap.add_argument("--presets", nargs="+", default=["small", "base"], choices=list(PRESETS))
    ap.add_argument("--size", type=int, default=32, help="image size in pixels")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
    args.batch = args.batch or (128 if device.type == "cuda" else 16)
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {describe_machine(device, detail=True)}; load average {load:.2f} at start")
    print(f"batch {args.batch}, {args.size} px, {args.warmup} warm-up + median of {args.repeats} steps per model\n")
    start = time.perf_counter()
    rows = [row for name in args.presets for row in bench_preset(name, args, device)]
    print(table(rows, args.batch))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{time.perf_counter() - start:.0f} s; load average {load:.2f} at the end")


if __name__ == "__main__":
    main()
