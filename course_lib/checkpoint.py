"""Saving and loading models and training state as safetensors, written atomically.

Atomic: a file is first written next to its destination under a temporary name, flushed to disk,
then renamed over the destination (os.replace is atomic on POSIX and Windows). An interruption
leaves either the old file or the new one, never half of one.

Two kinds of file:
    training checkpoint   everything needed to continue exactly (weights, EMA weights, optimizer
                          moments, random-number states, data order), float32; see course_lib.train
    model file            the EMA weights in float16 plus the U-Net config and how it was trained;
                          small enough to ship in the repository (`save_model`, `load_model`)

Safetensors stores tensors plus a flat str -> str metadata dict; anything that is not a tensor
(configs, step counts) goes into the metadata as JSON. Nothing is unpickled, so loading a file from
elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .schedules import NoiseSchedule, schedule_from_alphas_cumprod
from .unet import UNet, UNetConfig


CHECKPOINTS_ENV = "COURSE_CHECKPOINTS"


def checkpoints_dir() -> Path:
    """The folder of shipped checkpoints: $COURSE_CHECKPOINTS if set, else checkpoints/ in the repository."""
    return Path(os.environ.get(CHECKPOINTS_ENV) or Path(__file__).resolve().parent.parent / "checkpoints")


def shipped(name: str) -> Path:
    """Path of a shipped model file, e.g. shipped("ddpm_emoji32"), with a clear error if it is missing."""
    path = checkpoints_dir() / f"{name}.safetensors"
    if not path.is_file():
        known = sorted(p.stem for p in checkpoints_dir().glob("*.safetensors"))
        raise FileNotFoundError(f"no shipped checkpoint {name!r} at {path}; available: {', '.join(known) or 'none'}. "
                                f"Each is made by a command in scripts/ named in its model card ({name}.md).")
    return path


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """save_file to a temporary file in the destination folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def compact_state(module: torch.nn.Module, prefix: str = "", dtype: torch.dtype = torch.float16,
                  ) -> dict[str, torch.Tensor]:
    """A module's state dict for shipping: floating-point tensors cast to `dtype` (float16), keys prefixed."""
    return {f"{prefix}{k}": v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def read_format(path: str | os.PathLike, expected: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read`, refusing a file whose metadata format is not `expected` (e.g. a training checkpoint given
    where a model file is wanted) with a message naming both."""
    tensors, metadata = read(path)
    if metadata.get("format") != expected:
        raise ValueError(f"{path} is not a course_lib {what} file (metadata format {metadata.get('format')!r}; "
                         f"expected {expected!r})")
    return tensors, metadata


def save_model(path: str | os.PathLike, model: UNet, *, schedule: NoiseSchedule, prediction: str,
               info: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write a model file: weights (float16 by default), U-Net config, schedule and prediction type.

    The schedule is stored as its alpha-bar table, so a learned schedule ships the same way as a fixed one."""
    tensors = compact_state(model, "model.", dtype)
    tensors["schedule.alphas_cumprod"] = schedule.alphas_cumprod.clone()
    metadata = {"format": "course_lib.model/1", "unet_config": model.config.to_json(),
                "prediction": prediction, "schedule_name": schedule.name, "info": json.dumps(info or {})}
    return atomic_save(tensors, path, metadata)


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               ) -> tuple[UNet, NoiseSchedule, dict]:
    """(model in float32 eval mode, its schedule, info dict with 'prediction' and training details)."""
    tensors, metadata = read_format(path, "course_lib.model/1", "model")
    model = UNet(UNetConfig.from_json(metadata["unet_config"]))
    state = {k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    name = metadata.get("schedule_name", "custom")
    table = tensors["schedule.alphas_cumprod"].double()
    schedule = schedule_from_alphas_cumprod(table)
    schedule.name = name
    info = json.loads(metadata.get("info", "{}"))
    info["prediction"] = metadata["prediction"]
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, schedule, info


__all__ = ["checkpoints_dir", "shipped", "atomic_save", "read", "compact_state", "read_format", "save_model",
           "load_model"]
