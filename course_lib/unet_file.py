"""The denoiser's model file: what a trained U-Net ships as, and how it is loaded back.

A model file (format "course_lib.model/1") holds the EMA weights in float16, the U-Net's config, the noise
schedule as its alpha-bar table (so a learned schedule ships the same way as a fixed one), the prediction type
(epsilon, x0, v, or "flow" for a rectified-flow model) and a JSON record of how it was trained. It is written
and read through course_lib.checkpoint (atomic, checksummed), which knows nothing of U-Nets; this module is the
one place that does.

`load_model` gives back the path the model samples along (course_lib.schedules.path_for): the stored table
for a diffusion model, FlowSchedule for a rectified-flow one, so `sample(model, schedule, shape,
prediction=info["prediction"])` is right for either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import atomic_save, compact_state, read_format
from .schedules import FlowSchedule, NoiseSchedule, path_for, schedule_from_alphas_cumprod
from .unet import UNet, UNetConfig

FORMAT = "course_lib.model/1"


def save_model(path: str | os.PathLike, model: UNet, *, schedule: NoiseSchedule, prediction: str,
               info: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write a model file: weights (float16 by default), U-Net config, schedule table and prediction type."""
    tensors = compact_state(model, "model.", dtype)
    tensors["schedule.alphas_cumprod"] = schedule.alphas_cumprod.clone()
    metadata = {"format": FORMAT, "unet_config": model.config.to_json(),
                "prediction": prediction, "schedule_name": schedule.name, "info": json.dumps(info or {})}
    return atomic_save(tensors, path, metadata)


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               ) -> tuple[UNet, NoiseSchedule | FlowSchedule, dict]:
    """(model in float32 eval mode, the path it samples along, info dict with 'prediction' and training details;
    'steps_total' and 'train_seconds_total' add those of the run it was initialised from, if any)."""
    tensors, metadata = read_format(path, FORMAT, "model")
    model = UNet(UNetConfig.from_json(metadata["unet_config"]))
    state = {k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    schedule = schedule_from_alphas_cumprod(tensors["schedule.alphas_cumprod"].double())
    schedule.name = metadata.get("schedule_name", "custom")
    info = json.loads(metadata.get("info", "{}"))
    info["prediction"] = metadata["prediction"]
    first = info.get("initialised_from") or {}        # a run continued from an earlier model file: count both
    info["steps_total"] = (info.get("steps") or 0) + (first.get("steps") or 0)
    info["train_seconds_total"] = (info.get("train_seconds") or 0) + (first.get("train_seconds") or 0)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, path_for(info["prediction"], schedule), info


__all__ = ["FORMAT", "save_model", "load_model"]
