r"""Judges for what FID and the mini CLIP cannot see: an emoji's *style* (Noto or Twemoji) and its *skin tone*.

A judge is a small classifier trained on real images only, never on a generator's output and never used to
condition one, so it can grade a generator without grading its own work. Both are the course's FeatureNet
architecture (course_lib.feature_net: conv-BatchNorm-SiLU stages, global average pool, a linear head) at a
quarter (tone) or three eighths (style) of its width, trained by `python scripts/train_judges.py` on the
training split with shifts, flips, blur, noise and round trips through the course's VAE (so a soft, grainy
generated image is still in the data they know: every tiny-SD image is decoded by that VAE), and measured on the
held-out split: new base emoji, never seen in any style or tone.

    style   "noto" or "twemoji": the same emoji drawn by Google or by Twitter; trained on both styles'
            training images.
    tone    one of TONES, "" being the default yellow: trained on the Noto emoji that come in skin tones
            (one tone per image; emoji that mix two tones, such as couples, are left out).

Their model card, checkpoints/judges.md, gives each one's held-out accuracy, clean, blurred and through the
course's VAE, and where it fails. What a judge can tell: which of its classes an image looks most like. What it
cannot: whether the image shows the right emoji (that is FID's and the subject-similarity score's job), or
anything about a class it never saw (a photograph is still called "noto" or "twemoji").

    >>> from course_lib import judges
    >>> judges.predict("tone", images)          # doctest: +SKIP
    ['dark', 'medium', ...]
    >>> judges.share("style", images, "twemoji")  # doctest: +SKIP
    0.73
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .checkpoint import checkpoints_dir, read
from .data import TONES, check_choice
from .feature_net import FeatureNet, FeatureNetConfig, to_feature_size
from .forward import check_images
from .settings import default_device

JUDGES = {"style": ("noto", "twemoji"), "tone": TONES}
# Widths: the tone judge sees colour, which a quarter of FeatureNet's width learns; the style judge must see
# shading and outlines of emoji it never saw, and needed more (the card records both).
CHANNELS = {"style": (24, 48, 96), "tone": (16, 32, 64)}
REBUILD_COMMAND = "python scripts/train_judges.py"


def judge_path(name: str) -> Path:
    """checkpoints/<name>_judge.safetensors (read at each load, so tests can point checkpoints_dir elsewhere)."""
    check_choice("judge", name, tuple(JUDGES))
    return checkpoints_dir() / f"{name}_judge.safetensors"


def new_judge(name: str, channels: tuple[int, ...] | None = None) -> FeatureNet:
    """An untrained judge: FeatureNet with `channels` (default CHANNELS[name]) and one output per class of
    JUDGES[name]."""
    check_choice("judge", name, tuple(JUDGES))
    classes = list(JUDGES[name])
    config = FeatureNetConfig(channels=tuple(channels or CHANNELS[name]), num_classes=len(classes))
    return FeatureNet(config, classes=classes)


def load_judge(name: str, device: torch.device | str | None = None, path: str | Path | None = None) -> FeatureNet:
    """The shipped judge `name` ("style" or "tone"), frozen, float32, in eval mode (cached per file and device).
    Its metadata (held-out accuracy, seed, command) is on `.info`."""
    device = torch.device(device) if device is not None else default_device()
    return _load(name, str(Path(path) if path is not None else judge_path(name)), str(device))


@lru_cache(maxsize=8)
def _load(name: str, path: str, device: str) -> FeatureNet:
    if not Path(path).exists():
        raise FileNotFoundError(f"{name} judge not found at {path}. Rebuild it (a few minutes on a CPU) with "
                                f"`{REBUILD_COMMAND}` from the repository root.")
    state, meta = read(path)
    if json.loads(meta.get("classes", "[]")) != list(JUDGES[name]):
        raise ValueError(f"{path} is not a {name} judge: its classes are {meta.get('classes')}, "
                         f"a {name} judge's are {list(JUDGES[name])}")
    net = new_judge(name, json.loads(meta["channels"]) if "channels" in meta else None)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net = net.to(device).eval().requires_grad_(False)
    net.info = {k: json.loads(v) if k not in ("command", "machine", "torch") else v for k, v in meta.items()}
    return net


@torch.no_grad()
def probabilities(name: str, images: torch.Tensor, batch_size: int = 256,
                  device: torch.device | str | None = None, judge: FeatureNet | None = None) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1], any size (resized to 32 px as FID's features are) -> (N, classes) softmax
    probabilities on the CPU, in the order of JUDGES[name]."""
    check_choice("judge", name, tuple(JUDGES))
    check_images(images, "images")          # finite, in [-1, 1]: a judge of 0..255 images would judge nonsense
    if images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W); got {tuple(images.shape)}")
    net = judge if judge is not None else load_judge(name, device)
    dev = next(net.parameters()).device
    out = [net(to_feature_size(x.to(dev).float())).softmax(-1).cpu() for x in images.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, len(JUDGES[name]))


def predict(name: str, images: torch.Tensor, **kwargs) -> list[str]:
    """The judged class of each image: "noto"/"twemoji" for "style", a member of TONES for "tone"."""
    check_choice("judge", name, tuple(JUDGES))
    classes = JUDGES[name]
    return [classes[i] for i in probabilities(name, images, **kwargs).argmax(1).tolist()]


def share(name: str, images: torch.Tensor, cls: str, **kwargs) -> float:
    """The fraction of images judged to be class `cls`, e.g. share("style", images, "twemoji")."""
    check_choice(f"{name} class", cls, JUDGES[name])
    if len(images) == 0:
        raise ValueError("no images to judge")
    return sum(p == cls for p in predict(name, images, **kwargs)) / len(images)


def accuracy(name: str, images: torch.Tensor, truth: list[str] | tuple[str, ...], **kwargs) -> float:
    """The fraction of images whose judged class is truth[k] (image k should be truth[k])."""
    if len(images) != len(truth) or len(images) == 0:
        raise ValueError(f"need one true class per image and at least one image; got {len(images)} images and "
                         f"{len(truth)} classes")
    for t in set(truth):
        check_choice(f"{name} class", t, JUDGES[name])
    return sum(p == t for p, t in zip(predict(name, images, **kwargs), truth)) / len(images)


def tone_accuracy(images: torch.Tensor, tones: list[str] | tuple[str, ...]) -> float:
    """Prompt fidelity for the tone contexts (notebooks 11, 12): the fraction of images (image k asked for tones[k])
    that the skin-tone judge finds drawn in the asked tone (chance 1/6; its accuracy on real held-out images is on
    its card, checkpoints/judges.md)."""
    if len(images) != len(tones):
        raise ValueError(f"need one asked tone per image; got {len(images)} images and {len(tones)} tones")
    return accuracy("tone", images, list(tones))


__all__ = ["TONES", "JUDGES", "CHANNELS", "REBUILD_COMMAND", "judge_path", "new_judge", "load_judge",
           "probabilities", "predict", "share", "accuracy", "tone_accuracy"]
