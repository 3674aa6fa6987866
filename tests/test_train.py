"""Training: the loss falls, resume is exact, NaN stops with the step, checkpoints are atomic and load back."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib import checkpoint as ckpt
from course_lib.unet_file import load_model
from course_lib.data import load_emoji
from course_lib.forward import PREDICTIONS
from course_lib.learned_schedule import LearnedSchedule, schedule_loss_surrogate, vlb_terms
from course_lib.train import (Conditioning, Trainer, TrainConfig, TrainingDiverged, ema_decay_at, ema_update, lr_at,
                              resolve_precision, smooth)
from course_lib.unet import UNet, get_preset

CFG = get_preset("tiny", image_size=16)


@pytest.fixture(scope="module")
def images():
    return load_emoji(size=16, limit=48).images


def make(images, steps=6, **kw):
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup=2, **kw)
    return Trainer(UNet(CFG), images, config)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_falls_on_a_tiny_fixed_batch(images, prediction):
    trainer = make(images[:8], steps=60, prediction=prediction)
    trainer.train(progress=False)
    first, last = sum(trainer.losses[:10]) / 10, sum(trainer.losses[-10:]) / 10
    assert last < 0.6 * first, (prediction, first, last)


@pytest.mark.parametrize("schedule", ["linear", "learned"])
def test_resume_after_interruption_matches_uninterrupted_run(images, tmp_path, schedule):
    straight = make(images, steps=8, schedule=schedule).train(progress=False)

    interrupted = make(images, steps=8, schedule=schedule)
    interrupted.train(5, progress=False)           # e.g. the kernel died after step 5 ...
    interrupted.save(tmp_path / "run.safetensors")
    del interrupted
    resumed = Trainer.resume(tmp_path / "run.safetensors", images)
    assert resumed.step == 5
    resumed.train(progress=False)

    assert resumed.step == straight.step == 8
    assert resumed.losses == straight.losses
    assert same_state(resumed.model, straight.model)
    assert same_state(resumed.ema, straight.ema)
    if schedule == "learned":
        assert same_state(resumed.learned, straight.learned)


def test_resume_refuses_different_data(images, tmp_path):
    make(images, steps=2).train(progress=False, checkpoint_path=tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="trained on 48 images"):
        Trainer.resume(tmp_path / "c.safetensors", images[:10])


def test_nan_loss_stops_with_step_number(images):
    trainer = make(images, steps=10)
    trainer.train(3, progress=False)
    with torch.no_grad():
        trainer.model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="at step 3"):
        trainer.train(progress=False)
    assert trainer.step == 3


def test_checkpoint_is_written_atomically(images, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    trainer = make(images, steps=2).train(progress=False, checkpoint_path=path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(path)
    assert path.read_bytes() == before                      # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]   # and no temporary file is left


def test_export_and_load_model_round_trip(images, tmp_path):
    trainer = make(images, steps=3, schedule="cosine", prediction="v").train(progress=False)
    path = trainer.export(tmp_path / "m.safetensors", info={"note": "test"})
    model, schedule, info = load_model(path)
    assert info["prediction"] == "v" and info["note"] == "test" and info["steps"] == 3
    assert torch.allclose(schedule.alphas_cumprod, trainer.schedule.alphas_cumprod, atol=1e-12)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        ref = trainer.ema.eval()(x, t)
    assert (model(x, t) - ref).abs().max() < 2e-2           # float16 weights
    for p in model.parameters():
        assert not p.requires_grad


def test_load_model_rejects_a_training_checkpoint(images, tmp_path):
    make(images, steps=1).train(progress=False, checkpoint_path=tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="not a course_lib model file"):
        load_model(tmp_path / "c.safetensors")


def test_config_errors_name_valid_choices():
    with pytest.raises(ValueError, match=r"unknown prediction type 'noise'; choose from \['epsilon', 'x0', 'v'\]"):
        TrainConfig(prediction="noise")
    with pytest.raises(ValueError, match="learned"):
        TrainConfig(schedule="quadratic")
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; choose from \['auto', 'fp32', 'bf16', 'fp16'\]"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_warmup_and_ema_schedules():
    config = TrainConfig(lr=1e-3, warmup=10)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3) and lr_at(500, config) == pytest.approx(1e-3)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, expected)
    assert smooth([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]


def test_cosine_lr_decay_reaches_zero_and_the_trainer_follows_it(images):
    config = TrainConfig(steps=110, lr=1e-3, warmup=10, lr_decay="cosine")
    assert lr_at(10, config) == pytest.approx(1e-3) and lr_at(60, config) == pytest.approx(5e-4)
    assert abs(lr_at(110, config)) < 1e-12 < lr_at(109, config)
    assert lr_at(60, TrainConfig(steps=110, lr=1e-3, warmup=10)) == pytest.approx(1e-3)     # the default: constant
    trainer = make(images[:8], steps=6, lr_decay="cosine")
    trainer.train(4, progress=False)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(3, trainer.config))
    with pytest.raises(ValueError, match=r"unknown lr_decay 'linear'; choose from \['constant', 'cosine'\]"):
        TrainConfig(lr_decay="linear")


def test_learned_schedule_is_monotonic_with_fixed_end_points():
    sched = LearnedSchedule(gamma_min=-9.0, gamma_max=10.0)
    with torch.no_grad():                       # any parameters: still monotonic and pinned
        for p in sched.parameters():
            p.copy_(torch.randn_like(p) * 3)
    u = torch.linspace(0, 1, 501)
    gamma = sched(u)
    assert (gamma[1:] > gamma[:-1]).all()
    assert gamma[0].item() == pytest.approx(-9.0, abs=1e-4) and gamma[-1].item() == pytest.approx(10.0, abs=1e-4)
    discrete = sched.to_noise_schedule(100)
    assert discrete.T == 100 and discrete.name == "learned"
    assert discrete.log_snr[-1].item() == pytest.approx(-10.0, abs=1e-3)
    _, slope = sched.gamma_and_slope(u)
    numeric = torch.gradient(gamma.detach(), spacing=(u,))[0]
    assert torch.allclose(slope[5:-5], numeric[5:-5], rtol=2e-2)
    with pytest.raises(ValueError, match="gamma_max must exceed"):
        LearnedSchedule(gamma_min=1.0, gamma_max=0.0)


def test_schedule_surrogate_gradient_is_gradient_of_squared_bound():
    """The surrogate's gradient equals d/dtheta mean(L_i^2) when sse depends on gamma smoothly."""
    torch.manual_seed(0)
    sched = LearnedSchedule(hidden=8)
    u = torch.rand(6)
    eps = torch.randn(6, 5)
    target = torch.randn(6, 5)

    def eps_hat(gamma):                          # a stand-in denoiser whose error depends on the noise level
        return target * torch.sigmoid(gamma)[:, None]

    gamma, slope = sched.gamma_and_slope(u)
    g = gamma.detach().requires_grad_(True)
    sse = (eps - eps_hat(g)).pow(2).sum(1)
    (dsse,) = torch.autograd.grad(sse.sum(), g)
    got = torch.autograd.grad(schedule_loss_surrogate(gamma, slope, sse.detach(), dsse), list(sched.parameters()))

    gamma, slope = sched.gamma_and_slope(u)
    L = vlb_terms(slope, eps, eps_hat(gamma))
    want = torch.autograd.grad(L.pow(2).mean(), list(sched.parameters()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_learned_schedule_trains_and_changes_shape(images):
    trainer = make(images, steps=30, schedule="learned")
    before = trainer.schedule.log_snr.clone()
    trainer.train(progress=False)
    after = trainer.schedule.log_snr
    assert math.isfinite(trainer.losses[-1])
    assert (after - before).abs().max() > 1e-3                     # the shape moved
    assert after[0] == pytest.approx(before[0].item(), abs=1e-4)   # the end points did not
    assert after[-1] == pytest.approx(before[-1].item(), abs=1e-4)


# --- text conditioning and latents ---------------------------------------------------------------------

def conditioning(n: int, L: int = 5, D: int = 64) -> Conditioning:
    g = torch.Generator().manual_seed(1)
    context = torch.randn(n, L, D, generator=g) + 10.0          # far from the null context (zeros)
    mask = torch.ones(n, L, dtype=torch.bool)
    mask[:, 3:] = False                                         # padded tail
    null_mask = torch.zeros(L, dtype=torch.bool)
    null_mask[:2] = True
    return Conditioning(context, mask, torch.zeros(L, D), null_mask)


def conditional_unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(get_preset("sd_tiny", in_channels=3, out_channels=3, image_size=16))
    for module in net.modules():                                # proj_out starts at zero; make text matter
        if hasattr(module, "proj_out"):
            torch.nn.init.normal_(module.proj_out.weight, std=0.02)
    return net


def test_caption_dropout_replaces_the_share_it_says(images):
    cond = conditioning(len(images))
    trainer = Trainer(conditional_unet(), images, TrainConfig(batch_size=48, caption_dropout=0.3), conditioning=cond)
    dropped = total = 0
    for _ in range(60):
        _, (context, mask) = trainer._next_batch()
        is_null = (context.abs().sum((1, 2)) == 0)
        assert torch.equal(mask[is_null], cond.null_mask.expand(int(is_null.sum()), -1))
        assert torch.equal(mask[~is_null], cond.mask[: int((~is_null).sum())])
        dropped += int(is_null.sum())
        total += context.shape[0]
    share = dropped / total
    se = math.sqrt(0.3 * 0.7 / total)
    assert abs(share - 0.3) < 4 * se, share


@pytest.mark.parametrize("p, expected", [(0.0, 0), (1.0, 48)])
def test_caption_dropout_extremes(images, p, expected):
    trainer = Trainer(conditional_unet(), images, TrainConfig(batch_size=48, caption_dropout=p),
                      conditioning=conditioning(len(images)))
    _, (context, _) = trainer._next_batch()
    assert int((context.abs().sum((1, 2)) == 0).sum()) == expected


def test_conditional_training_resumes_exactly(images, tmp_path):
    cond = conditioning(len(images))
    config = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=2)
    straight = Trainer(conditional_unet(), images, config, conditioning=cond).train(progress=False)
    interrupted = Trainer(conditional_unet(), images, TrainConfig(**vars(config)), conditioning=cond)
    interrupted.train(3, progress=False)
    interrupted.save(tmp_path / "run.safetensors")
    resumed = Trainer.resume(tmp_path / "run.safetensors", images, conditioning=cond)
    resumed.train(progress=False)
    assert resumed.losses == straight.losses
    assert same_state(resumed.model, straight.model)


def test_conditional_model_and_conditioning_must_come_together(images):
    with pytest.raises(ValueError, match="conditioning"):
        Trainer(conditional_unet(), images, TrainConfig())
    with pytest.raises(ValueError, match="conditioning"):
        Trainer(UNet(CFG), images, TrainConfig(), conditioning=conditioning(len(images)))
    with pytest.raises(ValueError, match="captions for"):
        Trainer(conditional_unet(), images, TrainConfig(), conditioning=conditioning(len(images) - 1))
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.5)


def test_latents_skip_the_range_check_and_sample_unclamped(images):
    latents = torch.randn(32, 4, 8, 8) * 3                      # unbounded, unlike images
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Trainer(UNet(get_preset("tiny", image_size=8, in_channels=4, out_channels=4)), latents, TrainConfig())
    trainer = Trainer(UNet(get_preset("tiny", image_size=8, in_channels=4, out_channels=4)), latents,
                      TrainConfig(steps=2, batch_size=8, latents=True))
    trainer.train(progress=False)
    out = trainer.sample(4, steps=3)
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()


def test_conditional_trainer_samples_with_guidance(images):
    trainer = Trainer(conditional_unet(), images, TrainConfig(steps=1, batch_size=8),
                      conditioning=conditioning(len(images)))
    a = trainer.sample(2, steps=3, guidance_scale=1.0)
    b = trainer.sample(2, steps=3, guidance_scale=5.0)
    assert a.shape == (2, 3, 16, 16) and not torch.allclose(a, b)
