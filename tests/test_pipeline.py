"""The text-to-image pipeline: seeds reproduce images, batches are independent, bad arguments are named."""

from __future__ import annotations

import pytest
import torch

from course_lib.finetune import captioned_loss
from course_lib.pipeline import TextToImage
from course_lib.unet import UNet, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def test_same_seed_same_image_and_other_seed_other_image(pipe):
    a = pipe("red heart", seed=3, steps=4)
    b = pipe("red heart", seed=3, steps=4)
    c = pipe("red heart", seed=4, steps=4)
    assert a.shape == (1, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_a_batch_of_prompts_gives_each_prompt_its_own_image(pipe):
    batch = pipe(["red heart", "grinning face", "cat"], seed=0, steps=4)
    assert batch.shape == (3, 3, 32, 32)
    alone = pipe("red heart", seed=0, steps=4)
    torch.testing.assert_close(batch[:1], alone, atol=1e-4, rtol=0)     # image k uses seed + k
    second = pipe("grinning face", seed=1, steps=4)
    torch.testing.assert_close(batch[1:2], second, atol=1e-4, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_images_per_prompt_and_prompt_effect(pipe):
    out = pipe(["red heart", "cat"], seed=0, steps=3, images_per_prompt=2)
    assert out.shape == (4, 3, 32, 32)
    a = pipe("red heart", seed=0, steps=3, guidance_scale=5.0, return_latents=True)
    b = pipe("grinning face", seed=0, steps=3, guidance_scale=5.0, return_latents=True)
    assert not torch.allclose(a, b)                        # the text reaches the image
    u1 = pipe("red heart", seed=0, steps=3, guidance_scale=0.0, return_latents=True)
    u2 = pipe("grinning face", seed=0, steps=3, guidance_scale=0.0, return_latents=True)
    torch.testing.assert_close(u1, u2)                     # scale 0: the prompt is ignored


def test_guidance_rescale_reaches_the_guided_model(pipe):
    plain = pipe("red heart", seed=0, steps=3, guidance_scale=6.0, return_latents=True)
    zero = pipe("red heart", seed=0, steps=3, guidance_scale=6.0, guidance_rescale=0.0, return_latents=True)
    rescaled = pipe("red heart", seed=0, steps=3, guidance_scale=6.0, guidance_rescale=0.7, return_latents=True)
    assert torch.equal(plain, zero) and not torch.allclose(plain, rescaled)
    with pytest.raises(ValueError, match=r"guidance_rescale must be a number in \[0, 1\]"):
        pipe("red heart", seed=0, steps=3, guidance_rescale=-0.5)


def test_negative_prompt_changes_the_result(pipe):
    a = pipe("red heart", seed=0, steps=3, guidance_scale=4.0, return_latents=True)
    b = pipe("red heart", seed=0, steps=3, guidance_scale=4.0, negative_prompt="grinning face", return_latents=True)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps must be an int >= 1"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": 5000}, r"steps must be an int from 1 to 1000 \(the schedule's length T\)"),
    ({"guidance_scale": -2.0}, "guidance_scale must be a number >= 0"),
    ({"images_per_prompt": 0}, "images_per_prompt must be an int >= 1"),
    ({"sampler": "lms"}, "unknown sampler 'lms'; choose from \\['ddpm', 'ddim', 'dpm\\+\\+2m', 'euler', 'heun', 'lcm'\\]"),
    ({"sampler": "euler"}, "sampler 'euler' integrates the ODE in a continuous path's own time"),
    ({"negative_prompt": ["a", "b"]}, "one negative prompt, or one per prompt"),
])
def test_bad_arguments_get_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("red heart", **kwargs)


def test_bad_prompts_get_clear_errors(pipe):
    with pytest.raises(ValueError, match="non-empty list of strings"):
        pipe([])
    with pytest.raises(TypeError, match="every prompt must be a string"):
        pipe(["red heart", 3])


def test_mismatched_parts_are_refused(pipe):
    unconditional = UNet(get_preset("tiny", image_size=16, in_channels=4, out_channels=4))
    with pytest.raises(ValueError, match="unconditional"):
        TextToImage(unconditional, pipe.schedule, pipe.clip, pipe.tokenizer, pipe.vae, 0.5)
    wrong_width = UNet(get_preset("sd_tiny", image_size=16, context_dim=pipe.clip.config.text.width + 8))
    with pytest.raises(ValueError, match="text states"):
        TextToImage(wrong_width, pipe.schedule, pipe.clip, pipe.tokenizer, pipe.vae, 0.5)


def test_the_shipped_pipeline_makes_images():
    shipped = TextToImage.from_shipped()
    out = shipped(["red heart", "grinning face"], seed=0, steps=3)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_the_shipped_tiny_sd3_is_an_mmdit_sampled_with_euler():
    from course_lib.mmdit import MMDiT
    from course_lib.pipeline import TINY_SD3_SAMPLER
    sd3 = TextToImage.from_shipped(model="tiny_sd3")
    assert isinstance(sd3.unet, MMDiT) and sd3.prediction == "flow" and sd3.sampler_settings == TINY_SD3_SAMPLER
    out = sd3(["red heart", "grinning face"], seed=0, steps=3)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"unknown shipped model 'sd3'; choose from \['tiny_sd', 'tiny_sd3'\]"):
        TextToImage.from_shipped(model="sd3")


# --- one generation path, a batched helper, the one objective ----------------------------------------------

def test_generate_in_batches_equals_one_call(pipe):
    prompts = ["red heart", "grinning face", "cat", "rocket", "sun"]
    whole = pipe(prompts, seed=7, steps=3, images_per_prompt=2, return_latents=True)
    for batch_size in (1, 2, 5, 8):
        batched = pipe.generate(prompts, batch_size=batch_size, seed=7, steps=3, images_per_prompt=2,
                                return_latents=True)
        # image k from seed + k throughout: a wrong seed differs by O(1); batch-size-dependent float32 rounding
        # through three U-Net steps reached 1.1e-4 on an AMD EPYC
        torch.testing.assert_close(batched, whole, atol=5e-4, rtol=0)
    negatives = ["cat", "", "red heart", "", "rocket"]
    torch.testing.assert_close(pipe.generate(prompts, batch_size=2, seed=1, steps=3, negative_prompt=negatives,
                                             return_latents=True),
                               pipe(prompts, seed=1, steps=3, negative_prompt=negatives, return_latents=True),
                               atol=5e-4, rtol=0)
    assert pipe.generate("red heart", steps=2).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1; got 0"),
    ({"batch_size": 2.5}, ValueError, "batch_size must be an int >= 1; got 2.5"),
    ({"seed": "0"}, TypeError, "seed must be an integer"),
    ({"images_per_prompt": 0}, ValueError, "images_per_prompt must be an int >= 1"),
    ({"negative_prompt": ["a"]}, ValueError, r"one negative prompt, or one per prompt \(2\); got 1"),
])
def test_generate_names_bad_arguments(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe.generate(["red heart", "cat"], steps=2, **kwargs)


def test_sampler_settings_of_the_pipeline_and_of_a_call(pipe):
    from course_lib.pipeline import TINY_SD_SAMPLER, SamplerSettings
    assert pipe.sampler_settings == TINY_SD_SAMPLER
    settings = SamplerSettings(sampler="dpm++2m", steps=3, guidance_scale=2.0)
    a = pipe("red heart", seed=0, settings=settings, return_latents=True)
    b = pipe("red heart", seed=0, sampler="dpm++2m", steps=3, guidance_scale=2.0, return_latents=True)
    assert torch.equal(a, b)                                    # keywords and settings say the same
    c = pipe("red heart", seed=0, settings=settings, steps=4, return_latents=True)   # a keyword overrides a field
    assert not torch.allclose(a, c)


def test_seed_and_prompt_errors_of_the_one_path(pipe):
    with pytest.raises(TypeError, match="seed must be an integer; got 1.5"):
        pipe("red heart", seed=1.5, steps=2)
    with pytest.raises(ValueError, match=r"negative_prompt must be a string or a non-empty list"):
        pipe("red heart", negative_prompt=[], steps=2)


def test_both_pipelines_generate_through_text_to_image(pipe, monkeypatch):
    from course_lib import pipeline, sd
    calls = []
    original = pipeline.text_to_image

    def spy(*args, **kwargs):
        calls.append(args[5])                                   # the SamplerSettings of the call
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "text_to_image", spy)
    monkeypatch.setattr(sd, "text_to_image", spy)
    pipe("red heart", steps=2)
    sd.StableDiffusion.random("tiny")("a red fox", steps=2)
    assert [c.steps for c in calls] == [2, 2]
    assert calls[1] == sd.SD15_SAMPLER.replace(steps=2)         # SD 1.5's scheduler, 2 steps


def test_denoising_loss_is_the_one_objective_drawing_t_then_noise(pipe):
    """pipe.denoising_loss = course_lib.forward.diffusion_loss on the pipeline's U-Net and prediction, t drawn
    before the noise from the generator (the order every fine-tuning run's numbers depend on)."""
    from course_lib.forward import prediction_target
    z0 = torch.randn(3, *pipe.latent_shape, generator=torch.Generator().manual_seed(5))
    context, mask = pipe.encode(["red heart", "cat", ""])
    loss = captioned_loss(pipe, z0, context, mask, torch.Generator().manual_seed(9))
    per_sample = captioned_loss(pipe, z0, context, mask, torch.Generator().manual_seed(9), reduce=False)
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, pipe.schedule.T, (3,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    abar = pipe.schedule.alphas_cumprod[t].float()[:, None, None, None]
    with torch.no_grad():
        out = pipe.unet(abar.sqrt() * z0 + (1 - abar).sqrt() * noise, t, context, mask)
    expected = (out - prediction_target(pipe.prediction, z0, noise, abar)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample.detach(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=1e-6, rtol=1e-5)
