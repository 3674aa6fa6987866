"""course_lib.flow, from first principles: the path and its target, the relation to the VP path, logit-normal
timesteps, the closed-form Gaussian velocity integrated back to the data, the solvers' orders, reflow."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib import flow
from course_lib.forward import vp_mix
from course_lib.schedules import FlowSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, VAR = torch.tensor([2.0, -1.0]), torch.tensor([0.25, 4.0])


def test_path_ends_and_target_is_its_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    assert torch.equal(flow.flow_path(x0, eps, 0.0), x0) and torch.equal(flow.flow_path(x0, eps, 1.0), eps)
    t = torch.tensor([0.1, 0.4, 0.5, 0.9])
    h = 1e-3                                                   # a central difference along the path
    numeric = (flow.flow_path(x0, eps, t + h) - flow.flow_path(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(numeric, flow.velocity_target(x0, eps), rtol=1e-3, atol=1e-3)


def test_a_vp_point_is_a_scaled_point_of_the_straight_path():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    ab = torch.tensor([0.99, 0.5, 0.01])
    x_flow, t = flow.vp_to_flow(vp_mix(x0, eps, ab.view(3, 1)), ab)
    torch.testing.assert_close(x_flow, flow.flow_path(x0, eps, t))
    a, s = ab.sqrt(), (1 - ab).sqrt()
    torch.testing.assert_close(t, s / (a + s))
    assert (t.diff() > 0).all()                                 # more noise, later on the path


def test_flow_loss_is_its_definition():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    seen = {}

    def model(x, t_in):
        seen["x"], seen["t"] = x, t_in
        return 0.5 * x
    terms = flow.flow_loss(model, x0, generator=torch.Generator().manual_seed(3))
    g2 = torch.Generator().manual_seed(3)                       # the same draws: t first, then noise
    t = torch.rand(6, generator=g2)
    eps = torch.randn(x0.shape, generator=g2)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(seen["x"], xt)
    torch.testing.assert_close(seen["t"], t * flow.TIME_SCALE)
    want = (0.5 * xt - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms.per_sample, want)
    torch.testing.assert_close(terms.loss, want.mean())


def test_logit_normal_timesteps_have_the_stated_moments():
    t = flow.sample_timesteps(200_000, "logit_normal", mean=0.5, std=0.8, generator=torch.Generator().manual_seed(4))
    assert 0 < t.min() and t.max() < 1
    z = torch.logit(t.double())
    assert z.mean().item() == pytest.approx(0.5, abs=0.01) and z.std().item() == pytest.approx(0.8, abs=0.01)
    u = flow.sample_timesteps(200_000, "uniform", generator=torch.Generator().manual_seed(4))
    # logit-normal (0, 1) puts more of the training in the middle of the path than uniform does
    mid = lambda x: ((x > 0.25) & (x < 0.75)).double().mean().item()
    std_ln = flow.sample_timesteps(200_000, "logit_normal", generator=torch.Generator().manual_seed(5))
    assert mid(std_ln) > mid(u) + 0.1 and mid(u) == pytest.approx(0.5, abs=0.01)


def test_integrating_the_gaussian_velocity_recovers_the_data_distribution():
    v = flow.gaussian_velocity(MEAN, VAR)
    noise = torch.randn(40_000, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = flow.sample_flow(v, noise, steps=200, solver="heun")
    torch.testing.assert_close(x.mean(0), MEAN.double(), atol=0.03, rtol=0)
    torch.testing.assert_close(x.var(0), VAR.double(), atol=0.0, rtol=0.03)


def test_the_gaussian_velocity_is_the_conditional_mean_of_the_target():
    """Monte Carlo: pairs whose x_t falls in a narrow bin around a point have mean target close to v*."""
    g = torch.Generator().manual_seed(7)
    n, t = 2_000_000, 0.4
    x0 = MEAN[0] + VAR[0].sqrt() * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    xt = flow.flow_path(x0, eps, t)
    v = flow.gaussian_velocity(MEAN[:1], VAR[:1])
    for point in (0.5, 1.2, 2.0):
        near = (xt - point).abs().flatten() < 0.01
        mc = (eps - x0)[near].mean().item()
        exact = v(torch.tensor([[point]], dtype=torch.float64), torch.tensor([t])).item()
        assert mc == pytest.approx(exact, abs=0.03)


def test_heun_is_second_order_and_euler_first():
    v = flow.gaussian_velocity(MEAN, VAR)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = flow.sample_flow(v, noise, steps=2000, solver="heun")
    err = {(s, n): (flow.sample_flow(v, noise, n, s) - exact).abs().max().item() for s in flow.SOLVERS for n in (10, 20)}
    assert 1.6 < err["euler", 10] / err["euler", 20] < 2.6            # halving the step halves the error
    assert 3.0 < err["heun", 10] / err["heun", 20] < 5.5              # and quarters Heun's
    assert err["heun", 10] < err["euler", 10] / 5


def test_reflow_pairs_come_from_the_flows_own_ode_and_straighten_it():
    v1 = flow.gaussian_velocity(MEAN, VAR)
    noise = torch.randn(2_000, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x0, eps = flow.reflow_pairs(v1, noise, steps=100)
    assert eps is noise
    torch.testing.assert_close(x0, flow.sample_flow(v1, noise, 100, "heun"))
    # For Gaussians the reflowed coupling is the linear map x0 = mean + sd * eps (the first flow's ODE map), so its
    # optimal velocity is exact: each x_t lies on one pair's line. Its paths are straight; the first flow's are not.
    torch.testing.assert_close(x0, MEAN.double() + VAR.double().sqrt() * noise, atol=1e-3, rtol=0)
    sd, m = VAR.double().sqrt(), MEAN.double()

    def v2(x, t):
        tt = t.double().view(-1, 1)
        e = (x - (1 - tt) * m) / ((1 - tt) * sd + tt)           # the noise whose line passes through x at t
        return e - (m + sd * e)
    s1, s2 = flow.straightness(v1, noise[:500], 50), flow.straightness(v2, noise[:500], 50)
    assert s1 > 0.05 and s2 < 1e-12
    exact = m + sd * noise
    one_step = {name: (flow.sample_flow(v, noise, 1) - exact).pow(2).mean().item() for name, v in (("1", v1), ("2", v2))}
    assert one_step["2"] < 1e-12 < one_step["1"]                 # one Euler step is exact after reflow


def test_bad_arguments_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown timestep sampling 'beta'; choose from \['uniform', 'logit_normal'\]"):
        flow.sample_timesteps(4, "beta")
    with pytest.raises(ValueError, match=r"unknown solver 'rk4'; choose from \['euler', 'heun'\]"):
        flow.sample_flow(lambda x, t: x, x, 4, "rk4")
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        flow.sample_flow(lambda x, t: x, x, 0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        flow.flow_path(x, x, 1.5)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\); got \(3,\)"):
        flow.flow_path(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="std must be > 0; got 0"):
        flow.sample_timesteps(4, "logit_normal", std=0)
    with pytest.raises(ValueError, match="var must be positive"):
        flow.gaussian_velocity(torch.zeros(2), torch.tensor([1.0, 0.0]))
    assert math.isfinite(flow.straightness(lambda x, t: -x, torch.ones(2, 3), 4))


# --- the flow objective inside the course's one Trainer ------------------------------------------------

def _latent_trainer(**changes):
    from course_lib.train import Trainer, TrainConfig
    from course_lib.unet import UNet, get_preset
    g = torch.Generator().manual_seed(123)         # not the trainer's seed: its noise would equal the data
    centres = 1.5 * torch.randn(4, 4, 8, 8, generator=g)
    latents = centres.repeat(8, 1, 1, 1) + 0.1 * torch.randn(32, 4, 8, 8, generator=g)
    config = TrainConfig(batch_size=8, latents=True, precision="fp32", objective="flow", warmup=0, lr=1e-3,
                         **changes)
    return Trainer(UNet(get_preset("tiny", image_size=8, in_channels=4, out_channels=4)), latents, config,
                   device="cpu")


@pytest.mark.parametrize("sampling", flow.TIMESTEP_SAMPLING)
def test_the_trainers_flow_loss_is_flow_loss_on_its_own_draws(sampling):
    trainer = _latent_trainer(timestep_sampling=sampling)
    x0 = trainer.images[:8]
    draws = torch.Generator()
    draws.set_state(trainer.generator.get_state())
    noise = torch.randn(x0.shape, generator=draws)                     # the order loss_on draws them in
    t = flow.sample_timesteps(8, sampling, generator=draws)
    mine, _ = trainer.loss_on(x0)
    by_hand = (trainer.net(flow.flow_path(x0, noise, t), t * flow.TIME_SCALE) - (noise - x0)).pow(2).mean()
    torch.testing.assert_close(mine, by_hand, rtol=1e-5, atol=1e-6)


def test_the_trainer_trains_a_flow_and_samples_it_with_the_flows_solvers():
    trainer = _latent_trainer()
    first = sum(trainer.loss_on(trainer.images)[0].item() for _ in range(4))
    trainer.train(80, progress=False)
    assert sum(trainer.loss_on(trainer.images)[0].item() for _ in range(4)) < 0.8 * first
    euler = trainer.sample(4, steps=3, seed=1)
    model = flow.model_velocity(trainer.ema_model)
    x_T = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(euler, flow.sample_flow(model, x_T, 3, "euler"))
    torch.testing.assert_close(trainer.sample(4, steps=3, seed=1, sampler="heun"),
                               flow.sample_flow(model, x_T, 3, "heun"))
    # DDIM's step (eta 0) on the flow's path is Euler's: the same samples, through the one sampling path
    torch.testing.assert_close(trainer.sample(4, steps=3, seed=1, sampler="ddim"), euler)
    assert torch.isfinite(trainer.sample(2, steps=3, sampler="dpm++2m")).all()
    with pytest.raises(ValueError, match=r"unknown sampler 'rk4'; choose from"):
        trainer.sample(2, steps=2, sampler="rk4")


def test_flow_settings_that_mean_nothing_are_refused():
    from course_lib.train import TrainConfig
    with pytest.raises(ValueError, match=r"unknown objective 'score'; choose from \['diffusion', 'flow'\]"):
        TrainConfig(objective="score")
    with pytest.raises(ValueError, match="objective 'flow' has no noise schedule"):
        TrainConfig(objective="flow", min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="timestep_sampling applies to objective 'flow'"):
        TrainConfig(timestep_sampling="logit_normal")
    with pytest.raises(ValueError, match=r"unknown timestep sampling 'beta'"):
        TrainConfig(objective="flow", timestep_sampling="beta")


def test_a_flow_run_resumes_exactly(tmp_path):
    from course_lib.train import Trainer
    a = _latent_trainer(timestep_sampling="logit_normal")
    a.train(6, progress=False, checkpoint_path=tmp_path / "run.safetensors", checkpoint_every=3)
    a.train(10, progress=False)
    b = Trainer.resume(tmp_path / "run.safetensors", a.images, steps=10)
    assert b.config.objective == "flow" and b.step == 6
    b.train(10, progress=False)
    assert b.losses == a.losses


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("heun", 2)])
def test_network_evaluations_per_step(solver, per_step):
    calls = []
    flow.sample_flow(lambda x, t: calls.append(t) or torch.zeros_like(x), torch.zeros(3, 2), 5, solver)
    assert len(calls) == per_step * 5
    assert calls[-1].tolist() == pytest.approx([0.0] * 3 if solver == "heun" else [0.2] * 3)


def test_a_flow_text_to_image_pipeline_integrates_the_guided_velocity(tiny_pipe):
    """A U-Net with prediction "flow" makes TextToImage a tiny SD 3: the same guided model, integrated by
    sample_flow from the same starting noise (image k from seed + k), and decoded."""
    from course_lib.guidance import GuidedModel
    from course_lib.pipeline import TextToImage, start_latents

    p = tiny_pipe
    pipe = TextToImage(p.unet, p.schedule, p.clip, p.tokenizer, p.vae, p.scale_factor, prediction="flow")
    assert isinstance(pipe.schedule, FlowSchedule)                      # sampled along the flow's own path
    prompts = ["red heart", "pizza"]
    for solver, steps in (("euler", 3), ("heun", 2), ("ddim", 3)):      # DDIM's step on the flow is Euler's
        z = pipe(prompts, seed=5, steps=steps, guidance_scale=2.5, sampler=solver, return_latents=True)
        c, m = pipe.encode(prompts)
        null, null_mask = pipe.encode(["", ""])
        model = GuidedModel(pipe.unet, c, m, null, null_mask, 2.5)
        expected = flow.sample_flow(flow.model_velocity(model), start_latents(pipe.latent_shape, 2, 5), steps,
                                    "euler" if solver == "ddim" else solver)
        torch.testing.assert_close(z, expected)
    images = pipe(prompts, seed=5, steps=2)
    assert images.shape == (2, 3, *[p.vae.config.image_size] * 2) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="integrates the ODE in a continuous path's own time"):
        tiny_pipe(prompts, sampler="euler", steps=2)
    from course_lib.finetune import captioned_loss
    # the fine-tuning loss is the flow's own objective on the flow's path
    z0 = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(3))
    loss = captioned_loss(pipe, z0, c, m, torch.Generator().manual_seed(4))
    expected = flow.flow_loss(pipe.unet, z0, generator=torch.Generator().manual_seed(4), cond=(c, m)).loss
    torch.testing.assert_close(loss, expected)


def test_sample_flow_refuses_nan_noise():
    noise = torch.zeros(2, 3, 4, 4)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="noise holds 1 NaN"):
        flow.sample_flow(lambda x, t: x, noise, 2)
