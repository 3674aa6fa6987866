"""The VAE: the KL term against torch.distributions (and its shape checks), reparameterised samples, shapes per
preset, clear errors, model files, training through the one loop (loss falls, exact resume after an interruption,
a different run refused naming what differs, NaN guard) and the latent scale factor. PSNR: tests/test_metrics.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from course_lib import checkpoint as ckpt
from course_lib.data import load_emoji
from course_lib.vae import (PRESETS, VAE, DiagonalGaussian, ResnetBlock, VAEConfig, VAEFit, decode_latents,
                            encode_latents, fit_vae, kl_divergence, latent_scale_factor, load_vae, save_vae,
                            vae_loss, vae_preset)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = vae_preset("tiny")


@pytest.fixture(scope="module")
def images():
    return load_emoji(size=32, limit=24).images


def tiny_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(TINY)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- The posterior and its KL term --------------------------------------------------------------------

def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = 2 * torch.randn(3, 4, 2, 5, generator=g)
    logvar = 3 * torch.randn(3, 4, 2, 5, generator=g)
    reference = torch.distributions.kl_divergence(Normal(mean, (0.5 * logvar).exp()),
                                                  Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    expected = reference.flatten(1).sum(1)
    assert kl_divergence(mean, logvar).shape == (3,)
    torch.testing.assert_close(kl_divergence(mean, logvar), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), expected, rtol=1e-5, atol=1e-4)
    # the prior itself has zero KL
    assert kl_divergence(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).abs().max() == 0


def test_kl_refuses_mismatched_or_unbatched_shapes():
    expected = r"same shape, \(B, C, H, W\) or \(B, D\)"
    with pytest.raises(ValueError, match=expected + r".*got mean \(2, 4, 3, 3\) and logvar \(2, 4, 3, 2\)"):
        kl_divergence(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 2))
    with pytest.raises(ValueError, match=expected + r".*got mean \(5,\) and logvar \(5,\)"):
        kl_divergence(torch.zeros(5), torch.zeros(5))       # 1-D: no batch axis (was an IndexError)
    with pytest.raises(ValueError, match=expected):
        kl_divergence(torch.zeros(2, 4), torch.zeros(1, 4))  # (was broadcast silently)
    with pytest.raises(ValueError, match=expected):
        DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(4, 3, 3))
    by_hand = 0.5 * (0.5 ** 2 + 4.0 - 1.0 - math.log(4.0))   # (B, D) = (1, 1): mu 0.5, sigma^2 4
    assert kl_divergence(torch.tensor([[0.5]]), torch.tensor([[math.log(4.0)]])).item() == pytest.approx(by_hand)


def test_posterior_clamps_logvar():
    post = DiagonalGaussian(torch.ones(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1))
    assert post.mean.flatten().tolist() == [1.0, 1.0]
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(post.var, post.logvar.exp())
    torch.testing.assert_close(post.std, (0.5 * post.logvar).exp())
    assert torch.equal(post.mode(), post.mean)


def test_reparameterised_samples_have_the_posterior_mean_and_variance():
    n = 20_000
    mean = torch.tensor([-1.5, 0.0, 0.7, 3.0]).view(1, 4, 1, 1).expand(n, 4, 1, 1)
    logvar = torch.tensor([-2.0, 0.0, 0.5, 1.2]).view(1, 4, 1, 1).expand(n, 4, 1, 1)
    post = DiagonalGaussian(mean, logvar)
    z = post.sample(torch.Generator().manual_seed(0))
    var = logvar[0].exp().flatten()
    # standard errors: of the mean sqrt(var / n); of the sample variance var * sqrt(2 / (n - 1))
    assert ((z.mean(0).flatten() - mean[0].flatten()).abs() < 4 * (var / n).sqrt()).all()
    assert ((z.var(0).flatten() - var).abs() < 4 * var * math.sqrt(2 / (n - 1))).all()
    # the same generator seed gives the same z; gradients reach mean and logvar through z
    assert torch.equal(post.sample(torch.Generator().manual_seed(0)), z)
    m = torch.zeros(2, 4, 3, 3, requires_grad=True)
    lv = torch.zeros(2, 4, 3, 3, requires_grad=True)
    DiagonalGaussian(m, lv).sample(torch.Generator().manual_seed(1)).sum().backward()
    assert torch.equal(m.grad, torch.ones_like(m)) and lv.grad.abs().sum() > 0


# --- Configs, shapes and errors -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_encode_decode_shapes_per_preset(name):
    cfg = vae_preset(name)
    torch.manual_seed(0)
    vae = VAE(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, *cfg.latent_shape)
    assert cfg.latent_shape == (cfg.latent_channels, 32 // cfg.factor, 32 // cfg.factor)
    assert cfg.compression == 3 * 32 * 32 / math.prod(cfg.latent_shape)
    recon, post2 = vae(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    assert vae.decode(post.mode()).shape == x.shape


def test_preset_geometry():
    assert vae_preset("f4c4").latent_shape == (4, 8, 8) and vae_preset("f4c4").compression == 12
    assert vae_preset("f8c8").latent_shape == (8, 4, 4) and vae_preset("f8c8").compression == 24
    assert vae_preset("f2c4").latent_shape == (4, 16, 16) and vae_preset("f2c4").factor == 2
    assert VAEConfig().latent_shape == (4, 8, 8)
    assert VAEConfig.from_json(vae_preset("f8c8").to_json()) == vae_preset("f8c8")
    assert vae_preset("tiny", latent_channels=8).latent_channels == 8


def test_bad_shapes_and_configs_give_clear_errors():
    vae = VAE(vae_preset("tiny", channels=(16, 32, 32)))                      # factor 4
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(torch.zeros(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"choose from \['tiny', 'f2c4', 'f4c4', 'f8c8'\]"):
        vae_preset("huge")
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(channels=(12, 24))
    with pytest.raises(ValueError, match="multiple of 4"):
        VAEConfig(image_size=30)
    with pytest.raises(ValueError, match="latent_channels"):
        VAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match="channels"):
        VAEConfig(channels=())


def test_mid_attention_switch():
    with_attn, without = VAE(TINY), VAE(TINY.replace(mid_attention=False))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(with_attn) > n(without)
    assert without(torch.zeros(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)


def test_resnet_block_has_no_time_input():
    block = ResnetBlock(16, 32, norm_groups=8, eps=1e-6)
    assert block(torch.zeros(2, 16, 8, 8)).shape == (2, 32, 8, 8)
    assert block.norm1.eps == 1e-6 and not hasattr(block, "time_proj")


# --- Loss and PSNR ---------------------------------------------------------------------------------------

def test_vae_loss_is_mean_mse_plus_weighted_kl_per_latent_value():
    g = torch.Generator().manual_seed(0)
    x, recon = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    post = DiagonalGaussian(torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g))
    loss, parts = vae_loss(recon, x, post, kl_weight=0.1)
    kl = post.kl().mean().item() / 16
    assert parts["recon"] == pytest.approx(F.mse_loss(recon, x).item())
    assert parts["kl"] == pytest.approx(kl)
    assert loss.item() == pytest.approx(parts["recon"] + 0.1 * kl) == pytest.approx(parts["loss"])


# --- Latents for diffusion --------------------------------------------------------------------------------

def test_latent_scale_factor_makes_scaled_latents_unit_std(images):
    vae = tiny_vae()
    scale = latent_scale_factor(vae, images, batch_size=10, generator=torch.Generator().manual_seed(3))
    assert scale > 0 and abs(scale - 1) > 1e-3                         # an untrained VAE's latents are not unit std
    z = encode_latents(vae, images, scale, batch_size=10, sample=True, generator=torch.Generator().manual_seed(3))
    assert z.shape == (len(images), *TINY.latent_shape) and z.device.type == "cpu"
    assert z.std().item() == pytest.approx(1.0, abs=1e-5)
    mode = encode_latents(vae, images, scale, batch_size=7)            # the posterior mean, scaled
    torch.testing.assert_close(mode, vae.encode(images).mean.detach() * scale)
    out = decode_latents(vae, mode, scale, batch_size=7)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, vae.decode(vae.encode(images).mean).detach().clamp(-1, 1), rtol=1e-4, atol=1e-5)


# --- Model files ------------------------------------------------------------------------------------------

def test_save_load_round_trip(images, tmp_path):
    vae = tiny_vae()
    path = save_vae(tmp_path / "vae.safetensors", vae, 0.4321, info={"steps": 7})
    tensors, meta = ckpt.read(path)
    assert meta["format"] == "course_lib.vae/1" and all(v.dtype == torch.float16 for v in tensors.values())
    loaded, scale, info = load_vae(path)
    assert scale == 0.4321 and loaded.config == vae.config
    assert info == {"steps": 7, "steps_total": 7, "train_seconds_total": 0}     # with its chain's totals (one run)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    vae.half().float()                                                  # the same float16 rounding as the file
    x = images[:4]
    torch.testing.assert_close(loaded.decode(loaded.encode(x).mean), vae.decode(vae.encode(x).mean).detach())


def test_load_vae_rejects_other_files(tmp_path):
    ckpt.atomic_save({"w": torch.zeros(1)}, tmp_path / "other.safetensors", {"format": "course_lib.model/1"})
    with pytest.raises(ValueError, match="not a course_lib VAE file"):
        load_vae(tmp_path / "other.safetensors")


# --- Training ---------------------------------------------------------------------------------------------

def test_fit_lowers_the_loss_on_a_tiny_batch(images):
    vae = tiny_vae()
    calls = []
    history = fit_vae(vae, images[:8], steps=20, batch_size=8, lr=3e-3, progress=False,
                      callback=lambda h: calls.append(h["steps"]), callback_every=10)
    assert history["steps"] == 20 and len(history["loss"]) == len(history["recon"]) == len(history["kl"]) == 20
    assert sum(history["recon"][-5:]) / 5 < 0.5 * sum(history["recon"][:5]) / 5
    assert calls == [10, 20] and history["seconds"] > 0


def test_resume_equals_uninterrupted_run(images, tmp_path):
    data = images[:10]                                                  # 10 images, batches of 4: passes overlap steps
    kw = dict(batch_size=4, lr=1e-3, kl_weight=1e-2, seed=5, progress=False)
    straight = tiny_vae()
    full = fit_vae(straight, data, steps=6, **kw)

    path = tmp_path / "vae_train.safetensors"
    first = tiny_vae()
    fit_vae(first, data, steps=3, checkpoint_path=path, **kw)
    resumed = tiny_vae(seed=123)                                        # different start: the file must supply all
    history = fit_vae(resumed, data, steps=6, checkpoint_path=path, **kw)
    assert history["steps"] == 6
    assert history["loss"] == full["loss"] and history["kl"] == full["kl"]
    assert same_state(resumed, straight)
    with pytest.raises(ValueError, match="kl_weight"):
        fit_vae(tiny_vae(), data, steps=8, checkpoint_path=path, **(kw | {"kl_weight": 0.5}))


def test_training_errors(images):
    bad = images[:4].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0"):
        fit_vae(tiny_vae(), bad, steps=2, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; choose from \['fp32', 'bf16'\]"):
        fit_vae(tiny_vae(), images, steps=1, precision="fp16", progress=False)
    with pytest.raises(ValueError, match=r"\(N >= 1, 3, 32, 32\)"):
        fit_vae(tiny_vae(), images[:, :, :16, :16], steps=1, progress=False)
    # the loop's own checks (FitConfig, Batches) name the bad setting; a refused run leaves the mode as it was
    vae = tiny_vae().eval()
    for bad, match in [({"steps": -1}, r"steps must be an int >= 0; got -1"),
                       ({"lr": 0.0}, r"need lr > 0.*got lr=0.0"),
                       ({"batch_size": 0}, r"batch_size >= 1; got n=24, batch_size=0"),
                       ({"kl_weight": -1e-3}, r"kl_weight must be >= 0 .*got -0.001")]:
        with pytest.raises(ValueError, match=match):
            fit_vae(vae, images, **({"steps": 1, "progress": False} | bad))
        assert not vae.training


def test_interrupted_then_resumed_equals_uninterrupted(images, tmp_path):
    data = images[:10]
    kw = dict(steps=6, batch_size=4, lr=1e-3, kl_weight=1e-2, seed=2, progress=False)
    straight = tiny_vae()
    full = fit_vae(straight, data, **kw)

    def stop(history):
        if history["steps"] == 4:
            raise KeyboardInterrupt                           # the notebook's stop button after step 4
    path = tmp_path / "vae_run.safetensors"
    interrupted = tiny_vae().eval()
    with pytest.raises(KeyboardInterrupt):
        fit_vae(interrupted, data, checkpoint_path=path, checkpoint_every=2, callback=stop, callback_every=1, **kw)
    assert not interrupted.training                           # eval mode, interrupted or not
    resumed = tiny_vae(seed=9)
    assert resumed.training                                   # a fresh module is in train mode ...
    history = fit_vae(resumed, data, checkpoint_path=path, **kw)
    assert not resumed.training                               # ... and comes back ready to encode and decode
    assert history["loss"] == full["loss"] and history["recon"] == full["recon"] and history["steps"] == 6
    assert same_state(resumed, straight)


def test_a_resume_with_other_settings_or_data_is_refused_naming_what_differs(images, tmp_path):
    kw = dict(steps=2, batch_size=4, lr=1e-3, progress=False)
    path = tmp_path / "vae_run.safetensors"
    fit_vae(tiny_vae(), images[:8], checkpoint_path=path, **kw)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.001, now 0.002; seed: checkpoint"):
        fit_vae(tiny_vae(), images[:8], checkpoint_path=path, **(kw | {"lr": 2e-3, "steps": 4, "seed": 7}))
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 4, now 8"):
        fit_vae(tiny_vae(), images[:8], checkpoint_path=path, **(kw | {"batch_size": 8, "steps": 4}))
    with pytest.raises(ValueError, match=r"data: checkpoint '[0-9a-f]+', now '[0-9a-f]+'.*resume=False"):
        fit_vae(tiny_vae(), images[8:16], checkpoint_path=path, **(kw | {"steps": 4}))   # 8 other images
    assert fit_vae(tiny_vae(), images[8:16], checkpoint_path=path, resume=False, **kw)["steps"] == 2


def test_vae_fit_gives_the_loop_its_loss_and_keeps_no_clipping(images):
    run = VAEFit(tiny_vae(), images[:10], steps=3, batch_size=4, lr=1e-3, kl_weight=1e-2,
                 device=torch.device("cpu"), precision="fp32", seed=0)
    assert run.fit_config.grad_clip is None and run.fit_config.decay == "constant" and run.fit_config.warmup == 0
    assert not run.batches.drop_remainder and run.batches.generator is run.generator
    assert set(run.run_info()) >= {"config", "lr", "batch_size", "kl_weight", "seed", "data", "n_images"}
    run.fit(progress=False)
    assert run.report()["steps"] == 3 and len(run.report()["kl"]) == 3
    assert all(group["lr"] == 1e-3 for group in run.optimizer.param_groups)   # constant: no warm-up, no decay


def test_decoder_only_fine_tuning_leaves_the_encoder_so_the_latents_unchanged(images, tmp_path):
    """part="decoder" (SD's ft-MSE VAE): every model trained on the latents stays valid."""
    vae = tiny_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    kw = dict(steps=4, batch_size=4, lr=1e-3, warmup=1, part="decoder", decay="cosine", seed=3, progress=False)
    history = fit_vae(vae, images[:8], **kw)
    after = vae.state_dict()
    frozen = [k for k in after if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in after if k.startswith(("decoder.", "post_quant_conv.")) and after[k].is_floating_point()]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert sum(not torch.equal(after[k], before[k]) for k in trained) > len(trained) // 2
    assert history["steps"] == 4 and vae.encoder.conv_in.weight.requires_grad is False
    # the same run resumed from its file ends in the same weights; the part is part of what a resume must share
    path, first, resumed = tmp_path / "dec.safetensors", tiny_vae(), tiny_vae()   # the encoder: not in the file
    fit_vae(first, images[:8], checkpoint_path=path, **(kw | {"steps": 2}))
    fit_vae(resumed, images[:8], checkpoint_path=path, **kw)
    assert same_state(resumed, vae)
    with pytest.raises(ValueError, match=r"frozen: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):  # another encoder
        fit_vae(tiny_vae(seed=9), images[:8], checkpoint_path=path, **kw)
    with pytest.raises(ValueError, match=r"part: checkpoint 'decoder', now None"):
        fit_vae(tiny_vae(), images[:8], checkpoint_path=path, **(kw | {"part": "all", "steps": 6}))
    with pytest.raises(ValueError, match=r"unknown part 'encoder'; choose from \['all', 'decoder'\]"):
        fit_vae(tiny_vae(), images[:8], **(kw | {"part": "encoder"}))
    with pytest.raises(ValueError, match=r"unknown decay 'linear'"):
        fit_vae(tiny_vae(), images[:8], **(kw | {"decay": "linear"}))
