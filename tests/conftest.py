"""Shared set-up for the unit tests: a headless matplotlib backend and a one-thread fixture.

Quick mode is set for the whole suite by the repository's root conftest.py.
"""

import matplotlib
import pytest
import torch

# No display in CI: draw figures into memory only.
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second torch thread costs more than it gives, most of all on a shared machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipe():
    """An untrained in-memory text-to-image pipeline (tiny tokenizer, mini CLIP, VAE and U-Net), with the
    cross-attention's zero-initialised proj_out perturbed so that the prompt reaches the image."""
    from course_lib.data import load_emoji
    from course_lib.pipeline import TextToImage
    from course_lib.schedules import make_schedule
    from course_lib.clip import MiniCLIP, clip_config
    from course_lib.tokenizer import Tokenizer
    from course_lib.unet import UNet, get_preset
    from course_lib.vae import VAE
    from course_lib.vae import vae_preset

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(load_emoji(size=8, limit=200).captions, vocab_size=128)
    clip = MiniCLIP(clip_config("tiny", tokenizer.vocab_size))
    vae = VAE(vae_preset("tiny"))
    latent_c, latent_h, _ = vae.config.latent_shape
    unet = UNet(get_preset("sd_tiny", image_size=latent_h, in_channels=latent_c, out_channels=latent_c,
                           context_dim=clip.config.text.width))
    for module in unet.modules():
        if hasattr(module, "proj_out"):
            torch.nn.init.normal_(module.proj_out.weight, std=0.05)
    return TextToImage(unet, make_schedule("scaled_linear", 1000), clip, tokenizer, vae, scale_factor=0.5)
