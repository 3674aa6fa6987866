r"""Sample quality (FID, KID) in a fixed feature space, a memorisation check, subject fidelity, and PSNR.

FID and KID compare two sets of images through the features a frozen network gives them: here the course's
own `FeatureNet` (course_lib.feature_net, which describes it; model card checkpoints/feature_net.md), a small
emoji classifier standing in for Inception-v3, which cannot be downloaded offline. `features` gives the
D = 128 features of any batch of images. Numbers are comparable only within this feature space, never with
published Inception FIDs.

Notation:
    f(x)            the D-dim feature of image x (`features`)
    mu_a, S_a       mean and covariance of the features of set a
    k(x, y)         (x.y / D + 1)^3, KID's cubic polynomial kernel

Equations:
    FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})             [1]
          the Frechet (Wasserstein-2) distance between N(mu_a, S_a) and N(mu_b, S_b); tr((S_a S_b)^{1/2})
          = tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}), a symmetric PSD matrix, so two `eigh` calls suffice.
    KID = MMD^2_unbiased = mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)  [2]
          averaged over random subsets; unbiased, so it can come out slightly negative.

Sample size matters. FID is biased upward for small n [3]: two sets of real images drawn from the same
distribution give a positive FID that shrinks as n grows. So a figure is only meaningful beside the
real-versus-real *floor* at the same n (`floor`), and two figures only comparable at equal n; `evaluate` reports
both. KID is unbiased but noisy at small n: read its std. The floor also holds the held-out images' shift from
the training images, which the network has seen: a model that reproduced its training set would score it.

Precision and recall [5] (`precision_recall`): FID folds realism and coverage into one number; these two split
it. Precision is the share of samples that land near some real image, recall the share of real images that some
sample lands near ("near": within a point's distance to its k-th nearest neighbour in its own set).

Memorisation: `memorisation` finds each sample's nearest training image (RMS distance in pixels or in features)
and flags samples closer than a threshold, chosen from the distances held-out images (which no model has seen)
have to their nearest training image.

Subject fidelity (notebooks 11, 12): `subject_similarity`, DreamBooth's DINO score in this feature space, and
`self_similarity`, the same score among the real images of a subject, the reference it is compared with.

Pixel statistics (course_lib.pixel_metrics, re-exported here): `psnr` and `high_frequency_share` (sharpness) of
reconstructions (notebooks 06, 07), and `colour` (notebooks 05, 09).

References:
  [1] Heusel et al. GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
      Equilibrium. 2017. https://arxiv.org/abs/1706.08500
  [2] Binkowski, Sutherland, Arbel, Gretton. Demystifying MMD GANs. 2018. https://arxiv.org/abs/1801.01401
  [3] Chong, Forsyth. Effectively Unbiased FID and Inception Score and Where to Find Them.
      2020. https://arxiv.org/abs/1911.07023
  [4] Carlini et al. Extracting Training Data from Diffusion Models. 2023. https://arxiv.org/abs/2301.13188
  [5] Kynkaanniemi, Karras, Laine, Lehtinen, Aila. Improved Precision and Recall Metric for Assessing Generative
      Models. 2019. https://arxiv.org/abs/1904.06991
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import feature_net
from .checkpoint import atomic_save, checkpoints_dir, read
from .checks import check_choice, check_int
from .data import data_dir, load_emoji
from .feature_net import REBUILD_COMMAND, load_feature_net, to_feature_size
from .forward import check_images
from .pixel_metrics import Colour, colour, high_frequency_share, psnr  # noqa: F401 (re-exported: metrics.psnr, ...)
from .settings import cache_dir, default_device

SPACES = ("pixel", "features")
REFERENCES = ("heldout", "train")


# --- Features ----------------------------------------------------------------------------------------

@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 256, device: torch.device | str | None = None) -> torch.Tensor:
    """FeatureNet embeddings (N, D) float32 on the CPU of images (N, 3, H, W) in [-1, 1].

    Any H, W is resized to 32 x 32; values outside [-1, 1] are clipped, as saving the images to a file would."""
    check_images(images, "images", data_range=False)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels; got shape {tuple(images.shape)}")
    net = load_feature_net(device)
    device = next(net.parameters()).device
    out = [net.embed(to_feature_size(chunk.to(device, torch.float32).clamp(-1, 1))).cpu()
           for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, net.dim)


# --- FID ---------------------------------------------------------------------------------------------

def _check_feats(feats: torch.Tensor, name: str, min_n: int = 2) -> torch.Tensor:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{name} must be a (N, D) tensor of features (see `features`); got {shape}")
    if feats.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} rows (feature vectors); got {feats.shape[0]}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return feats.detach().to("cpu", torch.float64)


def _psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (tiny negative eigenvalues -> 0)."""
    w, V = torch.linalg.eigh((S + S.T) / 2)
    return (V * w.clamp(min=0).sqrt()) @ V.T


def frechet_distance(mu_a: torch.Tensor, S_a: torch.Tensor, mu_b: torch.Tensor, S_b: torch.Tensor) -> float:
    r"""Frechet distance between N(mu_a, S_a) and N(mu_b, S_b) (Eq. 6 of Heusel et al. [1]), in float64.

        d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(M^{1/2}),   M = S_a^{1/2} S_b S_a^{1/2}
    M is similar to S_a S_b, so tr(M^{1/2}) = tr((S_a S_b)^{1/2}); being symmetric PSD its square
    root comes from `eigh` (no scipy.linalg.sqrtm, no complex round-off)."""
    mu_a, S_a, mu_b, S_b = (torch.as_tensor(v, dtype=torch.float64) for v in (mu_a, S_a, mu_b, S_b))
    root_a = _psd_sqrt(S_a)
    M = root_a @ S_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((M + M.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + S_a.trace() + S_b.trace() - 2 * tr_sqrt
    return max(d2.item(), 0.0)  # exact value is >= 0; clip round-off below zero


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID: Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D) [1]."""
    a, b = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    return frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


# --- KID ---------------------------------------------------------------------------------------------

def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 (Eq. 3 of Binkowski et al. [2]), equal-size sets."""
    m, D = x.shape
    k_xx, k_yy, k_xy = ((u @ v.T / D + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    off_diag = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return off_diag(k_xx) + off_diag(k_yy) - 2 * k_xy.mean()


def kid(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 100, subset_size: int | None = None,
        seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2, cubic polynomial kernel, mean and std over random subsets [2].

    subset_size defaults to min(1000, N_a // 2, N_b // 2): each subset draws that many rows of each set without
    replacement, so subsets differ even when a set is small (with subsets as large as the set, every subset would
    be the same and the std 0). The std is the spread of one subset's estimate, a conservative guide to the
    uncertainty of the mean."""
    a, b = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    m = subset_size if subset_size is not None else min(1000, max(2, len(a) // 2), max(2, len(b) // 2))
    m = check_int("subset_size", m, 2, min(len(a), len(b)), hint=" (min(N_a, N_b))")
    subsets = check_int("subsets", subsets, 1)
    g = torch.Generator().manual_seed(seed)
    values = torch.stack([_mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:m]],
                                         b[torch.randperm(len(b), generator=g)[:m]]) for _ in range(subsets)])
    return values.mean().item(), (values.std().item() if subsets > 1 else 0.0)


# --- Precision and recall --------------------------------------------------------------------------------

def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values            # the 0th nearest is the row itself, at distance 0


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019 [5]) of generated features against real ones.

    Each set's manifold is the union of balls around its points, each ball reaching the point's k-th nearest
    neighbour in the same set. Precision: the share of generated points inside the real manifold (realism; low
    for junk far from every real image). Recall: the share of real points inside the generated manifold
    (coverage; low for a model that repeats a few images). Both depend on n and k, so compare them at equal n,
    beside real against real.

    In the course's feature space (course_lib.feature_net) blurred or noisy images land in the dense middle of
    the real manifold: they keep about the precision of real images and lose recall (tests/test_metrics.py
    measures it: 4x blur keeps precision within 0.15 of clean images' and cuts recall by more than 4x). So here
    low recall flags both a repetitive model and a soft one; precision flags images unlike any emoji."""
    real, fake = _check_feats(real_feats, "real_feats"), _check_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must have the same dimension; got {real.shape[1]} and {fake.shape[1]}")
    k = check_int("k", k, 1, min(len(real), len(fake)) - 1, hint=" (min(N_real, N_fake) - 1)")
    cross = torch.cdist(fake, real)                                               # (N_fake, N_real)
    precision = (cross <= _knn_radii(real, k)[None, :]).any(dim=1).double().mean().item()
    recall = (cross <= _knn_radii(fake, k)[:, None]).any(dim=0).double().mean().item()
    return precision, recall


# --- Quality against the emoji, with the real-versus-real floor ---------------------------------------

PR_K = 3   # the k of precision and recall in Quality (Kynkaenniemi et al.'s default)


@dataclass
class Quality:
    """FID, KID, precision and recall (k = PR_K) of n images against a reference set, optionally with the floor
    (real images against the same reference, at the same n)."""
    fid: float
    kid_mean: float
    kid_std: float
    n: int
    reference: str = ""
    floor: Quality | None = field(default=None, repr=False)
    precision: float = float("nan")
    recall: float = float("nan")

    def __str__(self) -> str:
        ref = f" against {self.reference}" if self.reference else ""
        text = (f"FID {self.fid:.2f}, KID {self.kid_mean:.4f} ± {self.kid_std:.4f}, precision {self.precision:.2f}, "
                f"recall {self.recall:.2f} (n={self.n}{ref})")
        if self.floor is not None:
            f = self.floor
            text += (f"; real-vs-real floor at n={f.n}: FID {f.fid:.2f}, KID {f.kid_mean:.4f}, precision "
                     f"{f.precision:.2f}, recall {f.recall:.2f}")
        return text


_REF_FEATS: dict[tuple[str, int, str], torch.Tensor] = {}


def _cache_file(split: str, size: int, device: torch.device | str | None) -> Path | None:
    """The cache file for one split's features, named by everything they depend on: the feature network's and the
    emoji files' contents (SHA-256), the split, the size and the device type. Only the shipped network's are kept."""
    folder, net = cache_dir(), Path(feature_net.FEATURE_NET_PATH)
    if folder is None or net != checkpoints_dir() / "feature_net.safetensors" or not net.is_file():
        return None
    h = hashlib.sha256()
    for f in (net, data_dir() / "emoji" / "metadata.json", data_dir() / "emoji" / "noto_64.png"):
        h.update(f.read_bytes())
    kind = torch.device(device).type if device is not None else default_device().type
    return folder / f"features_{split}_{size}px_{kind}_{h.hexdigest()[:20]}.safetensors"


def emoji_features(split: str, size: int = 32, device: torch.device | str | None = None) -> torch.Tensor:
    """Features of the Noto emoji of one split loaded at `size` px: cached per process and on disk (`cache_dir`;
    the file is checksummed, and one that fails its check, or cannot be written, is computed again)."""
    check_choice("split", split, REFERENCES)
    key = (split, size, str(feature_net.FEATURE_NET_PATH), str(device))   # the network's file as now set
    if key not in _REF_FEATS:
        path, feats = _cache_file(split, size, device), None
        if path is not None and path.is_file():
            try:
                feats = read(path)[0]["features"]
            except (OSError, ValueError, KeyError):                 # damaged (CorruptCheckpoint is a ValueError)
                pass
        if feats is None:
            feats = features(load_emoji(size=size, split=split).images, device=device)
            if path is not None:
                try:
                    atomic_save({"features": feats}, path, {"split": split, "size": str(size)})
                except OSError:
                    pass                                            # a read-only home: memory only
        _REF_FEATS[key] = feats
    return _REF_FEATS[key]


def _compare(feats: torch.Tensor, ref: torch.Tensor, reference: str, seed: int, kid_subsets: int) -> Quality:
    k_mean, k_std = kid(feats, ref, subsets=kid_subsets, seed=seed)
    precision, recall = (precision_recall(ref, feats, PR_K) if min(len(feats), len(ref)) > PR_K
                         else (float("nan"), float("nan")))
    return Quality(fid(feats, ref), k_mean, k_std, len(feats), reference, precision=precision, recall=recall)


def floor_indices(n: int | None = None, size: int = 32, seed: int = 0, reference: str = "heldout",
                  device: torch.device | str | None = None, match: list[str] | None = None) -> torch.Tensor:
    """The rows of the *other* split (training images for reference "heldout") that `floor` compares with the
    reference, for the same arguments: what a script needs to send those very images through something else (a VAE,
    for the ceiling of a latent model)."""
    check_choice("reference", reference, REFERENCES)
    ref = emoji_features(reference, size, device)
    pool = emoji_features("train" if reference == "heldout" else "heldout", size, device)
    n = (min(len(ref), len(pool)) if n is None else n) if match is None else len(match)  # 398 either way
    other = "training" if reference == "heldout" else "held-out"
    n = check_int("n", n, 2, len(pool), hint=f" (the {other} images available for the floor against {reference})")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=g)[:n]
    if match is not None:
        subs = load_emoji(size=size, split="train" if reference == "heldout" else "heldout").subcategories
        rows = [[i for i, s in enumerate(subs) if s == want] or list(range(len(subs))) for want in match]
        pick = torch.tensor([r[int(torch.randint(len(r), (), generator=g))] for r in rows])
    return pick


def floor(n: int | None = None, size: int = 32, seed: int = 0, reference: str = "heldout",
          kid_subsets: int = 100, device: torch.device | str | None = None,
          match: list[str] | None = None) -> Quality:
    """The real-versus-real floor: n real images of the *other* split against the reference split.

    reference "heldout": n random training images against all 398 held-out images (what a model
        that reproduced its training set perfectly would score); n from 2 to 3,388, default 398.
    reference "train": n random held-out images against all training images (what a perfect model
        of the emoji that copies nothing would score); n from 2 to 398.
    match: one subcategory per sample (a text-to-image model's captions; n = len(match)): each real image is drawn
        from that subcategory (the whole pool where it has none), the fair floor for samples whose mix follows it.
    The images drawn are `floor_indices(...)` of the other split.
    FID is biased upward at small n [3], so compare a model's figure with the floor at its n."""
    pick = floor_indices(n, size, seed, reference, device, match)
    pool = emoji_features("train" if reference == "heldout" else "heldout", size, device)
    return _compare(pool[pick], emoji_features(reference, size, device), reference, seed, kid_subsets)


def evaluate(samples: torch.Tensor, reference: str = "heldout", size: int | None = None, seed: int = 0,
             with_floor: bool = True, kid_subsets: int = 100, device: torch.device | str | None = None,
             match: list[str] | None = None) -> Quality:
    """FID and KID of samples (N, 3, H, W) in [-1, 1] against the emoji of `reference`, with the floor.

    The reference images are loaded at the samples' size (or `size`) and go through the same resize
    to 32 px, so a 16 px model is judged against 16 px emoji. The floor uses the same n as the samples (and,
    given `match`, their subcategories: see `floor`)."""
    check_choice("reference", reference, REFERENCES)
    check_images(samples, "samples", data_range=False)
    size = size or samples.shape[-1]
    quality = _compare(features(samples, device=device), emoji_features(reference, size, device),
                       reference, seed, kid_subsets)
    if with_floor:
        quality.floor = floor(len(samples), size, seed, reference, kid_subsets, device, match)
    return quality


# --- Memorisation --------------------------------------------------------------------------------------

def _vectors(images: torch.Tensor, space: str, size: tuple[int, int], device) -> torch.Tensor:
    """float64 rows whose Euclidean distances are RMS distances in the chosen space."""
    if space == "features":
        v = features(images, device=device)
    else:
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images.float(), size=size, mode="area")
        v = images.detach().float().cpu().clamp(-1, 1).flatten(1)
    return v.double() / v.shape[1] ** 0.5


def nearest_neighbours(samples: torch.Tensor, train_images: torch.Tensor, space: str = "pixel", k: int = 1,
                       train_features: torch.Tensor | None = None, batch_size: int = 256,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the RMS distance to its nearest training image(s) and their indices.

    space "pixel": RMS difference per pixel and channel in [-1, 1] units, at the samples' size
    (training images are area-resized to it); "features": RMS difference of FeatureNet features.
    train_features: the training images' features, if already computed (e.g. `emoji_features("train")`),
    to save recomputing them on every call in feature space.
    Returns shapes (N,) for k = 1, else (N, k), nearest first. Distances come from |a|^2 + |b|^2 - 2 a.b in
    float64, so an exact copy is at distance 0 (to ~1e-7)."""
    check_choice("space", space, SPACES)
    check_images(samples, "samples", data_range=False)
    check_images(train_images, "train_images", data_range=False)
    k = check_int("k", k, 1, len(train_images), hint=" (the number of training images)")
    s = _vectors(samples, space, tuple(samples.shape[-2:]), device)
    if space == "features" and train_features is not None:
        if train_features.shape != (len(train_images), s.shape[1]):
            raise ValueError(f"train_features must have shape {(len(train_images), s.shape[1])} (one feature "
                             f"vector per training image); got {tuple(train_features.shape)}")
        r = train_features.detach().cpu().double() / s.shape[1] ** 0.5
    else:
        r = _vectors(train_images, space, tuple(samples.shape[-2:]), device)
    r_sq = r.square().sum(1)
    dists, idx = [], []
    for chunk in s.split(batch_size):
        d2 = chunk.square().sum(1, keepdim=True) + r_sq - 2 * chunk @ r.T   # (b, N_train)
        d, i = d2.clamp(min=0).topk(k, dim=1, largest=False)
        dists.append(d.sqrt().float())
        idx.append(i)
    dists, idx = torch.cat(dists), torch.cat(idx)
    return (dists[:, 0], idx[:, 0]) if k == 1 else (dists, idx)


@dataclass
class MemorisationReport:
    """Each sample's nearest training image, and which samples lie closer than the threshold."""
    distances: torch.Tensor    # (N,) RMS distance of each sample to its nearest training image
    indices: torch.Tensor      # (N,) index of that training image
    threshold: float
    space: str

    @property
    def flagged(self) -> torch.Tensor:
        """(N,) bool: the samples that look like copies of a training image."""
        return self.distances < self.threshold

    @property
    def share(self) -> float:
        return self.flagged.float().mean().item() if len(self.distances) else 0.0

    def closest(self, k: int = 8) -> torch.Tensor:
        """Indices of the k samples nearest to a training image, nearest first (for a side-by-side plot)."""
        return self.distances.argsort()[:k]

    def __str__(self) -> str:
        n, c = len(self.distances), int(self.flagged.sum())
        return (f"{c} of {n} samples ({100 * self.share:.1f}%) lie within RMS distance {self.threshold:g} of a "
                f"training image ({self.space} space); median nearest distance {self.distances.median():.3f}")


def memorisation(samples: torch.Tensor, train_images: torch.Tensor, threshold: float | None = None,
                 space: str = "pixel", train_features: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> MemorisationReport:
    """Flag samples whose nearest training image is closer than `threshold` (RMS distance).

    The default threshold of each space is half the 1st percentile of the distances from held-out images (new emoji,
    unseen by construction, so not memorised) to their nearest training image, measured by
    scripts/train_feature_net.py and stored with the feature network (values on checkpoints/feature_net.md). It
    flags copies and near-copies and almost never a new emoji (it leaves out held-out images that are the same
    picture as a training image: a few emoji are drawn identically, and those are rightly flagged). `train_features`
    as in `nearest_neighbours`. Pixel space is the main check; feature space flags only (near-)exact copies, since
    different emoji of one subcategory can sit close together there."""
    check_choice("space", space, SPACES)
    if threshold is None:
        thresholds = load_feature_net(device).memorisation_thresholds
        if space not in thresholds:
            raise ValueError(f"the feature network checkpoint holds no default threshold for {space!r}; pass "
                             f"threshold=..., or rebuild the checkpoint with `{REBUILD_COMMAND}`")
        threshold = thresholds[space]
    distances, indices = nearest_neighbours(samples, train_images, space, train_features=train_features,
                                            device=device)
    return MemorisationReport(distances, indices, float(threshold), space)


def subject_similarity(generated: torch.Tensor, references: torch.Tensor,
                       device: torch.device | str | None = None) -> float:
    """Subject fidelity: the mean cosine similarity, in the feature net's space, between every generated image and
    every reference image of the subject (DreamBooth's DINO score, with our feature net in place of DINO). 1 = the
    same features; unrelated emoji score lower (see notebook 12 for the scale)."""
    a = F.normalize(features(generated, device=device), dim=-1)
    b = F.normalize(features(references, device=device), dim=-1)
    return float((a @ b.T).mean())


def self_similarity(images: torch.Tensor, device: torch.device | str | None = None) -> float:
    """The same score among a set of real images of one subject, over distinct pairs only (the diagonal,
    each image with itself, would count 1s): the reference a generated set's subject fidelity compares with."""
    if len(images) < 2:
        raise ValueError(f"self_similarity needs at least 2 images; got {len(images)}")
    f = F.normalize(features(images, device=device), dim=-1)
    sims, n = f @ f.T, len(f)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
