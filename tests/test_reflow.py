"""Reflow (course_lib.reflow): the pairs start from the pipeline's own noise and end where its sampler takes it;
the trainer regresses each end's own noise, not fresh noise; exact resume through the one loop; bad input refused."""

import pytest
import torch

import course_lib.reflow as reflow
from course_lib.pipeline import SamplerSettings, start_latents
from course_lib.reflow import ReflowTrainer, load_pairs, save_pairs, teacher_pairs
from course_lib.train import TrainConfig
from course_lib.unet import UNet, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def _flow_config(steps=4, **changes):
    return TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup=0, latents=True, objective="flow",
                       timestep_sampling="uniform", caption_dropout=0.0, **changes)


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return UNet(get_preset("tiny", image_size=8, in_channels=4, out_channels=4))


def test_pairs_start_from_the_pipelines_noise_and_end_where_its_sampler_goes(tiny_pipe, tmp_path):
    captions = ["red heart", "cat", "smiling face"]
    settings = SamplerSettings(steps=3, guidance_scale=2.0)
    ends, noise = teacher_pairs(tiny_pipe, captions, settings, seed=5, batch_size=2)
    assert torch.equal(noise, start_latents(tiny_pipe.latent_shape, 3, 5))
    one_call = tiny_pipe(captions, seed=5, settings=settings, return_latents=True)   # batches of 2 against 3:
    assert torch.allclose(ends, one_call, rtol=1e-4, atol=1e-4)                     # float rounding only
    path = save_pairs(tmp_path / "pairs.safetensors", ends, noise, captions)
    e2, n2, c2 = load_pairs(path)
    assert torch.equal(e2, ends) and torch.equal(n2, noise) and c2 == captions
    with pytest.raises(ValueError, match="one noise and one caption per end"):
        save_pairs(tmp_path / "bad.safetensors", ends, noise, captions[:2])
    from course_lib import checkpoint as ckpt
    ckpt.atomic_save({"x": ends}, tmp_path / "other.safetensors", {"format": "something"})
    with pytest.raises(ValueError, match="not a file of reflow pairs"):
        load_pairs(tmp_path / "other.safetensors")


def test_each_end_is_trained_against_its_own_noise(monkeypatch):
    ends, noise = _data()
    seen = []
    real = reflow.path_loss

    def spy(model, path, x0, **kw):
        seen.append((x0.clone(), kw["noise"].clone(), kw["prediction"]))
        return real(model, path, x0, **kw)

    monkeypatch.setattr(reflow, "path_loss", spy)
    trainer = ReflowTrainer(_model(), ends, _flow_config(steps=3), noise=noise)
    trainer.train(progress=False)
    assert len(seen) == 3
    for x0, z1, prediction in seen:
        rows = [int(torch.nonzero((ends == r).flatten(1).all(1))[0]) for r in x0]    # which ends were drawn
        assert torch.equal(z1, noise[rows]) and prediction == "flow"


def test_reflow_resumes_exactly_and_refuses_other_noise(tmp_path):
    ends, noise = _data()
    straight = ReflowTrainer(_model(), ends, _flow_config(steps=4), noise=noise).train(progress=False)
    path = tmp_path / "reflow.safetensors"
    ReflowTrainer(_model(), ends, _flow_config(steps=4), noise=noise).train(2, checkpoint_path=path, progress=False)
    again = ReflowTrainer.resume(path, ends, noise=noise, config=_flow_config(steps=4))
    assert again.step == 2
    again.train(progress=False)
    assert again.losses == straight.losses
    for a, b in zip(again.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pairs_noise"):
        ReflowTrainer.resume(path, ends, noise=noise + 1, config=_flow_config(steps=4))


def test_bad_reflow_settings_are_refused_by_name():
    ends, noise = _data()
    with pytest.raises(ValueError, match=r"unknown objective for reflow \(a rectified flow's\) 'diffusion'; choose from \['flow'\]"):
        ReflowTrainer(_model(), ends, TrainConfig(latents=True), noise=noise)
    with pytest.raises(ValueError, match="hflip must be False"):
        ReflowTrainer(_model(), ends, _flow_config(hflip=True), noise=noise)
    with pytest.raises(ValueError, match=r"one noise per end, the ends' shape \(8, 4, 8, 8\); got \(7, 4, 8, 8\)"):
        ReflowTrainer(_model(), ends, _flow_config(), noise=noise[:7])
    with pytest.raises(ValueError, match="NaN or infinite"):
        ReflowTrainer(_model(), ends, _flow_config(), noise=noise.clone().fill_(float("nan")))
