"""The text-to-image pipeline: seeds reproduce images, batches are independent, bad arguments are named."""

from __future__ import annotations

import pytest
import torch

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


def test_negative_prompt_changes_the_result(pipe):
    a = pipe("red heart", seed=0, steps=3, guidance_scale=4.0, return_latents=True)
    b = pipe("red heart", seed=0, steps=3, guidance_scale=4.0, negative_prompt="grinning face", return_latents=True)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps must be an integer from 1"),
    ({"steps": 0}, "steps must be an integer from 1"),
    ({"steps": 5000}, "steps must be an integer from 1 to 1000"),
    ({"guidance_scale": -2.0}, "guidance_scale must be a number >= 0"),
    ({"images_per_prompt": 0}, "images_per_prompt must be a positive integer"),
    ({"sampler": "euler"}, "unknown sampler 'euler'; valid are ddpm, ddim, dpm\\+\\+2m"),
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
