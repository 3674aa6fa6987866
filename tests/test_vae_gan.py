"""The VAE's perceptual and adversarial training (course_lib.vae_gan) and the sharpness measure it is judged by."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from course_lib import metrics
from course_lib.feature_net import FeatureNet
from course_lib.vae import VAE, vae_loss, vae_preset
from course_lib.vae_gan import (PatchDiscriminator, VAEGANFit, adaptive_weight, fit_vae_gan, hinge_d_loss,
                                perceptual_distance)


def images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    return F.avg_pool2d(x, 3, 1, 1).clamp(-1, 1)     # some structure, not pure noise


def blur(x):
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FeatureNet().eval().requires_grad_(False)


def test_perceptual_distance_is_zero_for_equal_images_and_grows_with_blur(net):
    x = images()
    assert perceptual_distance(x, x, net).abs().max() < 1e-6
    once, twice = perceptual_distance(blur(x), x, net), perceptual_distance(blur(blur(x)), x, net)
    assert (once > 0).all() and (twice > once).all()
    y = blur(x).requires_grad_(True)
    perceptual_distance(y, x, net).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="one shape"):
        perceptual_distance(x, x[:2], net)


def test_hinge_loss_is_zero_past_the_margins_and_the_discriminator_scores_patches():
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == pytest.approx(1.0)
    assert PatchDiscriminator()(images(2)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="downsamplings"):
        PatchDiscriminator(downsamplings=0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.randn(5, requires_grad=True)
    a, b = (3 * w).sum(), (0.5 * w).sum()
    assert adaptive_weight(a, b, w).item() == pytest.approx(6.0, rel=1e-3)
    assert not adaptive_weight(a, b, w).requires_grad


def test_one_backward_gives_each_network_the_gradient_of_its_own_loss(net):
    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny"))
    x = images(4)
    run = VAEGANFit(vae, x, steps=1, batch_size=4, lr=1e-3, d_lr=1e-3, kl_weight=1e-4, perceptual_weight=1.0,
                    adversarial_weight=0.5, adversarial_start=0, disc_channels=16, device=torch.device("cpu"),
                    precision="fp32", seed=0, net=net)
    state = run.generator.get_state()
    total, logs = run.loss()
    total.backward()
    got_vae = [p.grad.clone() for p in vae.parameters()]
    got_d = [p.grad.clone() for p in run.disc.parameters()]
    # the same batch and posterior noise again, each loss on its own
    for p in list(vae.parameters()) + list(run.disc.parameters()):
        p.grad = None
    run.generator.set_state(state)
    run.batches.order, run.batches.position = torch.empty(0, dtype=torch.long), 0
    batch = x[run.batches.next()]
    recon, post = vae(batch, generator=run.generator)
    base, _ = vae_loss(recon, batch, post, 1e-4)
    perc = perceptual_distance(recon, batch, net).mean()
    g = -run.disc(recon).mean()
    lam = adaptive_weight(F.mse_loss(recon, batch) + perc, g, vae.decoder.conv_out.weight)
    want_vae = torch.autograd.grad(base + perc + lam * 0.5 * g, list(vae.parameters()), retain_graph=True)
    want_d = torch.autograd.grad(hinge_d_loss(run.disc(batch), run.disc(recon.detach())), list(run.disc.parameters()))
    for a, b in zip(got_vae, want_vae):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(got_d, want_d):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert logs["lambda"] > 0 and logs["perceptual"] > 0


def test_fit_vae_gan_trains_resumes_exactly_and_refuses_bad_settings(tmp_path):
    x = images(16)

    def run(steps, path):
        torch.manual_seed(1)
        vae = VAE(vae_preset("tiny"))
        report = fit_vae_gan(vae, x, perceptual_net=FeatureNet().eval(), steps=steps, batch_size=8, lr=1e-3,
                             disc_channels=16, progress=False,
                             checkpoint_path=path, checkpoint_every=2, adversarial_start=1)
        return vae, report

    whole, report = run(4, tmp_path / "a.safetensors")
    assert report["steps"] == 4 and report["lambda"][0] == 0 and report["lambda"][-1] > 0
    run(2, tmp_path / "b.safetensors")
    resumed, _ = run(4, tmp_path / "b.safetensors")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    vae = VAE(vae_preset("tiny"))
    with pytest.raises(ValueError, match="perceptual_weight must be >= 0"):
        fit_vae_gan(vae, x, perceptual_net=FeatureNet(), steps=1, perceptual_weight=-1)
    with pytest.raises(ValueError, match="adversarial_start must be an int >= 0"):
        fit_vae_gan(vae, x, perceptual_net=FeatureNet(), steps=1, adversarial_start=1.5)
    with pytest.raises(ValueError, match="images must have shape"):
        fit_vae_gan(vae, x[:, :, :16], perceptual_net=FeatureNet(), steps=1)
    with pytest.raises(ValueError, match="unknown precision"):
        fit_vae_gan(vae, x, perceptual_net=FeatureNet(), steps=1, precision="fp8")


def test_high_frequency_share_falls_with_blur_and_ignores_the_set_order():
    x = images(8)
    sharp, soft = metrics.high_frequency_share(x), metrics.high_frequency_share(blur(x))
    assert 0 < soft < sharp < 1
    assert metrics.high_frequency_share(x.flip(0)) == pytest.approx(sharp)
    flat = torch.zeros(2, 3, 32, 32)
    assert metrics.high_frequency_share(flat) == 0
    # a checkerboard holds all its power (but the mean's) at Nyquist
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1.0
    assert metrics.high_frequency_share(board.expand(1, 3, 32, 32)) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="cutoff"):
        metrics.high_frequency_share(x, cutoff=0.9)
