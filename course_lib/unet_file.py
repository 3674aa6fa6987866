"""The denoiser's model file: what a trained U-Net (or DiT, or MMDiT) ships as, and how it is loaded back.

A model file (format "course_lib.model/1") holds the EMA weights in float16, the network's config, the noise
schedule as its alpha-bar table (so a learned schedule ships the same way as a fixed one), the prediction type
(epsilon, x0, v, or "flow" for a rectified-flow model) and a JSON record of how it was trained. It is written
and read through course_lib.checkpoint (atomic, checksummed), which knows nothing of U-Nets; this module is the
one place that does.

`load_model` gives back the path the model samples along (course_lib.schedules.path_for): the stored table
for a diffusion model, FlowSchedule for a rectified-flow one (with the timestep shift it was trained with, metadata
"timestep_shift"; absent: 1), so `sample(model, schedule, shape, prediction=info["prediction"])` is right for either.

The denoiser may be any of the course's networks: metadata "architecture" names it (ARCHITECTURES: "unet",
"dit", "mmdit") and "unet_config" holds its config's JSON (the key is older than the transformers). A file without
"architecture" is a U-Net, as every file written before them is. `build_model` is the one place a network is
rebuilt from metadata (this module's files and the Trainer's checkpoints).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import atomic_save, compact_state, read_format, with_chain_totals
from .checks import check_choice
from .denoiser import Denoiser
from .dit import DiT, DiTConfig
from .mmdit import MMDiT, MMDiTConfig
from .schedules import FlowSchedule, NoiseSchedule, path_for, schedule_from_alphas_cumprod
from .unet import UNet, UNetConfig

FORMAT = "course_lib.model/1"
ARCHITECTURES = {"unet": (UNet, UNetConfig), "dit": (DiT, DiTConfig), "mmdit": (MMDiT, MMDiTConfig)}


def architecture_of(model: Denoiser) -> str:
    """The name in ARCHITECTURES of a network's class (an MMDiT is a DiT too: its own name wins)."""
    for name, (cls, _) in reversed(ARCHITECTURES.items()):
        if isinstance(model, cls):
            return name
    raise TypeError(f"a model file holds one of {', '.join(c.__name__ for c, _ in ARCHITECTURES.values())}; "
                    f"got {type(model).__name__}")


def build_model(metadata: dict[str, str]) -> Denoiser:
    """A fresh network as a file's metadata describes it: "architecture" (absent: "unet") and its "unet_config"."""
    name = check_choice("architecture", metadata.get("architecture", "unet"), tuple(ARCHITECTURES))
    cls, config = ARCHITECTURES[name]
    return cls(config.from_json(metadata["unet_config"]))


def save_model(path: str | os.PathLike, model: Denoiser, *, schedule: NoiseSchedule, prediction: str,
               info: dict | None = None, dtype: torch.dtype = torch.float16, shift: float = 1.0) -> Path:
    """Write a model file: weights (float16 by default), architecture and config, schedule table, prediction type
    and, for a flow, its timestep shift (course_lib.schedules.time_shift; refused for any other prediction)."""
    path_for(prediction, schedule, shift=shift)                  # checks the shift
    tensors = compact_state(model, "model.", dtype)
    tensors["schedule.alphas_cumprod"] = schedule.alphas_cumprod.clone()
    metadata = {"format": FORMAT, "architecture": architecture_of(model), "unet_config": model.config.to_json(),
                "prediction": prediction, "schedule_name": schedule.name, "timestep_shift": repr(float(shift)),
                "info": json.dumps(info or {})}
    return atomic_save(tensors, path, metadata)


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               ) -> tuple[Denoiser, NoiseSchedule | FlowSchedule, dict]:
    """(model in float32 eval mode, the path it samples along, info dict with 'prediction' and training details;
    'steps_total' and 'train_seconds_total' add those of the runs it was initialised from, if any)."""
    tensors, metadata = read_format(path, FORMAT, "model")
    model = build_model(metadata)
    state = {k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    schedule = schedule_from_alphas_cumprod(tensors["schedule.alphas_cumprod"].double())
    schedule.name = metadata.get("schedule_name", "custom")
    info = json.loads(metadata.get("info", "{}"))
    info["prediction"] = metadata["prediction"]
    with_chain_totals(info)                           # a run continued from earlier model files: count them all
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, path_for(info["prediction"], schedule, shift=float(metadata.get("timestep_shift", 1.0))), info


__all__ = ["FORMAT", "ARCHITECTURES", "architecture_of", "build_model", "save_model", "load_model"]
