"""course_lib.metrics: FID and KID against first principles and closed forms, the shipped feature
space's behaviour on real emoji, the floor, and the memorisation check; metrics only measures (it imports
no personalisation method: notebook 12's benchmark is course_lib.benchmark); the shipped feature network
(course_lib.feature_net); PSNR."""

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from course_lib import feature_net, metrics, settings
from course_lib.data import load_emoji
from course_lib.metrics import Quality, fid, frechet_distance, kid, memorisation, nearest_neighbours, psnr


@pytest.fixture(scope="module")
def emoji():
    """32 px emoji and their features (one pass of ~3,800 images through FeatureNet)."""
    torch.manual_seed(0)
    train, held = load_emoji(32, "train"), load_emoji(32, "heldout")
    return dict(train=train.images, held=held.images,
                f_train=metrics.emoji_features("train"), f_held=metrics.emoji_features("heldout"))


def gaussian_set(n: int, mean: torch.Tensor, var: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """n points whose sample mean and (unbiased) sample covariance are exactly mean and diag(var)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten: sample cov = I
    return mean + z * var.sqrt()


# --- FID ---------------------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero(emoji):
    f = emoji["f_train"]
    assert fid(f, f) < 1e-6 * torch.cov(f.double().T).trace().item()


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(1)
    mu_a, mu_b = torch.randn(2, 16, generator=g, dtype=torch.float64)
    var_a, var_b = torch.rand(2, 16, generator=g, dtype=torch.float64) + 0.1
    closed = ((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    assert frechet_distance(mu_a, var_a.diag(), mu_b, var_b.diag()) == pytest.approx(closed.item(), rel=1e-10)
    # fid() on point sets with exactly those means and covariances gives the same number
    a, b = gaussian_set(200, mu_a, var_a, seed=2), gaussian_set(300, mu_b, var_b, seed=3)
    assert fid(a, b) == pytest.approx(closed.item(), rel=1e-9)


def test_frechet_distance_for_general_covariances():
    """tr sqrt(S_a S_b) through eigh equals the sum of square roots of the eigenvalues of S_a S_b."""
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(2, 12, 12, generator=g, dtype=torch.float64)
    S_a, S_b = A @ A.T, B @ B.T + 0.1 * torch.eye(12, dtype=torch.float64)
    mu = torch.zeros(12, dtype=torch.float64)
    tr_sqrt = torch.linalg.eigvals(S_a @ S_b).real.clamp(min=0).sqrt().sum()
    expected = (S_a.trace() + S_b.trace() - 2 * tr_sqrt).item()
    assert frechet_distance(mu, S_a, mu, S_b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu, S_a, mu, S_b) == pytest.approx(frechet_distance(mu, S_b, mu, S_a), rel=1e-8)


def test_fid_grows_with_noise(emoji):
    """In the shipped feature space, more Gaussian noise on real images means a larger FID."""
    g = torch.Generator().manual_seed(0)
    x = emoji["train"][torch.randperm(len(emoji["train"]), generator=g)[:398]]
    scores = [fid(metrics.features((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)), emoji["f_held"])
              for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_fid_checks_its_inputs():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid(torch.zeros(10), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="same dimension"):
        fid(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        fid(torch.full((10, 3), float("nan")), torch.randn(10, 3))


# --- KID ---------------------------------------------------------------------------------------------

def test_kid_estimator_matches_its_definition():
    """Unbiased MMD^2 written as explicit sums over pairs, on one subset (the whole sets)."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64) + 0.3
    k = lambda u, v: (u @ v / 4 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = kid(x, y, subsets=1, subset_size=m)
    assert mean == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-10) and std == 0.0


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 1000, 32, generator=g)
    same_mean, same_std = kid(a, b, subsets=50)
    assert abs(same_mean) < 2 * same_std
    diff_mean, diff_std = kid(a, b * 1.3 + 0.2, subsets=50)
    assert diff_mean > 5 * diff_std > 0


def test_kid_checks_subset_size():
    with pytest.raises(ValueError, match="subset_size"):
        kid(torch.randn(10, 3), torch.randn(20, 3), subset_size=11)


# --- Floor and evaluate --------------------------------------------------------------------------------

def test_floor_is_finite_and_below_noised_images(emoji):
    base = metrics.floor(398)
    assert math.isfinite(base.fid) and base.fid > 0 and base.n == 398 and base.reference == "heldout"
    g = torch.Generator().manual_seed(7)
    x = emoji["train"][:398]
    noised = metrics.features((x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    assert base.fid < fid(noised, emoji["f_held"])
    assert base.kid_mean < kid(noised, emoji["f_held"])[0]


def test_floor_n_is_checked():
    with pytest.raises(ValueError, match="from 2 to 398"):
        metrics.floor(500, reference="train")
    with pytest.raises(ValueError, match="choose from"):
        metrics.floor(100, reference="test")


def test_caption_matched_floor_draws_each_subcategory_and_is_lower(monkeypatch):
    """Matched to the held-out images' own subcategories, the floor is what a text-to-image model conditioned on
    their captions could reach; it sits below the unmatched floor, and every draw has the subcategory asked for."""
    held, train = load_emoji(split="heldout"), load_emoji(split="train")
    drawn = []
    real_compare = metrics._compare
    monkeypatch.setattr(metrics, "_compare", lambda feats, *a: (drawn.append(feats), real_compare(feats, *a))[1])
    matched = metrics.floor(match=held.subcategories)
    f_train = metrics.emoji_features("train")
    rows = [int((f_train == f).all(1).nonzero()[0]) for f in drawn[0]]
    assert [train.subcategories[r] for r in rows] == held.subcategories
    assert matched.n == 398 and matched.fid < metrics.floor(398).fid
    with pytest.raises(ValueError, match="from 2 to"):
        metrics.floor(match=["face-smiling"])


def test_evaluate_reports_the_floor_at_the_same_n(emoji):
    quality = metrics.evaluate(emoji["train"][:100])
    assert quality.n == 100 and quality.floor.n == 100 and quality.reference == "heldout"
    text = str(quality)
    assert "FID" in text and "KID" in text and "n=100" in text and "floor" in text
    # precision and recall beside them, computed as their definition in the same feature space
    feats = metrics.features(emoji["train"][:100])
    p, r = metrics.precision_recall(emoji["f_held"], feats, k=metrics.PR_K)
    assert (quality.precision, quality.recall) == (p, r) and 0 < p <= 1 and 0 < r <= 1
    assert "precision" in text and "recall" in text


def test_precision_and_recall_in_the_feature_space_react_to_blur_and_repetition(emoji):
    """In FeatureNet's space degraded images fall where the real manifold is dense (its middle), so they keep
    about the real images' precision and lose recall; a set repeating 10 images has recall near 0. The
    metrics.precision_recall docstring states this."""
    x = emoji["train"][torch.randperm(len(emoji["train"]), generator=torch.Generator().manual_seed(1))[:398]]
    clean = metrics.evaluate(x, with_floor=False)
    soft = metrics.evaluate(F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear"), with_floor=False)
    repeated = metrics.evaluate(x[:10].repeat(40, 1, 1, 1)[:398], with_floor=False)
    assert clean.recall > 0.7 and soft.recall < 0.25 * clean.recall and repeated.recall < 0.05
    assert abs(soft.precision - clean.precision) < 0.15            # blur does not show in precision here
    assert soft.fid > 5 * clean.fid
    assert str(Quality(1.0, 0.01, 0.001, 10, precision=0.5, recall=0.25)) == (
        "FID 1.00, KID 0.0100 ± 0.0010, precision 0.50, recall 0.25 (n=10)")


def test_features_resize_any_size_like_the_data_loader(emoji):
    f64 = metrics.features(load_emoji(64, "heldout").images)
    assert f64.shape == emoji["f_held"].shape == (398, feature_net.load_feature_net("cpu").dim)
    assert torch.allclose(f64, emoji["f_held"], atol=1e-4)
    assert metrics.features(emoji["held"][:4, :, :16, :20]).shape == (4, 128)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        metrics.features(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="batch axis"):
        metrics.features(torch.zeros(3, 32, 32))


# --- The shipped network ---------------------------------------------------------------------------------

def test_feature_net_is_frozen_and_classifies_held_out_emoji(emoji):
    net = feature_net.load_feature_net("cpu")
    assert not net.training and all(not p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    assert feature_net.load_feature_net("cpu") is net  # cached
    held = load_emoji(32, "heldout")
    labels = torch.tensor([net.classes.index(c) for c in held.subcategories])
    with torch.no_grad():
        accuracy = (net(held.images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.55  # 62.8% when trained (checkpoints/feature_net.md)


def test_missing_checkpoint_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(feature_net, "FEATURE_NET_PATH", tmp_path / "feature_net.safetensors")
    with pytest.raises(FileNotFoundError, match="python scripts/train_feature_net.py"):
        feature_net.load_feature_net("cpu")
    with pytest.raises(FileNotFoundError, match="python scripts/train_feature_net.py"):
        metrics.emoji_features("heldout")   # metrics' feature cache is keyed on the path as now set: not reused


def test_a_damaged_feature_net_file_is_named(monkeypatch, tmp_path):
    path = tmp_path / "feature_net.safetensors"
    path.write_bytes(feature_net.FEATURE_NET_PATH.read_bytes()[:1000])      # truncated
    monkeypatch.setattr(feature_net, "FEATURE_NET_PATH", path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a readable safetensors file .* truncated"):
        feature_net.load_feature_net("cpu")


def test_metrics_imports_no_personalisation_method():
    code = ("import sys, course_lib.metrics; print(sorted(m for m in sys.modules if m.startswith('course_lib.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for method in ("lora", "dreambooth", "hyperdreambooth", "benchmark", "pipeline", "text", "clip", "sd"):
        assert f"'course_lib.{method}'" not in loaded, f"course_lib.metrics imports course_lib.{method}: {loaded}"
    assert not hasattr(metrics, "compare_personalisation") and not hasattr(metrics, "PERSONALISATION_METHODS")


# --- Memorisation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", metrics.SPACES)
def test_memorisation_flags_copies_not_held_out_emoji(emoji, space):
    train = emoji["train"]
    copies = train[[0, 10, 200, 3000]]
    cached = emoji["f_train"] if space == "features" else None
    report = memorisation(copies, train, space=space, train_features=cached)
    assert report.flagged.all() and report.share == 1.0
    assert (report.distances < 1e-5).all()
    assert torch.allclose(train[report.indices], copies)  # the neighbour is the image (or an identical twin)
    held = memorisation(emoji["held"], train, space=space, train_features=cached)
    # Measured: pixel space flags 1.0% (4 of 398), exactly the held-out emoji that Noto draws like a
    # training emoji (e.g. the flags of the United States and of the U.S. Outlying Islands); feature
    # space 1.3% (those 4 and "smiling face with horns" ~ "imp"). See checkpoints/feature_net.md.
    assert held.share <= 0.025, str(held)
    if space == "pixel":
        assert (held.distances[held.flagged] < 1e-4).all()  # only the exact twins
    assert "of 398 samples" in str(held)


def test_nearest_neighbours_k_and_resize(emoji):
    train = emoji["train"][:500]
    d, i = nearest_neighbours(train[:5], train, k=3)
    assert d.shape == i.shape == (5, 3) and (d[:, 0] < 1e-6).all() and (d[:, :-1] <= d[:, 1:]).all()
    small = torch.nn.functional.interpolate(train[:5], size=16, mode="area")
    d16, i16 = nearest_neighbours(small, train)  # training images are resized to the samples' size
    assert (d16 < 1e-5).all() and d16.shape == (5,)
    with pytest.raises(ValueError, match="choose from"):
        nearest_neighbours(small, train, space="latent")
    with pytest.raises(ValueError, match="one feature vector per training image"):
        nearest_neighbours(small, train, space="features", train_features=emoji["f_train"])
    # precomputed training features give the same answer as computing them
    d_f, i_f = nearest_neighbours(emoji["held"][:8], train, space="features")
    d_c, i_c = nearest_neighbours(emoji["held"][:8], train, space="features", train_features=emoji["f_train"][:500])
    assert torch.equal(i_f, i_c) and torch.allclose(d_f, d_c, atol=1e-5)


def test_subject_similarity_and_self_similarity():
    from course_lib.data import load_emoji
    from course_lib.metrics import self_similarity, subject_similarity
    emoji = load_emoji(size=32, split="heldout", limit=12)
    a, b = emoji.images[:6], emoji.images[6:12]
    assert subject_similarity(a, a) > subject_similarity(a, b)
    # self_similarity leaves out each image's 1 with itself
    n = len(a)
    assert self_similarity(a) == pytest.approx((subject_similarity(a, a) * n * n - n) / (n * (n - 1)), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        self_similarity(a[:1])


# --- PSNR ---------------------------------------------------------------------------------------------

def test_psnr_known_values():
    a = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.isinf(psnr(a, a)).all()
    b = a + torch.tensor([0.1, 0.2, 0.02]).view(3, 1, 1, 1)               # MSE 0.01, 0.04, 0.0004
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04), 10 * math.log10(4 / 0.0004)])
    torch.testing.assert_close(psnr(b, a), expected, rtol=1e-4, atol=1e-3)
    assert psnr(b, a)[1].item() == pytest.approx(20.0, abs=1e-3)


# --- Colour ---------------------------------------------------------------------------------------------

def test_colour_known_values():
    from course_lib.metrics import colour
    grey = torch.zeros(2, 3, 4, 4)                              # mid-grey: no chroma, nothing at an end
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)   # a pure primary: chroma 1
    c_grey, c_red = colour(grey), colour(red)
    assert (c_grey.chroma, c_grey.at_ends, c_grey.n) == (0.0, 0.0, 2)
    assert c_red.chroma == pytest.approx(1.0) and c_red.at_ends == pytest.approx(1.0)
    half = torch.cat([grey[:1], red[:1]])                         # one of each: the means of the two
    assert colour(half).chroma == pytest.approx(0.5) and colour(half).at_ends == pytest.approx(0.5)
    # orange (R=1, G=0.5, B=0 in [0, 1]): chroma 1, two of three values at an end
    orange = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert colour(orange).chroma == pytest.approx(1.0) and colour(orange).at_ends == pytest.approx(2 / 3)
    # values beyond the range are clipped first, as saving would; tol decides what counts as an end
    assert colour(red * 5).chroma == pytest.approx(1.0)
    near = torch.full((1, 3, 2, 2), 0.99)
    assert colour(near).at_ends == 1.0 and colour(near, tol=0.005).at_ends == 0.0


def test_colour_tells_real_emoji_from_saturated_and_washed_images():
    from course_lib.metrics import colour
    real = load_emoji(size=16, split="heldout").images
    c = colour(real)
    assert 0.1 < c.chroma < 0.3 and 0.3 < c.at_ends < 0.7          # white backgrounds: many values at an end
    saturated = (real * 4).clamp(-1, 1)                             # over-driven colours
    washed = real * 0.5                                             # greyed towards the middle
    assert colour(saturated).chroma > 1.3 * c.chroma and colour(washed).at_ends < 0.05
    assert "chroma" in str(c) and "n=398" in str(c)


def test_colour_rejects_bad_input():
    from course_lib.metrics import colour
    with pytest.raises(ValueError, match="RGB images"):
        colour(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"tol must be in \[0, 1\)"):
        colour(torch.zeros(1, 3, 8, 8), tol=1.5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        colour(torch.full((1, 3, 2, 2), float("nan")))


# --- precision and recall (Kynkaenniemi et al. 2019) ---------------------------------------------------------

def _pr_by_definition(real, fake, k):
    """The definition written out with loops: a point is inside a set's manifold when it lies within some
    member's distance to that member's k-th nearest other member."""
    def radii(x):
        return [sorted(torch.dist(x[i], x[j]).item() for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]
    r_real, r_fake = radii(real), radii(fake)
    inside = lambda p, pts, rad: any(torch.dist(p, q).item() <= r for q, r in zip(pts, rad))  # noqa: E731
    precision = sum(inside(f, real, r_real) for f in fake) / len(fake)
    recall = sum(inside(r, fake, r_fake) for r in real) / len(real)
    return precision, recall


def test_precision_recall_match_their_definition_on_toy_data():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = 0.6 * torch.randn(30, 3, generator=g, dtype=torch.float64) + torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64)
    for k in (1, 3, 5):
        got = metrics.precision_recall(real, fake, k=k)
        want = _pr_by_definition(real, fake, k)
        assert got == pytest.approx(want, abs=1e-12)


def test_precision_recall_tell_junk_from_mode_collapse():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 8, generator=g)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)             # the same set
    far = torch.randn(200, 8, generator=g) + 50.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)                       # nowhere near
    collapsed = real[:3].repeat(60, 1) + 1e-3 * torch.randn(180, 8, generator=g)   # three images, repeated
    p, r = metrics.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1                                                    # realistic, no coverage
    fresh = torch.randn(200, 8, generator=g)                                       # the same distribution
    p, r = metrics.precision_recall(real, fresh)
    assert p > 0.6 and r > 0.6


def test_precision_recall_refuse_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be an int from 1 to"):
        metrics.precision_recall(x, x, k=10)
    with pytest.raises(ValueError, match="same dimension"):
        metrics.precision_recall(x, torch.randn(10, 5))
    with pytest.raises(ValueError, match=r"\(N, D\) tensor"):
        metrics.precision_recall(x, torch.randn(10))


def test_reference_features_are_cached_on_disk_checked_and_recomputed_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "_REF_FEATS", {})
    fresh = metrics.features(load_emoji(size=32, split="heldout").images)
    first = metrics.emoji_features("heldout")
    (path,) = tmp_path.iterdir()                                  # named by the network's and the data's contents
    assert path.name.startswith("features_heldout_32px_cpu_") and torch.equal(first, fresh)
    monkeypatch.setattr(metrics, "_REF_FEATS", {})                # a new process: read from the file
    assert torch.equal(metrics.emoji_features("heldout"), fresh)
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8                                       # damaged: fails its checksum, computed again
    path.write_bytes(bytes(data))
    monkeypatch.setattr(metrics, "_REF_FEATS", {})
    assert torch.equal(metrics.emoji_features("heldout"), fresh)
    assert torch.equal(metrics.read(path)[0]["features"], fresh)  # and the file rewritten whole


def test_the_feature_cache_can_be_switched_off_and_skips_other_networks(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_REF_FEATS", {})
    monkeypatch.setenv("COURSE_CACHE", "off")
    assert metrics.cache_dir() is None and settings.cache_dir() is None and metrics._cache_file("heldout", 32, None) is None
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    copy = tmp_path / "net" / "feature_net.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(feature_net.FEATURE_NET_PATH.read_bytes())
    monkeypatch.setattr(feature_net, "FEATURE_NET_PATH", copy)    # a network other than the shipped file's path
    assert metrics._cache_file("heldout", 32, None) is None
