"""The U-Net: shapes, errors (shapes, dtypes, configs), gradients, time embedding, checkpointing, configs, and
text conditioning (the context's checks, masks, padding).

The blocks are also checked against diffusers' (the reference implementation) with copied weights:
our ResBlock against ResnetBlock2D in both time-conditioning modes, and the sinusoidal embedding and time MLP
against get_timestep_embedding and TimestepEmbedding. The attention layers have their own file,
tests/test_attention.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.attention import SelfAttention, SpatialTransformer
from course_lib.checkpoint import shipped
from course_lib.unet_file import load_model
from course_lib.unet import (PRESETS, SD_PRESETS, TIME_CONDITIONING, Block, Downsample, ResBlock, UNet, UNetConfig,
                             Upsample, count_parameters, get_preset, preset_table, timestep_embedding)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str = "tiny", seed: int = 0, **changes) -> UNet:
    torch.manual_seed(seed)
    return UNet(get_preset(name, **changes))


def _inputs(batch: int, channels: int, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


# --- shapes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_output_shape_equals_input_shape_for_every_preset(name):
    model = _model(name)
    x, t = _inputs(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x, t).shape == x.shape


@pytest.mark.parametrize("name, height, width", [("tiny", 32, 16), ("tiny", 8, 8), ("small", 16, 24),
                                                  ("small", 4, 4), ("base", 24, 16)])
def test_other_and_non_square_sizes(name, height, width):
    model = _model(name, image_size=min(height, width))
    x, t = _inputs(1, 3, height, width)
    with torch.no_grad():
        assert model(x, t).shape == (1, 3, height, width)


def test_other_channel_counts():
    model = UNet(get_preset("tiny", in_channels=4, out_channels=8))   # e.g. a latent in, mean and variance out
    x, t = _inputs(2, 4, 8, 8)
    with torch.no_grad():
        assert model(x, t).shape == (2, 8, 8, 8)


def test_scalar_and_float_timesteps():
    model = _model().eval()
    x, _ = _inputs(3, 3, 16, 16)
    with torch.no_grad():
        by_int = model(x, 7)
        torch.testing.assert_close(by_int, model(x, torch.full((3,), 7)))
        torch.testing.assert_close(by_int, model(x, torch.tensor(7.0)))
        assert model(x, torch.tensor([0.5, 10.25, 999.9])).shape == x.shape


# --- bad input and bad configs ------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, message", [
    ("tiny", (1, 3, 31, 32), "image height must be a multiple of 2"),
    ("tiny", (1, 3, 32, 15), "image width must be a multiple of 2"),
    ("small", (1, 3, 18, 32), "image height must be a multiple of 4"),
    ("small", (1, 3, 2, 2), "image height must be a multiple of 4"),
    ("tiny", (1, 1, 32, 32), "x must have shape (B, 3, H, W); got (1, 1, 32, 32)"),
    ("tiny", (1, 4, 32, 32), "x must have shape (B, 3, H, W)"),
    ("tiny", (3, 32, 32), "x must have shape (B, 3, H, W); got (3, 32, 32)"),
])
def test_bad_image_shapes_are_rejected_with_a_clear_message(name, shape, message):
    model = _model(name)
    with pytest.raises(ValueError) as err:
        model(torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long))
    assert message in str(err.value)


def test_bad_timestep_shape_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match=r"t must be one timestep per image, shape \(2,\); got \(3,\)"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match=r"got \(2, 1\)"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_an_image_of_another_dtype_is_refused_naming_both_dtypes_and_the_fixes(dtype):
    model = _model().eval()
    x, t = _inputs(2, 3, 16, 16)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype} but this U-Net's parameters are torch.float32: .*"
                                        r"x\.float\(\).*model\.half\(\).*torch\.autocast"):
        model(x.to(dtype), t)


def test_a_context_of_another_dtype_is_refused():
    model = _model("sd_tiny").eval()
    x, t = _inputs(2, 4, 8, 8)
    context, mask = _context(2, 5)
    with pytest.raises(TypeError, match=r"context has dtype torch.float64 but this U-Net's parameters are "
                                        r"torch.float32: .*context\.float\(\)"):
        model(x, t, context.double(), mask)


def test_a_cast_model_takes_inputs_of_its_dtype():
    """model.half() (what the message suggests) works: the float32 sinusoids are cast to the time MLP's dtype."""
    model = _sd_model()
    x, t = _inputs(2, 4, 8, 8)
    context, mask = _context(2, 5)
    with torch.no_grad():
        ref = model(x, t, context, mask)
        for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.1), (torch.float16, 2e-2)):
            cast = _sd_model().to(dtype)
            out = cast(x.to(dtype), t, context.to(dtype), mask)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        with pytest.raises(TypeError, match=r"x has dtype torch.float32 but this U-Net's parameters are "
                                            r"torch.float16"):
            cast(x, t, context.half(), mask)


def test_autocast_accepts_lower_precision_inputs_but_not_float64():
    model = _model().eval()
    x, t = _inputs(2, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert model(x.to(dtype), t).shape == x.shape
        with pytest.raises(TypeError, match="x has dtype torch.float64"):
            model(x.double(), t)


@pytest.mark.parametrize("changes, message", [
    (dict(norm_groups=7), "divisible by norm_groups=7; got 32 in channels=(32, 64, 64)"),
    (dict(channels=(32, 60, 64)), "divisible by norm_groups=8; got 60"),
    (dict(attention=(False, True)), "attention needs one True/False per level (3 levels); got 2"),
    (dict(attention=(False, True, True, True)), "(3 levels); got 4"),
    (dict(time_conditioning="film"), "unknown time_conditioning 'film'; choose from ['scale_shift', 'add']"),
    (dict(head_channels=48), "need channels divisible by head_channels=48; got 64 at level 1"),
    (dict(channels=(32, 64, 40)), "divisible by head_channels=32; got 40 at level 2"),
    (dict(blocks_per_level=0), "blocks_per_level must be at least 1; got 0"),
    (dict(image_size=30), "image_size must be a multiple of 4"),
    (dict(channels=(), attention=()), "channels needs at least one level"),
])
def test_invalid_configs_are_rejected_with_a_clear_message(changes, message):
    with pytest.raises(ValueError) as err:
        get_preset("small", **changes)
    assert message in str(err.value)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown U-Net preset 'huge'; choose from \['tiny', 'small', 'base'"):
        get_preset("huge")


def test_time_conditioning_names():
    assert TIME_CONDITIONING == ("scale_shift", "add")


# --- gradients -----------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    model = _model("tiny", blocks_per_level=2)   # two blocks a level: every kind of Block is on the path
    x, t = _inputs(2, 3, 16, 16)
    torch.nn.functional.mse_loss(model(x, t), torch.randn_like(x)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().max() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("time_conditioning", TIME_CONDITIONING)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(time_conditioning):
    plain = _model("tiny", blocks_per_level=2, time_conditioning=time_conditioning)
    ckpt = UNet(plain.config.replace(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs(2, 3, 16, 16)
    target = torch.randn_like(x)
    outputs, grads = [], []
    for model in (plain, ckpt):
        model.train()
        out = model(x, t)
        torch.nn.functional.mse_loss(out, target).backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# --- the time embedding ----------------------------------------------------------------------------------

def test_timestep_embedding_properties():
    t = torch.arange(0, 1000, 37)
    emb = timestep_embedding(t, 64)
    assert emb.shape == (len(t), 64) and emb.dtype == torch.float32
    # t = 0: every angle is 0, so the cosines (first half) are 1 and the sines (second half) are 0
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(32), torch.zeros(32)]))
    # the first frequency is 1: column 0 is cos(t), column 32 is sin(t)
    torch.testing.assert_close(emb[:, 0], torch.cos(t.double()).float())
    torch.testing.assert_close(emb[:, 32], torch.sin(t.double()).float())
    # every row lies on a sphere of radius sqrt(dim / 2) (cos^2 + sin^2 = 1 per frequency)
    torch.testing.assert_close(emb.norm(dim=1), torch.full((len(t),), 32 ** 0.5))
    # distinct timesteps get distinct rows
    assert torch.cdist(emb, emb).add(torch.eye(len(t)) * 1e9).min() > 0.1


def test_timestep_embedding_float_t():
    emb = timestep_embedding(torch.tensor([3, 4]), 16)
    torch.testing.assert_close(timestep_embedding(torch.tensor([3.0, 4.0]), 16), emb)
    half = timestep_embedding(torch.tensor([3.5]), 16)
    assert not torch.allclose(half, emb[:1]) and not torch.allclose(half, emb[1:])


def test_timestep_embedding_rejects_odd_dim():
    with pytest.raises(ValueError, match="must be even; got 7"):
        timestep_embedding(torch.tensor([1]), 7)


def test_time_changes_the_output():
    model = _model().eval()
    x, _ = _inputs(1, 3, 16, 16)
    with torch.no_grad():
        out = [model(x, torch.tensor([t])) for t in (0, 1, 500)]
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-3


@pytest.mark.parametrize("time_conditioning", TIME_CONDITIONING)
def test_both_time_conditionings_run_and_train(time_conditioning):
    model = _model(time_conditioning=time_conditioning)
    res = model.down[0][0].res
    assert res.time_conditioning == time_conditioning
    assert res.time_proj.out_features == (2 if time_conditioning == "scale_shift" else 1) * res.conv1.out_channels
    x, t = _inputs(2, 3, 16, 16)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_two_time_conditionings_compute_their_formulas_and_differ():
    """One ResBlock per mode with the same convs, norms and the same (shift or add) projection: each matches its
    formula written out here, and the two give different outputs for the same input and time embedding."""
    torch.manual_seed(0)
    blocks = {mode: ResBlock(8, 16, 32, time_conditioning=mode) for mode in ("scale_shift", "add")}
    ss, add = blocks["scale_shift"], blocks["add"]
    for name in ("norm1", "conv1", "norm2", "conv2", "skip"):
        getattr(add, name).load_state_dict(getattr(ss, name).state_dict())
    for p in (ss.norm2.weight, ss.norm2.bias):                  # non-trivial affine norms, so order matters
        nn.init.normal_(p)
    add.norm2.load_state_dict(ss.norm2.state_dict())
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 32)
    with torch.no_grad():
        h = ss.conv1(F.silu(ss.norm1(x)))
        scale, shift = ss.time_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        want_ss = ss.skip(x) + ss.conv2(F.silu(ss.norm2(h) * (1 + scale) + shift))
        want_add = add.skip(x) + add.conv2(F.silu(add.norm2(h + add.time_proj(F.silu(emb))[:, :, None, None])))
        got_ss, got_add = ss(x, emb), add(x, emb)
    torch.testing.assert_close(got_ss, want_ss)
    torch.testing.assert_close(got_add, want_add)
    assert (got_ss - got_add).abs().max() > 1e-2
    # and each really uses the time embedding
    with torch.no_grad():
        assert (ss(x, emb) - ss(x, -emb)).abs().max() > 1e-3 and (add(x, emb) - add(x, -emb)).abs().max() > 1e-3


# --- the blocks ------------------------------------------------------------------------------------------

def test_block_shapes():
    emb = torch.randn(2, 64)
    x = torch.randn(2, 16, 8, 8)
    assert ResBlock(16, 32, 64)(x, emb).shape == (2, 32, 8, 8)
    assert Downsample(16)(x).shape == (2, 16, 4, 4)
    assert Upsample(16)(x).shape == (2, 16, 16, 16)
    cfg = get_preset("tiny")
    assert Block(16, 32, cfg, attend=True)(x, torch.randn(2, cfg.time_channels)).shape == (2, 32, 8, 8)


# --- against diffusers, weights copied -----------------------------------------------------------------------

def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 10, 500, 999])
    # diffusers' UNet2DModel uses flip_sin_to_cos=True (cosines first) and freq_shift=0
    theirs = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), theirs)


def test_time_mlp_matches_diffusers():
    from diffusers.models.embeddings import TimestepEmbedding

    model = _model("small")
    theirs = TimestepEmbedding(32, 128)
    theirs.load_state_dict({"linear_1.weight": model.time_embed.mlp[0].weight,
                            "linear_1.bias": model.time_embed.mlp[0].bias,
                            "linear_2.weight": model.time_embed.mlp[2].weight,
                            "linear_2.bias": model.time_embed.mlp[2].bias})
    t = torch.tensor([0, 3, 999])
    torch.testing.assert_close(model.time_embed(t), theirs(timestep_embedding(t, 32)))


@pytest.mark.parametrize("time_conditioning, theirs_name", [("scale_shift", "scale_shift"), ("add", "default")])
@pytest.mark.parametrize("c_in, c_out", [(32, 32), (32, 64)])
def test_resblock_matches_diffusers(time_conditioning, theirs_name, c_in, c_out):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ours = ResBlock(c_in, c_out, 128, norm_groups=8, time_conditioning=time_conditioning)
    theirs = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=128, groups=8, eps=1e-5,
                           time_embedding_norm=theirs_name)   # eps: GroupNorm's default, as UNet2DModel passes it
    rename = {"time_proj": "time_emb_proj", "skip": "conv_shortcut"}
    theirs.load_state_dict({rename.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
                            for k, v in ours.state_dict().items()})
    x, emb = torch.randn(2, c_in, 8, 8), torch.randn(2, 128)
    torch.testing.assert_close(ours(x, emb), theirs(x, emb), atol=1e-5, rtol=1e-5)


# --- configs and parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", list(PRESETS.values()) + list(SD_PRESETS.values())
                         + [get_preset("small", time_conditioning="add", dropout=0.1, gradient_checkpointing=True,
                                       image_size=16), get_preset("sd_tiny", transformer_depth=2, context_dim=8)])
def test_config_json_round_trip(cfg):
    text = cfg.to_json()
    back = UNetConfig.from_json(text)
    assert back == cfg and back.to_json() == text
    assert isinstance(back.channels, tuple) and isinstance(back.attention, tuple)


def test_preset_table_counts_match_the_models():
    rows = preset_table()
    assert [r["preset"] for r in rows] == list(PRESETS)
    for row in rows:
        assert row["parameters"] == count_parameters(UNet(PRESETS[row["preset"]]))
        assert row["channels"] == PRESETS[row["preset"]].channels


def test_preset_parameter_counts_are_pinned():
    # golden values: a change here means the architecture changed (update notebook 03 and the model cards)
    assert {r["preset"]: r["parameters"] for r in preset_table()} == {"tiny": 148_019, "small": 1_504_899,
                                                                      "base": 5_993_731}


def test_count_parameters_trainable_only():
    model = _model()
    total = count_parameters(model)
    model.time_embed.requires_grad_(False)
    frozen = sum(p.numel() for p in model.time_embed.parameters())
    assert count_parameters(model, trainable_only=True) == total - frozen
    assert count_parameters(model) == total


def test_unet_accepts_changes_as_keywords():
    model = UNet(get_preset("tiny"), time_conditioning="add")
    assert model.config.time_conditioning == "add" and model.config.channels == (16, 32)
    assert UNet().config == UNetConfig()


# --- text conditioning: the context, its mask, and the SpatialTransformers ----------------------------------

def _sd_model(name: str = "sd_tiny", seed: int = 0, **changes) -> UNet:
    """A conditional U-Net whose transformers' proj_out are made non-zero (they start at zero, which would
    hide the context's effect: see test_a_new_conditional_unet_ignores_the_context)."""
    model = _model(name, seed, **changes)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpatialTransformer):
                m.proj_out.weight.copy_(torch.randn(m.proj_out.weight.shape, generator=gen) * 0.1)
    return model.eval()


def _context(batch: int, length: int, dim: int = 64, seed: int = 1):
    """Text states and a mask with 1..length real tokens per row, padding at the end (as a tokenizer pads)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, length, dim, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return context, torch.arange(length)[None, :] < lengths[:, None]


def test_conditional_blocks_use_spatial_transformers_where_unconditional_ones_attend():
    for name in ("tiny", "sd_tiny"):
        model = _model(name)
        cfg = model.config
        attn = [b.attn for level in model.down for b in level] + [model.mid1.attn, model.mid2.attn] + \
               [b.attn for level in model.up for b in level]
        expected = SpatialTransformer if cfg.conditional else SelfAttention
        assert sum(isinstance(a, expected) for a in attn) == sum(a is not None for a in attn)
        assert isinstance(model.mid1.attn, expected) and model.mid2.attn is None
        assert not any(isinstance(m, SpatialTransformer if not cfg.conditional else SelfAttention)
                       for m in model.modules())
    deep = _model("sd_tiny", transformer_depth=3)
    assert len(deep.mid1.attn.blocks) == 3
    cfg = get_preset("sd_tiny")
    x, emb, (context, mask) = torch.randn(2, 32, 8, 8), torch.randn(2, cfg.time_channels), _context(2, 4)
    assert Block(32, 64, cfg, attend=True)(x, emb, context, mask).shape == (2, 64, 8, 8)


@pytest.mark.parametrize("name", list(SD_PRESETS))
def test_conditional_output_shape(name):
    model = _model(name)
    cfg = model.config
    x, t = _inputs(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    context, mask = _context(2, 6, cfg.context_dim)
    with torch.no_grad():
        assert model(x, t, context, mask).shape == x.shape
        assert model(x, t, context).shape == x.shape


def test_a_new_conditional_unet_ignores_the_context():
    """proj_out starts at zero, so before training every SpatialTransformer is the identity (Rombach et al.)."""
    model = _model("sd_tiny").eval()
    x, t = _inputs(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, _context(2, 5, seed=1)[0]), model(x, t, _context(2, 5, seed=2)[0]),
                                   atol=0, rtol=0)


def test_conditional_output_depends_on_the_context():
    model = _sd_model()
    x, t = _inputs(2, 4, 8, 8)
    with torch.no_grad():
        a = model(x, t, _context(2, 5, seed=1)[0])
        b = model(x, t, _context(2, 5, seed=2)[0])
        a_again = model(x, t, _context(2, 5, seed=1)[0])
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, a_again, atol=0, rtol=0)
    # each image depends on its own row of the context only
    context = _context(2, 5, seed=1)[0]
    changed = context.clone()
    changed[1] += 1.0
    with torch.no_grad():
        c = model(x, t, changed)
    torch.testing.assert_close(c[0], a[0])
    assert (c[1] - a[1]).abs().max() > 1e-3


def test_padding_tokens_do_not_change_the_output():
    model = _sd_model()
    x, t = _inputs(3, 4, 8, 8)
    context, mask = _context(3, 6, seed=3)
    assert not mask.all() and mask.any(dim=1).all()
    noisy = torch.where(mask[..., None], context, 100 * torch.randn_like(context))   # garbage at the padding
    with torch.no_grad():
        out = model(x, t, context, mask)
        torch.testing.assert_close(model(x, t, noisy, mask), out, atol=1e-6, rtol=1e-6)
        # without the mask the padding is attended to, and the garbage shows
        assert (model(x, t, noisy) - out).abs().max() > 1e-3
        # a prompt padded with masked tokens gives what the unpadded prompt gives (image 0 alone)
        L0 = int(mask[0].sum())
        torch.testing.assert_close(model(x[:1], t[:1], context[:1, :L0]), out[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context, mask, error, message", [
    (None, None, ValueError, r"text-conditioned \(context_dim=64\): pass context, .* shape \(B, L, 64\) = \(2, "),
    (torch.zeros(2, 5, 32), None, ValueError, r"context must have shape \(B, L, context_dim\) = \(2, L, 64\).*"
                                              r"got \(2, 5, 32\)"),
    (torch.zeros(3, 5, 64), None, ValueError, r"= \(2, L, 64\).*got \(3, 5, 64\)"),
    (torch.zeros(2, 64), None, ValueError, r"= \(2, L, 64\).*got \(2, 64\)"),
    (torch.zeros(2, 5, 64, dtype=torch.long), None, TypeError, "context must be a float tensor"),
    (torch.zeros(2, 5, 64), torch.ones(2, 5), TypeError, "context_mask must be a bool tensor, True at real tokens"),
    (torch.zeros(2, 5, 64), torch.ones(2, 4, dtype=torch.bool), ValueError,
     r"context_mask must have shape \(B, L\) = \(2, 5\).*got \(2, 4\)"),
    (torch.zeros(2, 5, 64), torch.tensor([[True] * 5, [False] * 5]), ValueError, "at least one True"),
])
def test_bad_context_is_rejected_with_a_clear_message(context, mask, error, message):
    model = _model("sd_tiny")
    x, t = _inputs(2, 4, 8, 8)
    with pytest.raises(error, match=message):
        model(x, t, context, mask)


def test_an_unconditional_unet_rejects_a_context():
    model = _model("tiny")
    x, t = _inputs(2, 3, 16, 16)
    for kwargs in (dict(context=torch.zeros(2, 5, 64)), dict(context_mask=torch.ones(2, 5, dtype=torch.bool))):
        with pytest.raises(ValueError, match=r"this U-Net is unconditional \(config.context_dim is None\)"):
            model(x, t, **kwargs)


@pytest.mark.parametrize("changes, message", [
    (dict(context_dim=0), "context_dim must be an int >= 1 (the text encoder's width) or None"),
    (dict(context_dim=64.0), "got 64.0"),
    (dict(context_dim=True), "got True"),
    (dict(transformer_depth=0), "transformer_depth must be an int >= 1; got 0"),
])
def test_invalid_conditioning_configs_are_rejected(changes, message):
    with pytest.raises(ValueError) as err:
        get_preset("sd_tiny", **changes)
    assert message in str(err.value)


def test_gradients_reach_every_parameter_of_a_conditional_unet():
    model = _sd_model(blocks_per_level=2).train()
    x, t = _inputs(2, 4, 8, 8)
    context, mask = _context(2, 5)
    assert not mask.all()
    context.requires_grad_(True)
    torch.nn.functional.mse_loss(model(x, t, context, mask), torch.randn_like(x)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient"
    assert context.grad[mask].abs().min() > 0                    # every real token matters ...
    assert context.grad[~mask].abs().max() == 0                  # ... and padding does not


def test_gradient_checkpointing_passes_the_context_through():
    plain = _sd_model(blocks_per_level=2)
    ckpt = UNet(plain.config.replace(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs(2, 4, 8, 8)
    context, mask = _context(2, 5)
    target = torch.randn_like(x)
    outputs, grads = [], []
    for model in (plain, ckpt):
        model.train()
        c = context.clone().requires_grad_(True)
        out = model(x, t, c, mask)
        torch.nn.functional.mse_loss(out, target).backward()
        outputs.append(out.detach())
        grads.append({"context": c.grad, **{n: p.grad for n, p in model.named_parameters()}})
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert grads[0]["context"].abs().max() > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_config_repr_shows_conditioning_only_where_it_is_used():
    assert "context_dim" not in repr(get_preset("small")) and "transformer_depth" not in repr(get_preset("small"))
    assert repr(get_preset("small")).startswith("UNetConfig(image_size=32, in_channels=3, ")
    assert repr(get_preset("sd_tiny")).endswith("gradient_checkpointing=False, context_dim=64, transformer_depth=1)")
    assert "transformer_depth=2" in repr(get_preset("small", transformer_depth=2))


def test_sd_preset_parameter_counts_are_pinned():
    rows = preset_table(list(SD_PRESETS))
    assert {r["preset"]: r["parameters"] for r in rows} == {"sd_tiny": 860_964, "sd_small": 3_421_764}
    assert {r["preset"]: r["context_dim"] for r in rows} == {"sd_tiny": 64, "sd_small": 128}
    assert all(r["context_dim"] is None for r in preset_table())
    assert [r["preset"] for r in preset_table(["tiny", "sd_tiny"])] == ["tiny", "sd_tiny"]
    assert get_preset("sd_tiny").conditional and not get_preset("tiny").conditional


# --- old files still load ------------------------------------------------------------------------------------

OLD_CONFIG_JSON = ('{"image_size": 32, "in_channels": 3, "out_channels": 3, "channels": [32, 64, 64], '
                   '"blocks_per_level": 2, "attention": [false, true, true], "head_channels": 32, "norm_groups": 8, '
                   '"time_conditioning": "scale_shift", "dropout": 0.0, "gradient_checkpointing": false}')


def test_a_config_written_before_conditioning_existed_loads_as_unconditional():
    cfg = UNetConfig.from_json(OLD_CONFIG_JSON)
    assert cfg == get_preset("small") and cfg.context_dim is None and cfg.transformer_depth == 1
    assert UNetConfig.from_json(cfg.to_json()) == cfg


def test_the_shipped_checkpoint_still_loads_and_gives_the_same_output():
    model, _, _ = load_model(shipped("ddpm_emoji32"))
    assert not model.config.conditional
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([10, 500]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # golden values of the 17,000-step weights shipped on 2026-12-07, recorded after checking that the same code
    # still gave the 11,000-step weights' golden values (1.1985295; -2.5016, -2.7323, -0.2821, -0.3654), which were
    # checked the same way against the 5,000-step weights' (1.1395372; -2.0586, -2.5166, -0.4042, -0.3030, recorded
    # before text conditioning was added to the U-Net)
    assert out.abs().mean().item() == pytest.approx(1.2332247, abs=1e-4)
    torch.testing.assert_close(out[0, 0, 0, :4], torch.tensor([-2.7078, -2.8298, -0.2484, -0.3482]),
                               atol=1e-3, rtol=0)


def test_timesteps_outside_the_schedules_are_refused():
    model = UNet(get_preset("tiny", image_size=16))
    x = torch.zeros(2, 3, 16, 16)
    for t in (5000, -2, float("nan")):
        with pytest.raises(ValueError, match=r"t must be finite timesteps in \[-1, 1000\]"):
            model(x, torch.tensor([0.0, t]))
    assert model(x, torch.tensor([-0.5, 999])).shape == x.shape and model(x, 1000.0).shape == x.shape
