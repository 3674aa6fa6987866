"""Train course_lib.feature_net, the network behind course_lib.metrics (FID, KID, memorisation); write its card.

    python scripts/train_feature_net.py                     # the shipped checkpoint (minutes on 2 CPU cores)
    python scripts/train_feature_net.py --epochs 1 --out /tmp/fn/feature_net.safetensors   # a smoke test

FeatureNet learns to name the Unicode subcategory of a 32 px Noto emoji (99 classes) from the
training split, with light augmentation (shifts of up to 2 px on the white background, horizontal
flips). It runs on the CPU with a fixed seed and thread count, so a rerun on the same machine and
torch build gives the same weights. Training runs in the course's one loop (course_lib.loop.Fit, as
`ClassifierFit`): AdamW with a one-cycle learning rate, no gradient clipping, no EMA. It writes, atomically
(course_lib.checkpoint: a temporary file, then os.replace):
    checkpoints/feature_net.safetensors   fp16 weights; metadata: config, classes, seed, steps,
                                          held-out accuracy, torch version, command
    checkpoints/feature_net.md            the model card: command, seed, hardware, time, accuracy, the
                                          real-vs-real FID/KID floors, FID under noise and blur, and the
                                          nearest-neighbour distances behind the memorisation thresholds
All figures on the card are measured with the fp16 weights as shipped.

Design note, measured while building this: a first version used GroupNorm. Trained the same way
(20 epochs, 61.6% held-out accuracy) its FID did not notice noise: 398 training images against the
held-out images gave FID 10.81 clean and 10.67 / 10.43 / 10.69 / 24.35 with Gaussian noise of std
0.05 / 0.1 / 0.2 / 0.4 added. GroupNorm divides out each image's own response energy, which is
where noise shows. With BatchNorm (a fixed affine map once frozen) a 4-epoch pilot already gave
10.34 clean and 12.0 / 15.0 / 25.4 / 67.4: the feature space sees the grain an unfinished
diffusion sample leaves. Adding a noise-and-blur regression head to the GroupNorm net instead
either did not help (loss weight 1) or collapsed the features onto one direction (weight 10).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from course_lib import feature_net, metrics  # noqa: E402
from course_lib.checkpoint import atomic_save, write_text_atomic  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.feature_net import FeatureNet, FeatureNetConfig  # noqa: E402
from course_lib.loop import Fit, FitConfig  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402


def augment(x: torch.Tensor, g: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random shifts of up to `shift` px (padding with the white background) and horizontal flips."""
    B, C, H, W = x.shape  # batch, channels, height, width
    padded = F.pad(x, (shift,) * 4, value=1.0)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B), generator=g).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    flip = torch.rand(B, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class ClassifierFit(Fit):
    """A classifier trained in epochs by the course's one loop: each epoch visits the n training items once in a
    fresh random order (the loop's generator; the last batch may be smaller), `draw(indices, generator)` gives a
    batch's (augmented) images, and the loss is cross-entropy with the class weights and label smoothing given.
    AdamW with a one-cycle learning rate (OneCycleLR, 15% warm-up, stepped after every optimiser step; the loop's
    own schedule is off for it), no gradient clipping, no EMA. `on_epoch(epoch, mean loss)` after each epoch.
    Shared with scripts/train_judges.py."""

    def __init__(self, net: torch.nn.Module, labels: torch.Tensor,
                 draw: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *, epochs: int, batch_size: int,
                 lr: float, weight_decay: float, seed: int, label_smoothing: float = 0.0,
                 class_weight: torch.Tensor | None = None, on_epoch: Callable[[int, float], None] | None = None):
        steps = epochs * -(-len(labels) // batch_size)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                               pct_start=0.15)
        for group in optimizer.param_groups:
            group["scheduled"] = False                      # the one-cycle schedule sets the rate, not the loop
        super().__init__(FitConfig(steps=steps, lr=lr, grad_clip=None), optimizer, "cpu", seed=seed)
        self.net, self.labels, self.draw, self.batch_size = net, labels, draw, batch_size
        self.loss_options = dict(weight=class_weight, label_smoothing=label_smoothing)
        self.on_epoch, self.epoch = on_epoch, 0
        self.epoch_batches: list[torch.Tensor] = []         # the current epoch's batches still to come
        self.epoch_total = 0.0

    def loss(self) -> torch.Tensor:
        if not self.epoch_batches:                          # a new epoch
            self.net.train()
            order = torch.randperm(len(self.labels), generator=self.generator)
            self.epoch_batches = list(order.split(self.batch_size))
        self.batch = self.epoch_batches.pop(0)
        logits = self.net(self.draw(self.batch, self.generator))
        return F.cross_entropy(logits, self.labels[self.batch], **self.loss_options)

    def after_step(self) -> None:
        self.lr_schedule.step()
        self.epoch_total += self.history["loss"][-1] * len(self.batch)
        if not self.epoch_batches:                          # the epoch's last batch
            self.epoch += 1
            if self.on_epoch is not None:
                self.on_epoch(self.epoch, self.epoch_total / len(self.labels))
            self.epoch_total = 0.0


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(x).argmax(1) for x in images.split(512)])
    return (pred == labels).float().mean().item()


def train(args) -> tuple[FeatureNet, dict]:
    train_set, heldout = load_emoji(32, "train"), load_emoji(32, "heldout")
    classes = sorted(set(train_set.subcategories))
    index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([index[c] for c in train_set.subcategories])
    y_held = torch.tensor([index.get(c, -1) for c in heldout.subcategories])  # -1: never right (none so far)
    x_train = train_set.images

    torch.manual_seed(args.seed)
    net = FeatureNet(FeatureNetConfig(num_classes=len(classes)), classes=classes)
    print(net)

    def report(epoch: int, loss: float) -> None:
        print(f"epoch {epoch:2d}/{args.epochs}  loss {loss:.3f}  "
              f"held-out accuracy {accuracy(net, heldout.images, y_held):.3f}", flush=True)

    run = ClassifierFit(net, y_train, lambda i, g: augment(x_train[i], g), epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                        label_smoothing=args.label_smoothing, on_epoch=report)
    run.fit(progress=False)
    step = run.step

    # Centre and scale the features on the training images, round to fp16 as shipped,
    # and measure what ships.
    with torch.no_grad():
        net.eval()
        pooled = torch.cat([net.pool(x) for x in x_train.split(512)]).double()
        net.feature_mean.copy_(pooled.mean(0))
        net.feature_scale.copy_(pooled.var(0).mean().sqrt())
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    results = dict(steps=step, train_accuracy=accuracy(net, x_train, y_train),
                   heldout_accuracy=accuracy(net, heldout.images, y_held),
                   heldout_classes=len(set(heldout.subcategories)), classes=len(classes),
                   train_images=len(x_train), heldout_images=len(heldout))
    return net, results


def save(net: FeatureNet, path: Path, meta: dict) -> None:
    """fp16 safetensors with string metadata, written atomically (course_lib.checkpoint.atomic_save)."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    atomic_save(state, path, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def percentiles(d: torch.Tensor, qs=(1, 5, 50)) -> dict[int, float]:
    return {q: torch.quantile(d.double(), q / 100).item() for q in qs}


DUPLICATE = 1e-4  # RMS distance below which two images are the same picture


def threshold_rule(d_heldout: torch.Tensor) -> float:
    """Default memorisation threshold: half the 1st percentile of held-out-to-train nearest distances.

    Held-out images that are the same picture as a training image (Noto draws a few emoji
    identically, e.g. the flags of the United States and of the U.S. Outlying Islands) are left
    out of the percentile: they are copies, and the threshold should flag them."""
    distinct = d_heldout[d_heldout > DUPLICATE].double()
    return float(f"{0.5 * torch.quantile(distinct, 0.01).item():.2g}")


def measure(out: Path, seed: int) -> dict:
    """Floors, noise sensitivity and memorisation distances with the checkpoint just written."""
    feature_net.FEATURE_NET_PATH = out   # metrics loads the network (and keys its feature cache) from here
    train, held = load_emoji(32, "train"), load_emoji(32, "heldout")
    train_images, held_images = train.images, held.images
    floors = {}
    for reference, n, size in [("heldout", 100, 32), ("heldout", 398, 32), ("heldout", 1000, 32),
                               ("heldout", 3388, 32), ("heldout", 398, 16)]:
        floors[f"{reference}, n={n}, {size} px"] = metrics.floor(n, size=size, seed=seed, reference=reference)
    held_feats = metrics.emoji_features("heldout")
    g = torch.Generator().manual_seed(seed)
    x = train_images[torch.randperm(len(train_images), generator=g)[:398]]  # the floor's n=398 images
    pick = torch.randperm(len(train_images), generator=g)[:398]
    soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    degraded = {}
    for sigma in (0.02, 0.05, 0.1, 0.2, 0.4):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        degraded[f"noise, sigma = {sigma}"] = metrics.fid(metrics.features(noisy), held_feats)
    for b in (0.25, 0.5, 1.0):
        degraded[f"blur, b = {b}"] = metrics.fid(metrics.features(x + b * (soft - x)), held_feats)
    nn_dist = {}
    for space in metrics.SPACES:
        cached = metrics.emoji_features("train") if space == "features" else None
        d_held, i_held = metrics.nearest_neighbours(held_images, train_images, space, train_features=cached)
        # train-to-train: each image's nearest *other* training image (often a skin-tone variant)
        d_train, _ = metrics.nearest_neighbours(train_images[pick], train_images, space, k=2, train_features=cached)
        d_self, d_other = d_train[:, 0], d_train[:, 1]
        nn_dist[space] = dict(heldout=percentiles(d_held), train_other=percentiles(d_other),
                              self=d_self.max().item(),
                              threshold=threshold_rule(d_held))
        nn_dist[space]["flagged_heldout"] = (d_held < nn_dist[space]["threshold"]).float().mean().item()
        nn_dist[space]["duplicates"] = [f"{held.captions[i]} = {train.captions[j]}"
                                        for i, j in enumerate(i_held.tolist()) if d_held[i] <= DUPLICATE]
    return dict(floors=floors, degraded=degraded, nn=nn_dist)


def card(args, results: dict, m: dict, wall: float, command: str) -> str:
    floors = "\n".join(f"| {k} | {v.fid:.2f} | {v.kid_mean:.4f} ± {v.kid_std:.4f} |" for k, v in m["floors"].items())
    degraded = "\n".join(f"| {s} | {v:.2f} |" for s, v in m["degraded"].items())
    nn = "\n".join(
        f"| {space} | {d['heldout'][1]:.3f} / {d['heldout'][5]:.3f} / {d['heldout'][50]:.3f} | "
        f"{d['train_other'][1]:.3f} / {d['train_other'][5]:.3f} / {d['train_other'][50]:.3f} | "
        f"{d['threshold']:g} | {100 * d['flagged_heldout']:.1f}% |" for space, d in m["nn"].items())
    main = m["floors"]["heldout, n=398, 32 px"]
    dups = "; ".join(m["nn"]["pixel"]["duplicates"]) or "none"
    return f"""# FeatureNet: the course's feature space for FID, KID and memorisation

A small CNN ({sum(p.numel() for p in args.net.parameters()):,} parameters, fp16 safetensors) that names the
Unicode subcategory of a 32 px emoji. `course_lib.metrics` uses its penultimate embedding (the global
average pool of the last conv block, D = {args.net.dim}) as the feature space for FID and KID, in place of
Inception-v3, whose weights cannot be downloaded offline. Figures in this space are comparable with each
other, never with published Inception FIDs. Its norm layers are BatchNorm, frozen: a GroupNorm version was
blind to noise (the numbers are in the docstring of scripts/train_feature_net.py).

| | |
|---|---|
| command | `{command}` |
| seed | {args.seed} |
| data | Noto emoji, training split ({results['train_images']} images, {results['classes']} subcategories), 32 px; augmentation: shifts up to 2 px, horizontal flips |
| training | {args.epochs} epochs, {results['steps']} AdamW steps, batch {args.batch_size}, one-cycle lr {args.lr}, weight decay {args.weight_decay}, label smoothing {args.label_smoothing} |
| hardware | {describe_machine("cpu")}, torch {torch.__version__} |
| wall time | {wall / 60:.1f} min (training and the measurements below) |
| held-out accuracy | **{100 * results['heldout_accuracy']:.1f}%** top-1 over {results['classes']} subcategories ({results['heldout_images']} held-out images, {results['heldout_classes']} subcategories present); training accuracy {100 * results['train_accuracy']:.1f}% |

Held-out emoji are new base emoji (all skin-tone variants of an emoji fall on one side of the split),
so the held-out accuracy measures how well the features generalise beyond the images they were trained on.

## Real-versus-real floors

The best a model can score: real images of one split against the other ("reference"). FID is biased
upward at small n, so compare a model's figure with the floor at the same n (`metrics.evaluate` does).
Against `heldout`, the floor is n training images vs the {results['heldout_images']} held-out images; against `train`,
n held-out images vs all training images (so `train` at n = 398 has the FID of the `heldout`, n = 3388 row).
KID: 100 subsets of min(1000, n // 2, N_ref // 2) images, mean ± std over subsets.

| reference, n, image size | FID | KID |
|---|---|---|
{floors}

For scale: FID against the held-out images of the same 398 training images, degraded: Gaussian noise
of std sigma (clipped to [-1, 1]), or blur x + b (x_soft - x) with x_soft the image averaged over 2x2
blocks and upsampled bilinearly. The clean figure is the floor above ({main.fid:.2f}).

| degradation | FID |
|---|---|
{degraded}

## Memorisation distances

RMS distance from an image to its nearest training image (1st / 5th / 50th percentile). Held-out images
are new emoji, not copies; "train, other" is a training image's nearest *other* training image (often a
skin-tone or gender variant of itself). The default threshold of `metrics.memorisation` in each space
is half the held-out 1st percentile, leaving out the held-out images that are the same picture as a
training image; it is stored in the checkpoint's metadata. Exact copies (distance 0) and near-copies
are flagged, new emoji almost never. Pixel distances are in [-1, 1] units per pixel and channel;
feature distances in units of the features' average standard deviation.

Held-out images that are the same picture as a training image (flagged, rightly, in both spaces):
{dups}.

| space | held-out -> train | train, other -> train | default threshold | held-out flagged |
|---|---|---|---|---|
{nn}

Rebuild with the command above; the card is rewritten with the new measurements.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the result depends on it)")
    ap.add_argument("--out", type=Path, default=feature_net.FEATURE_NET_PATH,
                    help="checkpoint path; the card is written beside it as <name>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    net, results = train(args)
    meta = dict(config=json.dumps(vars(net.config)), classes=json.dumps(net.classes), seed=str(args.seed),
                steps=str(results["steps"]), heldout_accuracy=f"{results['heldout_accuracy']:.4f}",
                torch_version=torch.__version__, command=" ".join(["python", "scripts/train_feature_net.py",
                                                                   *sys.argv[1:]]))
    save(net, args.out, meta)
    print(f"held-out accuracy {results['heldout_accuracy']:.4f} (train {results['train_accuracy']:.4f}); "
          f"wrote {args.out}")
    m = measure(args.out, args.seed)
    meta["memorisation_thresholds"] = json.dumps({space: d["threshold"] for space, d in m["nn"].items()})
    save(net, args.out, meta)  # again, now with the thresholds it measured
    wall = time.time() - start
    for k, v in m["floors"].items():
        print(f"floor {k}: {v}")
    print("FID of degraded training images vs held-out:", {s: round(v, 2) for s, v in m["degraded"].items()})
    for space, d in m["nn"].items():
        print(f"nearest-neighbour RMS distance, {space}: {d}")
    args.net = net
    write_text_atomic(args.out.with_suffix(".md"), card(args, results, m, wall, meta["command"]))
    print(f"wrote {args.out.with_suffix('.md')} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
