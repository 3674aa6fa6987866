r"""The one fitting loop: every model in the course trains with `Fit.fit` (notebook 04 reads it).

A model contributes its loss and its parameters; the loop owns the rest (PyTorch Lightning splits a
trainer the same way, nanoGPT's train.py is one loop for every size):

    subclass Fit and give        loss()  -> the scalar loss of one batch (drawn from self.generator),
                                            or (loss, {"name": float, ...}) to log more than the loss
                                 run_info() -> what a resumed run must share with this one (a dict)
    the loop does                learning rate (linear warm-up, then constant or cosine decay),
                                 precision (autocast is the model's; a GradScaler for fp16 is the loop's),
                                 backward, gradient clipping, the optimizer step, EMA, the NaN guard,
                                 a step or time budget, progress (tqdm), checkpoints and exact resume

Who uses it: the diffusion Trainer (course_lib.train), the VAE (vae, vae_gan), the mini CLIP (clip), LoRA, DreamBooth,
LiDB and the hypernetwork (lora, dreambooth, hyperdreambooth), textual inversion, and SD 1.5's LoRA (sd).

What a trusted trainer promises, kept here:
    NaN guard           a non-finite loss stops training at once, naming the step, and says which
                        checkpoint on disk is good
    explosion guard     before a checkpoint is written its weights are checked: all finite, and their
                        RMS not grown EXPLOSION_FACTOR-fold since the last good checkpoint. Weights that
                        fail never replace the good file (a too-high learning rate can blow the weights
                        up to huge but finite values one step before the loss turns into NaN)
    atomic, verified    course_lib.checkpoint writes to a temporary file, verifies its checksum, then
                        renames; a kill at any moment leaves the old file or the new one
    exact resume        a checkpoint holds the trained parameters, EMA, optimizer moments, gradient
                        scaler, random-number states, data order, step, seconds and the logged history,
                        so a resumed run continues bit for bit; `resume` refuses a checkpoint from a
                        different run (other settings or data) and names the settings that differ. The
                        one change allowed is the learning rate (to continue a diverged run more gently):
                        the resumed run says so, and from there it is no longer bit for bit
    nothing lost        a fresh run never writes over another run's checkpoint: the earlier file is moved
                        aside to <name>.v<k>.safetensors first, and the run says where

Several processes (torchrun): the logged loss is averaged over ranks, all ranks stop at the same step,
and only rank 0 shows progress and writes files (course_lib.distributed).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import flat_dict
from . import distributed
from .checks import check_choice, check_int, has_values, number
from .precision import GPU_STAND_IN, PRECISIONS, autocast, resolve_precision  # noqa: F401 (re-exported)

DECAYS = ("constant", "cosine")
EXPLOSION_FACTOR = 100.0         # weights whose RMS grew this much since the last good checkpoint are refused
FORMAT = "course_lib.fit/1"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite, or the weights blew up."""


def lr_factor(step: int, steps: int, warmup: int, decay: str = "constant") -> float:
    """The learning rate at `step` as a share of the peak: linear warm-up over `warmup` steps, then
    constant ("constant") or a cosine down to 0 at `steps` ("cosine", Loshchilov & Hutter 2017)."""
    check_choice("decay", decay, DECAYS)
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay ramped up so the early average is not dominated by the random initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module | list[torch.Tensor], model: nn.Module | list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for two modules (buffers copied) or two lists of tensors."""
    if isinstance(ema, nn.Module):
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)
        ema, model = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema, [p.detach().to(e.dtype) for e, p in zip(ema, model)], 1 - decay)


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' shapes and values: how a resumed run checks it has the same data."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() and has_values(t) else b"")
    return h.hexdigest()[:16]


class Batches:
    """Indices of batches drawn without replacement: a new random order each pass through n items.
    drop_remainder=False fills a batch across the end of one pass and the start of the next;
    True skips the remainder (every batch from one pass: no item twice in a contrastive batch)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, drop_remainder: bool = False):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need at least one item and batch_size >= 1; got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.generator, self.drop_remainder = n, batch_size, generator, drop_remainder
        self.order, self.position = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.drop_remainder:
            if self.position + self.batch_size > self.order.numel():
                self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
            self.position += self.batch_size
            return self.order[self.position - self.batch_size:self.position]
        picked, want = [], self.batch_size
        while want > 0:
            if self.position >= self.order.numel():
                self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
            take = self.order[self.position:self.position + want]
            self.position += take.numel()
            want -= take.numel()
            picked.append(take)
        return torch.cat(picked)


@dataclass
class FitConfig:
    """How the loop optimises; the model's own settings live in its module."""
    steps: int                       # total steps to train for
    lr: float                        # peak learning rate
    warmup: int = 0                  # linear warm-up steps
    decay: str = "constant"          # after warm-up: "constant" or "cosine" (to 0 at `steps`)
    grad_clip: float | None = 1.0    # cap on the gradients' global norm (None: no clipping)
    ema_decay: float | None = None   # keep an EMA of the trained parameters (None: no EMA)
    precision: str = "fp32"          # resolved: fp32, bf16 or fp16 (fp16 adds a GradScaler)

    def __post_init__(self):
        self.steps = check_int("steps", self.steps, 0)
        if not self.lr > 0 or self.warmup < 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise ValueError(f"need lr > 0, warmup >= 0 and grad_clip > 0 (or None); got lr={self.lr}, "
                             f"warmup={self.warmup}, grad_clip={self.grad_clip}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) or None; got {self.ema_decay}")
        lr_factor(0, 1, 0, self.decay)
        if self.precision not in PRECISIONS[1:]:
            raise ValueError(f"precision must be resolved to one of {', '.join(PRECISIONS[1:])}; got "
                             f"{self.precision!r} (course_lib.loop.resolve_precision)")


class Fit:
    """The loop, for a subclass that sets self.optimizer (its groups' "lr" is the peak; a group with
    "scheduled": False keeps its own rate) and gives loss() and run_info()."""

    def __init__(self, config: FitConfig, optimizer: torch.optim.Optimizer, device: torch.device | str,
                 seed: int = 0, batches: Batches | None = None):
        self.fit_config, self.optimizer, self.device = config, optimizer, torch.device(device)
        for group in optimizer.param_groups:
            if GPU_STAND_IN and group.get("foreach") is None:
                group["foreach"] = True        # a GPU's default step (lists of tensors at once), as accounted
            group.setdefault("peak_lr", group["lr"])
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        # EMA (a slowly moving average of the weights, for sampling): ema_tensors follow ema_sources
        self.ema_decay = config.ema_decay
        self.ema_sources = self.params
        self.ema_tensors = [p.detach().clone() for p in self.params] if config.ema_decay is not None else None
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = batches
        self.step, self.seconds = 0, 0.0
        self.history: dict[str, list[float]] = {"loss": []}
        self.last_good: tuple[Path, int] | None = None     # (checkpoint, its step) known to be sound
        self._rms = self._weights_rms()

    # --- what a subclass gives ---------------------------------------------------------------------------
    def loss(self) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError("a Fit subclass gives loss(): the scalar loss of one batch")

    def run_info(self) -> dict:
        """Settings and data a resumed run must share with this one (compared key by key on resume)."""
        return {}

    def clip_parameters(self) -> list[torch.Tensor]:
        return self.params

    def before_step(self) -> None:
        """Called after backward and clipping, before the optimizer step (e.g. to set extra gradients)."""

    def after_step(self) -> None:
        """Called after each step (e.g. to sample a grid)."""

    # --- the loop ----------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, *, checkpoint_path: str | Path | None = None,
            checkpoint_every: int = 1000, max_seconds: float | None = None, progress: bool = True,
            callback: Callable[["Fit"], None] | None = None, callback_every: int = 50, desc: str = "training"):
        """Train until `steps` total steps (default config.steps) or `max_seconds`; checkpoint every
        `checkpoint_every` steps and at the end; call `callback(self)` every `callback_every` steps.
        (self.fit_config is the loop's config; a subclass keeps its own model config as self.config.)"""
        cfg = self.fit_config
        target = cfg.steps if steps is None else steps
        for name, value in (("checkpoint_every", checkpoint_every), ("callback_every", callback_every)):
            check_int(name, value, 1, hint=" (steps between calls)")
        if checkpoint_path is not None and distributed.rank() == 0:
            ckpt.remove_stale_temporaries(checkpoint_path)      # what a save killed mid-write left behind
            if self.last_good is None or Path(self.last_good[0]) != Path(checkpoint_path):
                self._keep_earlier(checkpoint_path)             # another run's file: never written over
        begun, saved = time.perf_counter(), self.step
        bar = tqdm(total=target, initial=self.step, disable=not (progress and distributed.rank() == 0),
                   desc=desc, unit="step")
        try:
            while self.step < target:
                t0 = time.perf_counter()
                for group in self.optimizer.param_groups:
                    if group.get("scheduled", True):
                        group["lr"] = group["peak_lr"] * lr_factor(self.step, cfg.steps, cfg.warmup, cfg.decay)
                loss, logs = self._as_pair(self.loss())
                logged = distributed.all_reduce_mean(loss.detach().float())   # the mean over processes
                if has_values(logged) and not torch.isfinite(logged):
                    raise TrainingDiverged(f"the loss became {logged.item()} at step {self.step}; training "
                                           f"stopped. {self._advice()}")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.clip_parameters(), cfg.grad_clip)
                self.before_step()
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                if self.ema_tensors is not None:
                    ema_update(self.ema_tensors, self.ema_sources, ema_decay_at(self.step, self.ema_decay))
                self.step += 1
                self.seconds += time.perf_counter() - t0
                for key, value in {"loss": number(logged), **logs}.items():
                    self.history.setdefault(key, []).append(value)
                self.after_step()
                bar.update(1)
                if self.step % 10 == 0 or self.step == target:
                    bar.set_postfix(loss=f"{sum(self.history['loss'][-10:]) / len(self.history['loss'][-10:]):.4f}")
                if checkpoint_path is not None and self.step % checkpoint_every == 0:
                    self.save(checkpoint_path)
                    saved = self.step
                if callback is not None and (self.step % callback_every == 0 or self.step == target):
                    callback(self)
                if max_seconds is not None:                    # every process stops at the same step
                    late = torch.tensor(float(time.perf_counter() - begun >= max_seconds), device=self.device)
                    if distributed.all_reduce_mean(late) > 0:
                        break
        finally:
            bar.close()
        if checkpoint_path is not None and self.step != saved:
            self.save(checkpoint_path)
        return self

    def train_module(self, module: nn.Module | None, *, checkpoint_path: str | Path | None, checkpoint_every: int,
                     resume: bool, max_seconds: float | None, progress: bool, callback: Callable | None,
                     callback_every: int, desc: str, steps: int | None = None):
        """The recipe every fitting of a model shares (fit_vae, fit_vae_gan, fit_clip, every FineTune): continue
        from checkpoint_path if it holds this run (with resume), fit with `module` in train mode, and whatever stops
        it call after_training(module) (the module back in eval mode); callback(self.report()) every callback_every
        steps; `steps`: train to that total (default config.steps). Returns self.report() (a subclass gives report())."""
        if module is not None:
            module.train()
        try:
            self.resume_from(checkpoint_path, resume)
            self.fit(steps, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                     max_seconds=max_seconds, progress=progress,
                     callback=None if callback is None else lambda fit: callback(fit.report()),
                     callback_every=callback_every, desc=desc)
        finally:
            self.after_training(module)
        return self.report()

    def after_training(self, module: nn.Module | None) -> None:
        """What train_module does however the run stopped: the module back in eval mode (FineTune does more)."""
        if module is not None:
            module.eval()

    @staticmethod
    def _as_pair(out) -> tuple[torch.Tensor, dict]:
        return out if isinstance(out, tuple) else (out, {})

    def _advice(self) -> str:
        lr = self.optimizer.param_groups[0]["lr"]
        good = (f"The last good checkpoint is {self.last_good[0]} (step {self.last_good[1]}): the same call with "
                f"a lower learning rate resumes from it (the one setting a resumed run may change)."
                if self.last_good else "No checkpoint of this run was written.")
        return f"Lower the learning rate (now {lr:.2e}), keep gradient clipping on, or use fp32. {good}"

    @staticmethod
    def _keep_earlier(path: str | Path) -> None:
        if (kept := ckpt.keep_earlier(path)) is not None:
            print(f"{path} held another run's checkpoint; it is kept as {kept} and this run starts afresh.")

    # --- checkpoints -------------------------------------------------------------------------------------
    def _weights_rms(self) -> float:
        if not all(has_values(p) for p in self.params):     # fake weights (course_lib.memory): nothing to read
            return math.nan
        with torch.no_grad():
            total = sum(p.detach().float().pow(2).sum().item() for p in self.params)
            count = sum(p.numel() for p in self.params)
        return math.sqrt(total / max(1, count))

    def check_weights(self) -> None:
        """Refuse (TrainingDiverged) weights that are not finite or whose RMS exploded since the last
        good checkpoint (or the start of training)."""
        rms = self._weights_rms()
        tensors = self.params + (self.ema_tensors or [])
        if not math.isfinite(rms) or not all(torch.isfinite(t).all() for t in tensors):
            raise TrainingDiverged(f"the weights hold NaN or inf after step {self.step}; they were not saved. "
                                   f"{self._advice()}")
        if self._rms > 0 and rms > EXPLOSION_FACTOR * self._rms:
            raise TrainingDiverged(f"the weights' RMS grew from {self._rms:.3g} to {rms:.3g} (over "
                                   f"{EXPLOSION_FACTOR:g}x) by step {self.step}: training diverged, and these "
                                   f"weights were not saved. {self._advice()}")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"param.{i}": p for i, p in enumerate(self.params)}
        tensors.update({f"ema.{i}": e for i, e in enumerate(self.ema_tensors or [])})
        for i, state in self.optimizer.state_dict()["state"].items():     # python numbers too (SparseAdam's step)
            tensors.update({f"optim.{i}.{name}": torch.as_tensor(value) for name, value in state.items()})
        tensors.update({"rng.loop": self.generator.get_state(), "rng.torch": torch.get_rng_state()})
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.batches is not None:
            tensors["data.order"] = self.batches.order.clone()
        tensors.update({f"log.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()})
        return tensors

    def metadata(self) -> dict[str, str]:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        numbers = [f"{i}.{name}" for i, state in self.optimizer.state_dict()["state"].items()
                   for name, value in state.items() if not torch.is_tensor(value)]
        return {"format": FORMAT, "run": json.dumps(self.run_info(), sort_keys=True), "step": str(self.step),
                "optim_numbers": json.dumps(numbers),
                "seconds": repr(self.seconds), "param_groups": json.dumps(groups),
                "data_position": str(self.batches.position if self.batches is not None else 0),
                "scaler": json.dumps(self.scaler.state_dict() if self.scaler is not None else None)}

    def save(self, path: str | Path) -> Path:
        """Check the weights, then write everything needed to continue exactly, atomically (rank 0 writes,
        other processes wait)."""
        self.check_weights()
        if distributed.rank() == 0:
            ckpt.atomic_save(self.state_tensors(), path, self.metadata())
        distributed.barrier()
        self.last_good, self._rms = (Path(path), self.step), self._weights_rms()
        return Path(path)

    def resume_from(self, path: str | Path | None, resume: bool = True) -> bool:
        """`load(path)` when there is such a file and `resume`; True if it did. A checkpoint of another run is
        refused, saying how to start afresh instead."""
        if path is None or not Path(path).is_file():
            return False
        if not resume:
            if distributed.rank() == 0:
                self._keep_earlier(path)
            distributed.barrier()
            return False
        try:
            self.load(path)
        except ValueError as error:
            raise ValueError(f"{error} To start afresh, pass resume=False (the earlier file is then kept as "
                             f"{Path(path).stem}.v<k>{Path(path).suffix}, nothing is overwritten) or another "
                             f"checkpoint_path.") from error
        if self.step > self.fit_config.steps:
            raise ValueError(f"{path} has trained {self.step} steps, more than the {self.fit_config.steps} asked "
                             f"for. Ask for at least {self.step} steps to use it, or pass resume=False to start "
                             f"afresh (the earlier file is kept under a new name).")
        return True

    def load(self, path: str | Path) -> "Fit":
        """Restore the state `save` wrote, after checking it comes from the same run (run_info)."""
        tensors, meta = ckpt.read(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a course_lib training checkpoint (format {meta.get('format')!r}; "
                             f"expected {FORMAT!r})")
        saved, now = (flat_dict(json.loads(x)) for x in (meta["run"], json.dumps(self.run_info(), sort_keys=True)))
        differ = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        lr_only = differ and all(k.rsplit(".", 1)[-1] == "lr" for k in differ)
        if differ and not lr_only:
            shown = "; ".join(f"trained on {a} images, now {b}" if k.endswith("n_images") else
                              f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"{path} was written by a different run, so it cannot be continued exactly: {shown}. "
                             f"Use the same settings and data (only the learning rate may change).")
        n = sum(k.startswith("param.") for k in tensors)
        if n != len(self.params):
            raise ValueError(f"{path} holds {n} trained tensors; this run trains {len(self.params)}")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
            for i, e in enumerate(self.ema_tensors or []):
                e.copy_(tensors[f"ema.{i}"])
        state: dict[int, dict] = {}
        numbers = set(json.loads(meta.get("optim_numbers", "[]")))     # saved from python numbers: give them back
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.item() if f"{index}.{name}" in numbers else value
        groups = self.optimizer.state_dict()["param_groups"]
        for group, saved_group in zip(groups, json.loads(meta["param_groups"])):
            peak = group["peak_lr"]                            # this run's rate (differs only if lr_only)
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved_group.items()})
            group["peak_lr"] = peak
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.scaler is not None and json.loads(meta["scaler"]) is not None:
            self.scaler.load_state_dict(json.loads(meta["scaler"]))
        self.generator.set_state(tensors["rng.loop"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.batches is not None:
            self.batches.order, self.batches.position = tensors["data.order"].long(), int(meta["data_position"])
        self.step, self.seconds = int(meta["step"]), float(meta["seconds"])
        self.history = {k[4:]: v.tolist() for k, v in tensors.items() if k.startswith("log.")}
        self.last_good, self._rms = (Path(path), self.step), self._weights_rms()
        if lr_only:
            print(f"resumed {path} at step {self.step} with another learning rate: " + "; ".join(
                f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items()) + " (not bit for bit from here)")
        return self


__all__ = ["PRECISIONS", "DECAYS", "EXPLOSION_FACTOR", "TrainingDiverged", "resolve_precision", "autocast",
           "lr_factor", "ema_decay_at", "ema_update", "fingerprint", "Batches", "FitConfig", "Fit"]
