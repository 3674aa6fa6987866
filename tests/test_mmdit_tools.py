"""Which of the course's editing and personalisation tools work on a text-to-image MMDiT with rectified flow (the
tiny SD 3, notebook 14), checked on a tiny untrained one: editing (img2img, inpainting, inversion), LoRA on its
fused attention projections, DreamBooth, textual inversion and LCM-LoRA run; the U-Net's default LoRA targets and
ControlNet (a copy of a U-Net's encoder) are refused with errors that say why."""

from __future__ import annotations

import copy

import pytest
import torch

from course_lib import controlnet, dreambooth, editing, lcm, lora, textual_inversion
from course_lib.data import load_emoji
from course_lib.mmdit import MMDiT, mmdit_preset
from course_lib.pipeline import TextToImage
from course_lib.schedules import FlowSchedule


@pytest.fixture(scope="module")
def sd3(tiny_pipe):
    torch.manual_seed(0)
    c, h, _ = tiny_pipe.latent_shape
    net = MMDiT(mmdit_preset("mmdit_tiny", image_size=h, in_channels=c, context_dim=tiny_pipe.clip.config.text.width))
    with torch.no_grad():                  # off adaLN-Zero's zeros, so that gradients reach every block
        for p in net.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=0.05)
    return TextToImage(net, FlowSchedule("logit_normal"), tiny_pipe.clip, tiny_pipe.tokenizer, tiny_pipe.vae,
                       tiny_pipe.scale_factor, "flow")


@pytest.fixture(scope="module")
def emoji(sd3):
    data = load_emoji(size=sd3.vae.config.image_size, limit=4)
    return data.images, data.captions


def test_editing_works_on_a_flow_mmdit(sd3, emoji):
    images, captions = emoji
    round_trip = sd3.decode(editing._latents(sd3, images[:2]))
    torch.testing.assert_close(editing.img2img(sd3, images[:2], captions[:2], strength=0.0, steps=4), round_trip)
    torch.testing.assert_close(editing.img2img(sd3, images[:2], captions[:2], strength=1.0, steps=4, seed=3),
                               sd3(captions[:2], seed=3, steps=4))
    ts = editing.img2img_timesteps(sd3, 0.5, steps=4)
    torch.testing.assert_close(ts, torch.tensor([0.5, 0.25]))        # the even grid's tail, in flow time
    half = editing.img2img(sd3, images[:2], captions[:2], strength=0.5, steps=4)
    assert half.shape == images[:2].shape and torch.isfinite(half).all()
    mask = torch.zeros(1, 1, *images.shape[-2:])
    mask[..., : images.shape[-2] // 2, :] = 1                           # repaint the top half
    z = editing.inpaint(sd3, images[:2], mask, captions[:2], steps=3, return_latents=True)
    keep = editing.latent_mask(sd3, mask, images[:2]) == 0
    torch.testing.assert_close(z[keep.expand_as(z)], editing._latents(sd3, images[:2]).cpu()[keep.expand_as(z)])
    inverted = editing.invert(sd3, images[:2], captions[:2], steps=4)
    edited = editing.edit_with_inversion(sd3, images[:2], captions[:2], captions[2:4], steps=4)
    assert inverted.shape == (2, *sd3.latent_shape) and torch.isfinite(edited).all()


def test_personalisation_on_a_flow_mmdit(sd3, emoji):
    images, captions = emoji
    with pytest.raises(ValueError, match=r"no Linear or Conv2d layer matches targets.*blocks\.0\.text\.qkv"):
        lora.fit_lora(copy.deepcopy(sd3), images, captions, steps=1, batch_size=2)
    styled = copy.deepcopy(sd3)
    before = {k: v.clone() for k, v in styled.unet.state_dict().items()}
    log = lora.fit_lora(styled, images, captions, targets=("*.qkv", "*.out"), steps=2, batch_size=2, lr=1e-2)
    layers = lora.lora_layers(styled.unet)
    assert log.steps == 2 and len(layers) == 4 * styled.unet.config.depth - 1
    assert "blocks.1.text.out" not in layers             # qkv and out of both streams but the last text one (SD 3's)
    for name, layer in layers.items():                                       # only the adapters moved
        torch.testing.assert_close(layer.base.weight, before[f"{name}.weight"])
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())
    assert dreambooth.dreambooth(sd3, images[:2], ["sks face"] * 2,
                                 config=dreambooth.DreamBoothConfig(steps=1, prior_weight=0.0)).steps == 1
    assert textual_inversion.textual_inversion(sd3, images[:2], ["a sks emoji"] * 2, steps=1,
                                               batch_size=2).steps == 1
    fast = copy.deepcopy(sd3)
    assert lcm.distill_lcm_lora(fast, images, captions, targets=("*.qkv", "*.out"), steps=1, batch_size=2).steps == 1
    assert torch.isfinite(fast(captions[:1], seed=0, settings=lcm.LCMConfig().sampler(2))).all()


def test_controlnet_refuses_a_transformer_saying_why(sd3):
    with pytest.raises(TypeError, match="a ControlNet copies a U-Net's encoder.*got a MMDiT"):
        controlnet.ControlNet.from_unet(sd3.unet)
