"""The diffusion transformer (course_lib.dit), SD 3's MMDiT (course_lib.mmdit) and SD 3's timestep shift
(course_lib.schedules.time_shift): patches, adaLN-Zero's identity at initialisation, the joint attention and its
text mask, parity with diffusers 0.42 (weights copied in by the mapping below), the shift against diffusers'
FlowMatchEulerDiscreteScheduler, training and exact resume with the course's Trainer, sampling through
Trainer.sample and TextToImage with classifier-free guidance, the model file, and errors that name what is wrong.

Tiny configs throughout (16 tokens of width 64): the whole file runs in seconds on one thread.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib import checkpoint as ckpt
from course_lib.attention import naive_attention
from course_lib.dit import (DiT, DiTBlock, DiTConfig, dit_preset, masked_mean, patchify, sincos_2d, unpatchify)
from course_lib.mmdit import MMDiT, MMDiTBlock, MMDiTConfig, joint_attention, mmdit_preset
from course_lib.schedules import FlowSchedule, make_schedule, time_shift
from course_lib.unet import UNet, timestep_embedding
from course_lib.unet_file import architecture_of, build_model, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5                                  # float32 parity with diffusers: max abs difference


def perturbed(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """The model with every parameter moved by a little noise: the zero-initialised modulations and final layer
    become non-zero, so the text, the time and every block reach the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return model


def text(batch: int = 2, length: int = 5, dim: int = 64, real: tuple[int, ...] = (5, 3), seed: int = 1):
    """Random text states (B, L, D) and a mask with `real` tokens at the start of each row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.tensor(real)[:, None]
    return torch.randn(batch, length, dim, generator=gen), mask


# --- patches and positions --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, p", [((2, 4, 8, 8), 2), ((1, 3, 12, 8), 4), ((2, 1, 6, 9), 3), ((1, 2, 4, 4), 1)])
def test_patchify_then_unpatchify_is_the_identity(shape, p):
    x = torch.randn(shape)
    tokens = patchify(x, p)
    assert tokens.shape == (shape[0], (shape[2] // p) * (shape[3] // p), p * p * shape[1])
    assert torch.equal(unpatchify(tokens, p, shape[2] // p, shape[3] // p), x)
    assert torch.equal(tokens[0, 1], x[0, :, :p, p:2 * p].permute(1, 2, 0).flatten())   # row-major, (p1 p2 c)


def test_the_sincos_table_is_diffusers_2d_table():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    theirs = get_2d_sincos_pos_embed(64, 4, base_size=4, output_type="pt")
    assert (sincos_2d(64, 4, 4) - theirs).abs().max() < 1e-6


# --- adaLN-Zero: the identity at initialisation ---------------------------------------------------------------

def test_a_new_block_is_exactly_the_identity_and_a_new_network_predicts_exactly_zero():
    torch.manual_seed(0)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(DiTBlock(64, 4)(x, c), x)
    y, mask = text()
    image, txt = MMDiTBlock(mmdit_preset("mmdit_tiny"))(x, y, c, mask)
    assert torch.equal(image, x) and torch.equal(txt, y)
    image, txt = MMDiTBlock(mmdit_preset("mmdit_tiny"), last=True)(x, y, c, mask)
    assert torch.equal(image, x) and txt is None                   # the last text stream is discarded
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    for model in (DiT(dit_preset("dit_tiny", context_dim=None)), DiT(dit_preset("dit_tiny")),
                  MMDiT(mmdit_preset("mmdit_tiny"))):
        cond = () if not model.config.conditional else (y, mask)
        assert torch.equal(model(z, t, *cond), torch.zeros_like(z))
        assert not torch.equal(perturbed(model)(z, t, *cond), torch.zeros_like(z))


# --- the joint attention and the text mask ------------------------------------------------------------------

def test_joint_attention_is_plain_attention_over_the_concatenated_sequence():
    gen = torch.Generator().manual_seed(0)
    B, heads, L, N, d = 2, 4, 5, 16, 8
    text_qkv = [torch.randn(B, heads, L, d, generator=gen) for _ in range(3)]
    image_qkv = [torch.randn(B, heads, N, d, generator=gen) for _ in range(3)]
    _, mask = text(real=(5, 2))
    for m in (None, mask):
        keys = None if m is None else torch.cat([m, torch.ones(B, N, dtype=torch.bool)], 1)[:, None, None, :]
        whole = naive_attention(*(torch.cat([y, x], dim=2) for y, x in zip(text_qkv, image_qkv)), keys)
        text_out, image_out = joint_attention(text_qkv, image_qkv, m)
        assert (text_out - whole[:, :, :L]).abs().max() < 1e-6 and (image_out - whole[:, :, L:]).abs().max() < 1e-6
    # masked text tokens are as if absent: the second prompt's 2 real tokens alone give the same image rows
    short = [z[1:, :, :2] for z in text_qkv]
    _, alone = joint_attention(short, [z[1:] for z in image_qkv])
    assert (image_out[1:] - alone).abs().max() < 1e-6


def test_what_padding_holds_changes_nothing_and_the_mask_matters():
    torch.manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    y, mask = text(real=(5, 3))
    other = torch.where(mask[..., None], y, 5 * torch.randn_like(y))              # new values at the padding only
    for model in (perturbed(DiT(dit_preset("dit_tiny"))), perturbed(MMDiT(mmdit_preset("mmdit_tiny")))):
        with torch.no_grad():
            out = model(z, t, y, mask)
            assert (model(z, t, other, mask) - out).abs().max() < 1e-6
            assert (model(z, t, other) - out)[1].abs().max() > 1e-3         # unmasked, the padding is read
    assert torch.equal(masked_mean(y, mask)[0], y[0].mean(0))


# --- parity with diffusers 0.42 --------------------------------------------------------------------------------

def copy_linear(ours: nn.Linear, *theirs: nn.Linear, swap_halves: bool = False) -> None:
    """ours <- theirs; several are stacked along the output (q, k, v into one qkv). swap_halves: AdaLayerNormContinuous
    gives (scale, shift) where ours gives (shift, scale)."""
    w, b = torch.cat([m.weight for m in theirs]), torch.cat([m.bias for m in theirs])
    if swap_halves:
        w, b = (torch.cat(z.chunk(2)[::-1]) for z in (w, b))
    with torch.no_grad():
        ours.weight.copy_(w)
        ours.bias.copy_(b)


def copy_stream(ours: DiTBlock, modulation: nn.Linear, q: nn.Linear, k: nn.Linear, v: nn.Linear, out=None, ff=None,
                q_norm=None, k_norm=None, swap_halves: bool = False) -> None:
    """A DiTBlock (one stream) <- diffusers' adaLN linear, q/k/v projections, output projection, feed-forward
    (ff.net[0].proj, ff.net[2]: GELU-tanh MLP) and RMS norms of q and k."""
    copy_linear(ours.modulation.linear, modulation, swap_halves=swap_halves)
    copy_linear(ours.qkv, q, k, v)
    if out is not None:
        copy_linear(ours.out, out)
        copy_linear(ours.mlp.fc1, ff.net[0].proj)
        copy_linear(ours.mlp.fc2, ff.net[2])
    with torch.no_grad():
        for mine, theirs in ((ours.q_norm, q_norm), (ours.k_norm, k_norm)):
            if theirs is not None:
                mine.weight.copy_(theirs.weight)


def copy_joint_block(ours: MMDiTBlock, theirs) -> None:
    """MMDiTBlock <- JointTransformerBlock: image stream from attn.to_*, norm1, ff; text from attn.add_*_proj,
    norm1_context, ff_context (a pre-only text stream: AdaLayerNormContinuous, no output, no MLP)."""
    a = theirs.attn
    copy_stream(ours.image, theirs.norm1.linear, a.to_q, a.to_k, a.to_v, a.to_out[0], theirs.ff, a.norm_q, a.norm_k)
    last = theirs.context_pre_only
    copy_stream(ours.text, theirs.norm1_context.linear, a.add_q_proj, a.add_k_proj, a.add_v_proj,
                None if last else a.to_add_out, theirs.ff_context, a.norm_added_q, a.norm_added_k, swap_halves=last)


def copy_conv_as_linear(ours: nn.Linear, conv: nn.Conv2d) -> None:
    """A stride-p p x p convolution is a Linear on patchify's (p1 p2 c) vectors: weight (D, C, p, p) -> (D, p p C)."""
    with torch.no_grad():
        ours.weight.copy_(conv.weight.permute(0, 2, 3, 1).flatten(1))
        ours.bias.copy_(conv.bias)


def test_the_sinusoids_are_diffusers_with_no_frequency_shift():
    """The course's sinusoid (course_lib.unet) is diffusers' get_timestep_embedding with flip_sin_to_cos and
    downscale_freq_shift=0, as SD 3's time embedding uses it; diffusers' DiT uses downscale_freq_shift=1
    (frequencies 10000^(-k / (half - 1))), which is why the whole-DiT parity below starts from the conditioning."""
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 3.0, 250.5, 999.0])
    assert (timestep_embedding(t, 256) - get_timestep_embedding(t, 256, True, 0)).abs().max() < 1e-5
    assert (timestep_embedding(t, 256) - get_timestep_embedding(t, 256, True, 1)).abs().max() > 1e-2


def test_dit_matches_diffusers_dit_transformer():
    """The DiT block against BasicTransformerBlock(norm_type="ada_norm_zero") as DiTTransformer2DModel builds it,
    and the whole DiT against DiTTransformer2DModel from the conditioning vector on (`DiT.backbone`).

    Not compared: how c is made. diffusers' DiT is class-conditional: every block holds its own copy of a
    timestep-and-label embedding (CombinedTimestepLabelEmbeddings, sinusoids with downscale_freq_shift=1), and
    the final layer reads block 0's; the course's DiT has one time embedding (with the U-Net's sinusoids) plus the
    pooled text. So the blocks' embeddings are given the same weights, c is taken from block 0's, and both
    networks run from the same c. norm_eps=1e-6 is passed (DiT's own; diffusers' default 1e-5 applies to the
    norm before the MLP only)."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    theirs = perturbed(DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                             out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                             num_embeds_ada_norm=10, norm_eps=1e-6)).eval()
    for block in theirs.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    ours = DiT(DiTConfig(image_size=8, in_channels=4, out_channels=4, patch_size=2, width=64, depth=2, heads=4)).eval()
    copy_conv_as_linear(ours.patch_embed.proj, theirs.pos_embed.proj)
    for mine, block in zip(ours.blocks, theirs.transformer_blocks):
        a = block.attn1
        copy_stream(mine, block.norm1.linear, a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff)
    copy_linear(ours.final.modulation.linear, theirs.proj_out_1)
    copy_linear(ours.final.linear, theirs.proj_out_2)

    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 7])
    with torch.no_grad():
        c = theirs.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=torch.float32)
        h = theirs.pos_embed(x)
        block_diff = (ours.blocks[0](ours.patch_embed(x), c) - theirs.transformer_blocks[0](
            h, timestep=t, class_labels=labels)).abs().max().item()
        whole_diff = (ours.backbone(x, c) - theirs(x, timestep=t, class_labels=labels).sample).abs().max().item()
    print(f"DiT parity with diffusers: block {block_diff:.2e}, whole {whole_diff:.2e}")
    assert block_diff < TOL and whole_diff < TOL


@pytest.mark.parametrize("last", [False, True])
def test_mmdit_block_matches_diffusers_joint_transformer_block(last):
    """An MMDiT block against diffusers' JointTransformerBlock with qk_norm="rms_norm" (the last one: the text stream
    pre-only, context_pre_only=True). diffusers concatenates [image; text] and has no text mask: the mask is all
    True here (the order of the keys changes only the summation order)."""
    from diffusers.models.attention import JointTransformerBlock
    torch.manual_seed(0)
    theirs = perturbed(JointTransformerBlock(64, 4, 16, context_pre_only=last, qk_norm="rms_norm")).eval()
    ours = MMDiTBlock(mmdit_preset("mmdit_tiny"), last=last).eval()
    copy_joint_block(ours, theirs)
    x, y, c = torch.randn(2, 16, 64), torch.randn(2, 5, 64), torch.randn(2, 64)
    with torch.no_grad():
        their_text, their_image = theirs(x, y, c)
        image, txt = ours(x, y, c, torch.ones(2, 5, dtype=torch.bool))
    diff = (image - their_image).abs().max().item()
    if not last:
        diff = max(diff, (txt - their_text).abs().max().item())
    print(f"MMDiT block parity with diffusers (last={last}): {diff:.2e}")
    assert diff < TOL and (txt is None) == last


def test_mmdit_matches_diffusers_sd3_transformer():
    """The whole MMDiT against SD3Transformer2DModel (qk_norm="rms_norm", pos_embed_max_size = the table's 4x4
    patches). SD 3's time embedding is the course's (256 sinusoids, no frequency shift, Linear-SiLU-Linear) and its
    pooled projection has TextPool's shape, so everything corresponds: SD 3 is given the pooled vector the course
    computes (the masked mean of the text states; all tokens real, as SD 3 has no mask)."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    theirs = perturbed(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                             attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                             caption_projection_dim=64, pooled_projection_dim=64, out_channels=4,
                                             pos_embed_max_size=4, qk_norm="rms_norm")).eval()
    ours = MMDiT(mmdit_preset("mmdit_tiny")).eval()
    copy_conv_as_linear(ours.patch_embed.proj, theirs.pos_embed.proj)
    tt = theirs.time_text_embed
    for mine, linear in zip((ours.time_embed.mlp[0], ours.time_embed.mlp[2], ours.text_pool.mlp[0],
                             ours.text_pool.mlp[2], ours.context_embed, ours.final.linear),
                            (tt.timestep_embedder.linear_1, tt.timestep_embedder.linear_2, tt.text_embedder.linear_1,
                             tt.text_embedder.linear_2, theirs.context_embedder, theirs.proj_out)):
        copy_linear(mine, linear)
    copy_linear(ours.final.modulation.linear, theirs.norm_out.linear, swap_halves=True)
    for mine, block in zip(ours.blocks, theirs.transformer_blocks):
        copy_joint_block(mine, block)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9]) * 1000
    y, _ = text()
    with torch.no_grad():
        diff = (ours(x, t, y) - theirs(x, y, masked_mean(y, None), t).sample).abs().max().item()
    print(f"MMDiT parity with diffusers' SD3Transformer2DModel: {diff:.2e}")
    assert diff < TOL


# --- SD 3's timestep shift --------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_the_shift_matches_diffusers_flow_match_euler_scheduler(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n) shifts an even grid from 1 down to its
    sigma_min (1/1000 shifted once already, at construction) with t' = s t / (1 + (s - 1) t): time_shift on that grid
    gives its sigmas. The course's grid is even from 1 down to 1/n before the shift; given those as sigmas, diffusers
    shifts them to the course's FlowSchedule(shift=s).grid(n)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    n = 10
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    unshifted = torch.linspace(1, sched.sigma_min, n, dtype=torch.float64)
    assert (time_shift(unshifted, shift) - sched.sigmas[:-1].double()).abs().max() < 1e-6
    sched.set_timesteps(sigmas=torch.linspace(1, 0, n + 1)[:-1].tolist())
    assert (torch.tensor(FlowSchedule(shift=shift).grid(n)) - sched.sigmas[:-1]).abs().max() < 1e-6


def test_the_shift_moves_times_towards_the_noise_and_keeps_the_ends():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(time_shift(t, 1.0), t)
    shifted = time_shift(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert (time_shift(shifted, 1 / 3.0) - t).abs().max() < 1e-12                    # 1/s undoes s
    ratio = (shifted / (1 - shifted))[1:-1] / (t / (1 - t))[1:-1]                     # the noise-to-signal ratio
    assert (ratio - 3).abs().max() < 1e-12
    assert FlowSchedule().grid(4) == [1.0, 0.75, 0.5, 0.25]                            # no shift: as before
    grid = FlowSchedule(shift=3.0).grid(4, start=0.6)
    assert abs(grid[0] - 0.6) < 1e-6 and sorted(grid, reverse=True) == grid
    draws = FlowSchedule(shift=3.0).draw_times(1000, torch.Generator().manual_seed(0))
    plain = FlowSchedule().draw_times(1000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, time_shift(plain, 3.0))


# --- the course's Trainer, sampling and TextToImage ---------------------------------------------------------

def flow_trainer(model: nn.Module, steps: int = 6, **changes):
    from course_lib.train import Conditioning, Trainer, TrainConfig
    gen = torch.Generator().manual_seed(123)
    latents = torch.randn(16, 4, 8, 8, generator=gen)
    states, mask = text(batch=16, length=6, real=tuple(range(1, 7)) * 2 + (6, 6, 6, 6), seed=2)
    null_mask = torch.arange(6) < 2
    cond = Conditioning(states, mask, torch.randn(6, 64, generator=gen), null_mask)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup=2, latents=True, precision="fp32",
                         objective="flow", timestep_sampling="logit_normal", timestep_shift=2.0, **changes)
    return Trainer(model, latents, config, conditioning=cond)


@pytest.mark.parametrize("architecture", ["dit", "mmdit"])
def test_the_trainer_trains_and_resumes_exactly(architecture, tmp_path):
    from course_lib.train import Trainer

    def fresh():
        torch.manual_seed(0)
        return DiT(dit_preset("dit_tiny")) if architecture == "dit" else MMDiT(mmdit_preset("mmdit_tiny"))

    straight = flow_trainer(fresh()).train(progress=False)
    interrupted = flow_trainer(fresh())
    interrupted.train(3, progress=False)
    interrupted.save(tmp_path / "run.safetensors")
    resumed = Trainer.resume(tmp_path / "run.safetensors", interrupted.images, conditioning=interrupted.conditioning)
    assert type(resumed.model) is type(straight.model) and resumed.step == 3
    resumed.train(progress=False)
    assert resumed.losses == straight.losses and len(straight.losses) == 6
    for a, b in ((resumed.model, straight.model), (resumed.ema_model, straight.ema_model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert straight.path.shift == 2.0


def test_trainer_sample_guides_the_transformer_at_the_shifted_times():
    from course_lib.guidance import GuidedModel
    trainer = flow_trainer(perturbed(MMDiT(mmdit_preset("mmdit_tiny"))))
    seen = []
    trainer.ema_model.register_forward_pre_hook(lambda module, args: seen.append(args[1][0].item()))
    out = trainer.sample(2, steps=3, guidance_scale=3.0)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    expected = time_shift(torch.linspace(1, 0, 4, dtype=torch.float64)[:-1], 2.0) * 1000
    assert torch.tensor(seen).double().sub(expected).abs().max() < 1e-3               # the guided batch: one call
    unguided = trainer.sample(2, steps=3, guidance_scale=1.0)
    assert (out - unguided).abs().max() > 1e-4
    # guidance is the course's GuidedModel around the transformer: the same call works by hand
    c, m = trainer.conditioning.batch(torch.arange(2))
    null = trainer.conditioning.null_context[None]
    guided = GuidedModel(trainer.ema_model, c, m, null, trainer.conditioning.null_mask[None], 3.0)
    assert guided(torch.zeros(2, 4, 8, 8), torch.full((2,), 500.0)).shape == (2, 4, 8, 8)


def test_save_load_round_trip_and_the_pipeline_from_files(tmp_path):
    """An MMDiT for the shipped mini CLIP (128-d text states) and VAE (4x8x8 latents), saved as a model file with
    its shift, loads back as what it was and drives TextToImage.from_files with classifier-free guidance."""
    from course_lib.pipeline import TextToImage
    torch.manual_seed(0)
    model = perturbed(MMDiT(mmdit_preset("mmdit_tiny", context_dim=128)), std=0.1)
    path = save_model(tmp_path / "mmdit.safetensors", model, schedule=make_schedule("linear"), prediction="flow",
                      shift=3.0, info={"note": "test"})
    loaded, schedule, info = load_model(path)
    assert type(loaded) is MMDiT and loaded.config == model.config and info["prediction"] == "flow"
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    pipe = TextToImage.from_files(path, ckpt.shipped("clip_emoji"), ckpt.shipped("vae_emoji32"))
    assert type(pipe.unet) is MMDiT and pipe.schedule.shift == 3.0
    images = pipe(["red heart", "pizza"], steps=2, guidance_scale=4.0, seed=1)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    z = pipe(["red heart", "pizza"], steps=2, guidance_scale=4.0, seed=1, return_latents=True)
    assert (z[0] - pipe(["pizza", "red heart"], steps=2, guidance_scale=4.0, seed=1, return_latents=True)[1]
            ).abs().max() > 1e-4                                                  # the prompt reaches the image
    dit_path = save_model(tmp_path / "dit.safetensors", DiT(dit_preset("dit_tiny", context_dim=None)),
                          schedule=make_schedule("linear"), prediction="v")
    assert type(load_model(dit_path)[0]) is DiT and architecture_of(MMDiT(mmdit_preset("mmdit_tiny"))) == "mmdit"


def test_a_shipped_unet_file_still_loads_as_it_was():
    """Files written before the transformers have no "architecture": they are U-Nets."""
    tensors, metadata = ckpt.read(ckpt.shipped("tiny_sd_emoji"))
    assert "architecture" not in metadata and "timestep_shift" not in metadata
    model, schedule, info = load_model(ckpt.shipped("tiny_sd_emoji"))
    assert type(model) is UNet and type(build_model(metadata)) is UNet and info["prediction"] == metadata["prediction"]
    assert all(torch.equal(value, tensors[f"model.{name}"].float()) for name, value in model.state_dict().items())
    assert getattr(schedule, "shift", 1.0) == 1.0


# --- errors that name what is wrong ----------------------------------------------------------------------

def test_bad_configs_and_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"image_size \(8\) must be divisible by patch_size \(3\)"):
        DiTConfig(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match=r"width \(60\) must be divisible by heads \(8\)"):
        DiTConfig(width=60, heads=8)
    with pytest.raises(ValueError, match="an MMDiT joins a text stream"):
        MMDiTConfig(context_dim=None)
    with pytest.raises(ValueError, match="qk_norm must be True or False"):
        DiTConfig(qk_norm="rms_norm")
    with pytest.raises(TypeError, match="an MMDiT is built from an MMDiTConfig"):
        MMDiT(DiTConfig())
    with pytest.raises(ValueError, match=r"unknown DiT preset 'dit_huge'; choose from \['dit_tiny', 'dit_small'\]"):
        dit_preset("dit_huge")
    dit, mmdit = DiT(dit_preset("dit_tiny")), MMDiT(mmdit_preset("mmdit_tiny"))
    y, mask = text()
    with pytest.raises(ValueError, match=r"image height must be a multiple of patch_size=2"):
        dit(torch.randn(2, 4, 7, 8), 10, y, mask)
    with pytest.raises(ValueError, match=r"the positional table holds 4x4 patches \(config.image_size 8 / patch_size 2"
                                         r"\); this input needs 8x8"):
        mmdit(torch.randn(2, 4, 16, 16), 10, y, mask)
    with pytest.raises(ValueError, match=r"this MMDiT is text-conditioned \(context_dim=64\): pass context"):
        mmdit(torch.randn(2, 4, 8, 8), 10)
    with pytest.raises(ValueError, match=r"this DiT is unconditional \(config.context_dim is None\)"):
        DiT(dit_preset("dit_tiny", context_dim=None))(torch.randn(2, 4, 8, 8), 10, y, mask)
    with pytest.raises(ValueError, match=r"t must be finite timesteps in \[-1, 1000\]"):
        dit(torch.randn(2, 4, 8, 8), 1500, y, mask)
    with pytest.raises(ValueError, match=r"context must have shape \(B, L, context_dim\) = \(2, L, 64\)"):
        mmdit(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 5, 32))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but this DiT's parameters are torch.float32"):
        dit(torch.randn(2, 4, 8, 8, dtype=torch.float64), 10, y, mask)
    assert mmdit(torch.randn(2, 4, 4, 6), 10, y, mask).shape == (2, 4, 4, 6)     # smaller: the table's centre


def test_bad_shifts_and_architectures_are_refused_by_name(tmp_path):
    from course_lib.train import TrainConfig
    with pytest.raises(ValueError, match=r"the timestep shift must be a finite number > 0 .*; got 0"):
        FlowSchedule(shift=0)
    with pytest.raises(ValueError, match=r"timestep_sampling applies to objective 'flow' \(and so does timestep_shift"):
        TrainConfig(timestep_shift=3.0)
    with pytest.raises(ValueError, match="a timestep shift moves a flow's times"):
        save_model(tmp_path / "m.safetensors", DiT(dit_preset("dit_tiny")), schedule=make_schedule("linear"),
                   prediction="epsilon", shift=3.0)
    with pytest.raises(ValueError, match=r"unknown architecture 'vit'; choose from \['unet', 'dit', 'mmdit'\]"):
        build_model({"architecture": "vit", "unet_config": "{}"})
    with pytest.raises(TypeError, match="a model file holds one of UNet, DiT, MMDiT; got Linear"):
        architecture_of(nn.Linear(2, 2))
