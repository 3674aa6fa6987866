"""How closely course_lib's Stable Diffusion matches diffusers and transformers: a table of max absolute differences.

    python scripts/sd_parity.py            # CPU, float32, a few seconds; needs the test extra (diffusers, transformers)

diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel are built with small random configs
in SD 1.x's layout (three U-Net levels: attention, attention, none), their state dicts converted into course_lib's
modules (course_lib.sd_convert), and the same inputs run through both. The last row runs diffusers'
StableDiffusionPipeline and course_lib's StableDiffusion with the same components, SD 1.5's DDIM settings
(course_lib.sd.SD15_SAMPLER), guidance 7.5 and the same starting latents, and compares the final latents.
tests/test_sd.py asserts every row is at most 1e-4 and builds its models with the functions below.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import sd, sd_convert  # noqa: E402
from course_lib.clip_tokenizer import CLIPTokenizer, bytes_to_unicode  # noqa: E402
from course_lib.text import TextEncoder  # noqa: E402
from course_lib.unet import UNet  # noqa: E402
from course_lib.vae import VAE  # noqa: E402

TOL = 1e-4          # the bound tests/test_sd.py asserts, float32


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


def small_unet():
    import diffusers
    return _seeded(lambda: diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8))


def small_vae():
    import diffusers
    return _seeded(lambda: diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16), seed=1)


def small_text_encoder(vocab_size=1000):
    import transformers
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=128,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                         hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
                                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return _seeded(lambda: transformers.CLIPTextModel(config), seed=2)


def write_tokenizer(folder: Path, vocab_size: int = 1000) -> Path:
    """A byte-level CLIP vocabulary: 512 byte pieces, merges for a few words, filler, the two special tokens last."""
    chars = list(bytes_to_unicode().values())
    pieces = chars + [c + "</w>" for c in chars]
    merges = [("r", "e"), ("re", "d</w>"), ("f", "o"), ("fo", "x</w>"), ("a", "t</w>"), ("c", "at</w>")]
    pieces += [a + b for a, b in merges]
    pieces += [f"filler{i}" for i in range(vocab_size - 2 - len(pieces))]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def diffusers_pipeline(folder: Path):
    """diffusers' StableDiffusionPipeline from the small networks, a tokenizer read from files written to `folder`,
    and SD 1.5's DDIM settings. Returns (pipeline, tokenizer folder)."""
    import diffusers
    import transformers
    tok_folder = write_tokenizer(folder / "tok")
    tokenizer = transformers.CLIPTokenizer(str(tok_folder / "vocab.json"), str(tok_folder / "merges.txt"),
                                           model_max_length=77)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=small_vae(), text_encoder=small_text_encoder(), tokenizer=tokenizer,
                                             unet=small_unet(), scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, tok_folder


def convert(kind, theirs, config):
    ours = kind(config).eval()
    sd_convert.load_weights(ours, theirs.state_dict(), "diffusers")
    return ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def measure() -> list[tuple[str, float, float]]:
    """(what, max |difference|, max |value| of diffusers' output) for each network and the sampler loop."""
    rows = []
    g = torch.Generator().manual_seed(0)
    unet = small_unet()
    ours = convert(UNet, unet, sd_convert.unet_config_from_diffusers(dict(unet.config)))
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    ref = unet(x, t, encoder_hidden_states=c).sample
    rows.append(("U-Net (UNet2DConditionModel)", max_diff(ours(x, t, c), ref), ref.abs().max().item()))

    vae = small_vae()
    ours = convert(VAE, vae, sd_convert.vae_config_from_diffusers(dict(vae.config)))
    images, z = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    post, mine = vae.encode(images).latent_dist, ours.encode(images)
    rows.append(("VAE encoder, posterior mean", max_diff(mine.mean, post.mean), post.mean.abs().max().item()))
    rows.append(("VAE encoder, posterior log-variance", max_diff(mine.logvar, post.logvar),
                 post.logvar.abs().max().item()))
    ref = vae.decode(z).sample
    rows.append(("VAE decoder (AutoencoderKL)", max_diff(ours.decode(z), ref), ref.abs().max().item()))

    text = small_text_encoder()
    ours = convert(TextEncoder, text, sd_convert.text_config_from_transformers(text.config.to_dict()))
    ids = torch.randint(0, 998, (2, 77), generator=g)
    ref = text(ids).last_hidden_state
    rows.append(("text encoder (CLIPTextModel), all 77 states", max_diff(ours(ids, None), ref), ref.abs().max().item()))

    with tempfile.TemporaryDirectory() as folder:
        pipe, tok_folder = diffusers_pipeline(Path(folder))
        model = sd.StableDiffusion.from_diffusers_modules(pipe.unet, pipe.vae, pipe.text_encoder,
                                                          CLIPTokenizer.from_directory(tok_folder))
    prompts, latents = ["a red fox", "cat"], torch.randn(2, 4, 8, 8, generator=g)
    ref = pipe(prompts, height=16, width=16, num_inference_steps=6, guidance_scale=7.5, latents=latents.clone(),
               output_type="latent").images
    got = model(prompts, height=16, width=16, steps=6, guidance_scale=7.5, latents=latents, return_latents=True)
    rows.append(("sampler loop: 6 DDIM steps, guidance 7.5 (StableDiffusionPipeline)", max_diff(got, ref),
                 ref.abs().max().item()))
    return rows


def main() -> None:
    torch.set_num_threads(1)
    rows = measure()
    width = max(len(r[0]) for r in rows)
    print(f"course_lib vs diffusers {__import__('diffusers').__version__} / transformers "
          f"{__import__('transformers').__version__}, float32, CPU")
    print(f"{'':{width}}  {'max |diff|':>11}  {'max |value|':>11}  within {TOL:g}")
    for what, diff, scale in rows:
        print(f"{what:{width}}  {diff:11.2e}  {scale:11.3f}  {'yes' if diff <= TOL else 'NO'}")
    if any(diff > TOL for _, diff, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
