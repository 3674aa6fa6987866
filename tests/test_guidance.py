"""Classifier-free guidance (course_lib.guidance.GuidedModel): the formula, the one-pass shortcuts at scales
0 and 1, the doubled batch against two separate passes, broadcasting and padding of contexts, and sampling
with a guided model."""

import pytest
import torch

from course_lib import guidance, sampling
from course_lib.guidance import GuidedModel, classifier_free_guidance, conditional
from course_lib.schedules import make_schedule
from course_lib.attention import SpatialTransformer
from course_lib.unet import UNet, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

D = 64                                   # sd_tiny's context_dim


@pytest.fixture(scope="module")
def unet() -> UNet:
    """sd_tiny with its transformers' proj_out made non-zero (they start at zero, which hides the context)."""
    torch.manual_seed(0)
    model = UNet(get_preset("sd_tiny"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpatialTransformer):
                m.proj_out.weight.copy_(torch.randn(m.proj_out.weight.shape, generator=gen) * 0.1)
    return model.eval()


class Counting(torch.nn.Module):
    """Wraps a U-Net and records the batch size of every call."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, context=None, context_mask=None):
        self.batches.append(x.shape[0])
        return self.unet(x, t, context, context_mask)


def _inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def _text(batch: int, length: int, seed: int):
    """Text states and a mask with real tokens first, padding at the end."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return torch.randn(batch, length, D, generator=gen), torch.arange(length)[None] < lengths[:, None]


def test_the_formula():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), torch.tensor([2.0, 8.0]))
    # scale = 1 + w in Ho & Salimans' Eq. 6: (1 + w) cond - w uncond
    w = 2.5
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1 + w), (1 + w) * cond - w * uncond)


def test_rescaled_guidance_against_its_formula():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    scale, phi = 7.5, 0.7
    guided = uncond + scale * (cond - uncond)
    out = classifier_free_guidance(cond, uncond, scale, rescale=phi)
    for i in range(3):                  # written per image, with the sample std over all of its values
        factor = cond[i].flatten().std() / guided[i].flatten().std()
        torch.testing.assert_close(out[i], phi * factor * guided[i] + (1 - phi) * guided[i])
    # phi = 1: each image has exactly the conditional output's std; phi = 0: plain guidance
    full = classifier_free_guidance(cond, uncond, scale, rescale=1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    assert torch.equal(classifier_free_guidance(cond, uncond, scale, rescale=0.0), guided)
    assert (guided.flatten(1).std(1) > 2 * cond.flatten(1).std(1)).all()    # so the rescale changed something
    for bad in (-0.1, 1.5, True, "0.7"):
        with pytest.raises(ValueError, match=r"rescale phi must be a number in \[0, 1\]"):
            classifier_free_guidance(cond, uncond, scale, rescale=bad)


def test_rescaled_guidance_matches_diffusers():
    pipeline_sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for scale, phi in [(3.0, 0.7), (7.5, 0.5), (5.0, 1.0)]:
        guided = uncond + scale * (cond - uncond)
        expected = pipeline_sd.rescale_noise_cfg(guided, cond, guidance_rescale=phi)
        torch.testing.assert_close(classifier_free_guidance(cond, uncond, scale, rescale=phi), expected,
                                   atol=1e-5, rtol=1e-5)


def test_a_guided_model_applies_its_rescale(unet):
    x, t = _inputs()
    context, mask = _text(2, 6, seed=1)
    null, null_mask = _text(2, 6, seed=2)
    guided = GuidedModel(unet, context, mask, null, null_mask, scale=5.0, rescale=0.7)
    with torch.no_grad():
        cond, uncond = unet(x, t, context, mask), unet(x, t, null, null_mask)
        torch.testing.assert_close(guided(x, t), classifier_free_guidance(cond, uncond, 5.0, 0.7), atol=1e-5, rtol=1e-5)
        guided.rescale = 0.0
        torch.testing.assert_close(guided(x, t), classifier_free_guidance(cond, uncond, 5.0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        guided.rescale = 2.0
    assert "rescale=0" in repr(guided)


def test_scale_one_is_the_conditional_prediction_and_scale_zero_the_unconditional_in_one_pass(unet):
    x, t = _inputs()
    context, mask = _text(2, 6, seed=1)
    null, null_mask = _text(2, 6, seed=2)
    counting = Counting(unet)
    guided = GuidedModel(counting, context, mask, null, null_mask, scale=1.0)
    with torch.no_grad():
        cond, uncond = unet(x, t, context, mask), unet(x, t, null, null_mask)
        assert torch.equal(guided(x, t), cond)
        guided.scale = 0
        assert torch.equal(guided(x, t), uncond)
        guided.scale = 4.0
        out = guided(x, t)
    assert counting.batches == [2, 2, 4]            # scales 0 and 1: one plain pass; otherwise one doubled batch
    assert (cond - uncond).abs().max() > 1e-3       # the two predictions differ, so the checks above mean something
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 3.0, 7.5])
@pytest.mark.parametrize("masked", [False, True])
def test_the_doubled_batch_equals_two_separate_passes(unet, scale, masked):
    x, t = _inputs(3, seed=int(scale))
    context, mask = _text(3, 5, seed=3)
    null, null_mask = _text(3, 5, seed=4)
    if not masked:
        mask = null_mask = None
    with torch.no_grad():
        expected = classifier_free_guidance(unet(x, t, context, mask), unet(x, t, null, null_mask), scale)
        out = GuidedModel(unet, context, mask, null, null_mask, scale=scale)(x, t)
    # float32 rounding differs between batch sizes (scale 7.5 amplifies it to ~1e-5 on some CPUs); a wrong
    # pairing of the two halves would differ by O(1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


def test_one_prompt_broadcasts_over_the_batch(unet):
    x, t = _inputs(3)
    context, mask = _text(1, 5, seed=5)
    null = torch.zeros(1, 5, D)
    with torch.no_grad():
        shared = GuidedModel(unet, context, mask, null, None, scale=3.0)(x, t)
        explicit = GuidedModel(unet, context.expand(3, -1, -1), mask.expand(3, -1), null.expand(3, -1, -1),
                               None, scale=3.0)(x, t)
    torch.testing.assert_close(shared, explicit, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="context has batch 2; expected 1 .* or the image batch 3"):
        GuidedModel(unet, torch.zeros(2, 5, D), None, null, scale=3.0)(x, t)


def test_a_null_context_of_another_length_is_padded_with_masked_tokens(unet):
    """A negative prompt is a null context; it may be shorter or longer than the prompt."""
    x, t = _inputs(2)
    context, mask = _text(2, 7, seed=6)
    negative = _text(2, 3, seed=7)[0]               # no mask: all 3 tokens real
    with torch.no_grad():
        expected = classifier_free_guidance(unet(x, t, context, mask), unet(x, t, negative), 2.0)
        out = GuidedModel(unet, context, mask, negative, None, scale=2.0)(x, t)
        swapped = GuidedModel(unet, negative, None, context, mask, scale=2.0)(x, t)
        expected_swapped = classifier_free_guidance(unet(x, t, negative), unet(x, t, context, mask), 2.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swapped, expected_swapped, atol=1e-5, rtol=1e-5)


def test_conditional_is_the_plain_conditional_model(unet):
    x, t = _inputs()
    context, mask = _text(2, 4, seed=8)
    model = conditional(unet, context, mask)
    assert model.scale == 1
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t, context, mask))
        assert torch.equal(model(x, 17), unet(x, torch.full((2,), 17), context, mask))   # scalar t


def test_bad_arguments_are_rejected(unet):
    context = torch.zeros(1, 4, D)
    with pytest.raises(ValueError, match="guidance scale 3.0 needs null_context"):
        GuidedModel(unet, context, scale=3.0)
    model = conditional(unet, context)
    with pytest.raises(ValueError, match="needs null_context"):
        model.scale = 0
    assert model.scale == 1                          # a refused setting leaves the scale alone
    for bad in (-1.0, float("inf"), float("nan"), "7", True):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            GuidedModel(unet, context, None, context, scale=bad)
    with pytest.raises(ValueError, match=r"context must be a float tensor of text states \(B, L, D\)"):
        GuidedModel(unet, torch.zeros(4, D), scale=1.0)
    with pytest.raises(TypeError, match="context's mask must be a bool tensor"):
        GuidedModel(unet, context, torch.ones(1, 4), scale=1.0)
    with pytest.raises(ValueError, match=r"context's mask must have shape \(1, 4\) to match context \(1, 4, 64\)"):
        GuidedModel(unet, context, torch.ones(1, 5, dtype=torch.bool), scale=1.0)
    with pytest.raises(ValueError, match="null_context's width 32 differs from context's 64"):
        GuidedModel(unet, context, None, torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="null_mask was given without null_context"):
        GuidedModel(unet, context, None, None, torch.ones(1, 4, dtype=torch.bool), scale=1.0)


def test_sampling_with_a_guided_model_is_deterministic_for_a_seed(unet):
    schedule = make_schedule("cosine", T=1000)
    context, mask = _text(1, 5, seed=9)
    guided = GuidedModel(unet, context, mask, torch.zeros(1, 1, D), None, scale=5.0)
    assert list(guided.parameters()) == list(unet.parameters())     # samplers find the U-Net's device
    assert sampling._default_device(guided) == torch.device("cpu")

    def run(scale, seed=0, sampler="ddpm", steps=4):
        guided.scale = scale
        return sampling.sample(guided, schedule, (2, 4, 8, 8), sampler=sampler, steps=steps, clip_x0=False,
                               generator=torch.Generator().manual_seed(seed))

    first = run(5.0)
    assert first.shape == (2, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(run(5.0), first)
    assert (run(5.0, seed=1) - first).abs().max() > 1e-3
    assert (run(1.0) - first).abs().max() > 1e-3                    # the scale matters
    guided.scale = 2.0
    states = list(sampling.reverse_process(guided, schedule, (2, 4, 8, 8), sampler="dpm++2m", steps=3,
                                           clip_x0=False, generator=torch.Generator().manual_seed(0)))
    assert len(states) == 4 and torch.equal(states[-1].x_t, run(2.0, sampler="dpm++2m", steps=3))


def test_sampling_still_offers_the_guidance_names():
    """Notebook 09 and course_lib.train import GuidedModel from course_lib.sampling: the same objects."""
    assert sampling.GuidedModel is guidance.GuidedModel
    assert sampling.classifier_free_guidance is guidance.classifier_free_guidance
    assert sampling.conditional is guidance.conditional


def test_the_bare_formula_refuses_a_negative_or_infinite_scale():
    from course_lib.guidance import classifier_free_guidance
    c, u = torch.ones(1, 3), torch.zeros(1, 3)
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
            classifier_free_guidance(c, u, bad)
    assert torch.equal(classifier_free_guidance(c, u, 0), u)
