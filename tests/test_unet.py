"""The U-Net: shapes, errors, gradients, attention, time embedding, checkpointing, configs.

The blocks are also checked against diffusers' (the reference implementation) with copied weights:
our ResBlock against ResnetBlock2D in both time-conditioning modes, SelfAttention against Attention,
and the sinusoidal embedding and time MLP against get_timestep_embedding and TimestepEmbedding.
"""

import pytest
import torch

from course_lib.unet import (PRESETS, TIME_CONDITIONING, Block, Downsample, ResBlock, SelfAttention, UNet,
                             UNetConfig, Upsample, count_parameters, get_preset, naive_attention, preset_table,
                             timestep_embedding)


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


@pytest.mark.parametrize("changes, message", [
    (dict(norm_groups=7), "divisible by norm_groups=7; got 32 in channels=(32, 64, 64)"),
    (dict(channels=(32, 60, 64)), "divisible by norm_groups=8; got 60"),
    (dict(attention=(False, True)), "attention needs one True/False per level (3 levels); got 2"),
    (dict(attention=(False, True, True, True)), "(3 levels); got 4"),
    (dict(time_conditioning="film"), "unknown time_conditioning 'film'; valid are scale_shift, add"),
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
    with pytest.raises(ValueError, match="unknown U-Net preset 'huge'; valid are tiny, small, base"):
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
def test_both_time_conditionings_run_and_differ(time_conditioning):
    model = _model(time_conditioning=time_conditioning)
    res = model.down[0][0].res
    assert res.time_conditioning == time_conditioning
    assert res.time_proj.out_features == (2 if time_conditioning == "scale_shift" else 1) * res.conv1.out_channels
    x, t = _inputs(2, 3, 16, 16)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --- the blocks ------------------------------------------------------------------------------------------

def test_self_attention_sdpa_matches_naive_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(64, head_channels=16, norm_groups=8)
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(attn(x), attn(x, naive=True), atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    torch.testing.assert_close(naive_attention(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_self_attention_rejects_partial_heads():
    with pytest.raises(ValueError, match=r"channels \(40\) must be divisible by head_channels \(32\)"):
        SelfAttention(40, head_channels=32)


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


def test_self_attention_matches_diffusers():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    ours = SelfAttention(64, head_channels=32, norm_groups=8)
    theirs = Attention(64, heads=2, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                       upcast_softmax=True, eps=1e-5, _from_deprecated_attn_block=True)
    weights, biases = ours.qkv.weight.chunk(3), ours.qkv.bias.chunk(3)    # our fused qkv is [q; k; v]
    theirs.load_state_dict({"group_norm.weight": ours.norm.weight, "group_norm.bias": ours.norm.bias,
                            "to_q.weight": weights[0], "to_k.weight": weights[1], "to_v.weight": weights[2],
                            "to_q.bias": biases[0], "to_k.bias": biases[1], "to_v.bias": biases[2],
                            "to_out.0.weight": ours.out.weight, "to_out.0.bias": ours.out.bias})
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


# --- configs and parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", list(PRESETS.values()) + [get_preset("small", time_conditioning="add", dropout=0.1,
                                                                       gradient_checkpointing=True, image_size=16)])
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
