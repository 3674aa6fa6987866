r"""The judge network whose features define FID, KID and the memorisation check (course_lib.metrics).

FID and KID compare two sets of images through the features a frozen network gives them. The usual network,
Inception-v3 [1], cannot be downloaded offline, so the course ships its own: `FeatureNet`, a small CNN (0.3 M
parameters, 0.6 MB in fp16) trained by `python scripts/train_feature_net.py` to name the Unicode *subcategory* of
a 32 px training emoji ("face-smiling", "animal-bird", ... 99 of them: the 10 categories say little about shape,
while 99 fine classes make the features tell faces from hands from flags from birds). The features are the
global average pool of the last conv block (D = 128, the analogue of Inception's 2048-d pool3), centred and
scaled once on the training images; the network's BatchNorm layers [2], frozen, keep noise and blur visible in
them (GroupNorm would not). Numbers are comparable only within this feature space, never with published
Inception FIDs. The model card, with accuracy, floors and FID under noise and blur, is checkpoints/feature_net.md.

This module holds:
    FEATURE_SIZE, FEATURE_NET_PATH, REBUILD_COMMAND   the input size, the shipped file, how to rebuild it
    FeatureNetConfig, ConvBNBlock, FeatureNet          the network, leaf block first
    load_feature_net                                   the shipped network, frozen (cached per file and device)
    to_feature_size                                    any image size -> the network's 32 x 32

References:
  [1] Szegedy et al. Rethinking the Inception Architecture for Computer Vision. 2016.
      https://arxiv.org/abs/1512.00567
  [2] Ioffe, Szegedy. Batch Normalization. 2015. https://arxiv.org/abs/1502.03167
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import checkpoints_dir, read
from .settings import default_device

FEATURE_SIZE = 32                      # every image is resized to 32 x 32 before the network sees it
FEATURE_NET_PATH = checkpoints_dir() / "feature_net.safetensors"   # read at each load: tests and the script set it
REBUILD_COMMAND = "python scripts/train_feature_net.py"


@dataclass
class FeatureNetConfig:
    channels: tuple[int, ...] = (32, 64, 128)   # width of each stage; 2x average-pool between stages
    num_classes: int = 99                         # emoji subcategories in the training split


class ConvBNBlock(nn.Module):
    """3x3 conv -> BatchNorm -> SiLU. Frozen in eval mode, BatchNorm is a fixed affine map, so an image's features
    do not depend on its batch, and (unlike GroupNorm, which divides out each image's own response energy) noise
    in an image still shows in its features."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class FeatureNet(nn.Module):
    """Small CNN classifier of 32 px emoji subcategories; `embed` gives the features FID and KID use."""

    def __init__(self, config: FeatureNetConfig | None = None, classes: list[str] | None = None):
        super().__init__()
        self.config = config = config or FeatureNetConfig()
        self.classes = classes or [str(i) for i in range(config.num_classes)]
        stages, c_in = [], 3
        for i, c in enumerate(config.channels):
            pool = [nn.AvgPool2d(2)] if i > 0 else []
            stages.append(nn.Sequential(*pool, ConvBNBlock(c_in, c), ConvBNBlock(c, c)))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, config.num_classes)
        # Set once after training from the training images' pooled features (see `embed`).
        self.register_buffer("feature_mean", torch.zeros(c_in))
        self.register_buffer("feature_scale", torch.ones(()))

    @property
    def dim(self) -> int:
        return self.config.channels[-1]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, D): global average pool of the last stage."""
        return self.stages(x).mean(dim=(2, 3))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features: the pool, centred on the training images' mean and divided by one number so the average
        per-dimension variance over the training images is 1 (the scale KID's kernel (x.y / D + 1)^3 assumes;
        relative weights of the dimensions are left as learnt)."""
        return (self.pool(x) - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subcategory logits (B, num_classes)."""
        return self.head(self.pool(x))

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"FeatureNet(channels={self.config.channels}, D={self.dim}, classes={self.config.num_classes}, params={n:,})"


_NETS: dict[tuple[str, str], FeatureNet] = {}


def load_feature_net(device: torch.device | str | None = None) -> FeatureNet:
    """The shipped FeatureNet (the file at FEATURE_NET_PATH), frozen, in eval mode and float32 (cached per file
    and device). A damaged file is refused by checkpoint.read, naming it."""
    device = torch.device(device) if device is not None else default_device()
    path = Path(FEATURE_NET_PATH)
    key = (str(path), str(device))
    if key in _NETS:
        return _NETS[key]
    if not path.exists():
        raise FileNotFoundError(f"feature network checkpoint not found at {path}. Rebuild it (a few minutes "
                                f"on a CPU) with `{REBUILD_COMMAND}` from the repository root.")
    state, meta = read(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 on disk
    config = json.loads(meta["config"])
    net = FeatureNet(FeatureNetConfig(**{**config, "channels": tuple(config["channels"])}),
                     classes=json.loads(meta["classes"]))
    net.load_state_dict(state)
    # Default thresholds of course_lib.metrics.memorisation, measured by the rebuild script.
    net.memorisation_thresholds = json.loads(meta.get("memorisation_thresholds", "{}"))
    net = net.to(device).eval().requires_grad_(False)
    _NETS[key] = net
    return net


def to_feature_size(images: torch.Tensor) -> torch.Tensor:
    """Resize (B, 3, H, W) to 32 x 32: area averaging to shrink (as course_lib.data does), bilinear to grow."""
    H, W = images.shape[-2:]
    if (H, W) == (FEATURE_SIZE, FEATURE_SIZE):
        return images
    mode = "area" if H >= FEATURE_SIZE and W >= FEATURE_SIZE else "bilinear"
    return F.interpolate(images, size=(FEATURE_SIZE, FEATURE_SIZE), mode=mode)


__all__ = ["FEATURE_SIZE", "FEATURE_NET_PATH", "REBUILD_COMMAND", "FeatureNetConfig", "ConvBNBlock", "FeatureNet",
           "load_feature_net", "to_feature_size"]
