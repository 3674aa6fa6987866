"""course_lib.attention: naive attention against SDPA (with masks), SelfAttention, CrossAttention and its mask,
the GEGLU feed-forward, TransformerBlock and SpatialTransformer, and the context's checks.

SelfAttention, TransformerBlock and SpatialTransformer are checked against diffusers' Attention,
BasicTransformerBlock and Transformer2DModel (the reference implementation) with copied weights.
"""

import pytest
import torch

from course_lib.attention import (CrossAttention, FeedForward, SelfAttention, SpatialTransformer, TransformerBlock,
                                  check_context, naive_attention)


pytestmark = pytest.mark.usefixtures("one_thread")


def _context(batch: int, length: int, dim: int = 64, seed: int = 1):
    """Text states and a mask with 1..length real tokens per row, padding at the end (as a tokenizer pads)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, length, dim, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return context, torch.arange(length)[None, :] < lengths[:, None]


def _random_mask(*shape: int, seed: int = 0) -> torch.Tensor:
    """A random bool mask, True with probability 1/2, with at least one True in every row (last axis)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < 0.5
    mask[..., 0] |= ~mask.any(dim=-1)
    return mask


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


def test_naive_attention_with_a_mask_matches_sdpa_and_ignores_masked_keys():
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    mask = _random_mask(2, 1, 10, 10)                     # broadcast over heads; per query and key
    ours = naive_attention(q, k, v, mask)
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               atol=1e-5, rtol=1e-5)
    keys = _random_mask(2, 1, 1, 10, seed=1)              # the same keys masked for every head and query
    garbage = torch.where(keys.reshape(2, 1, 10, 1), v,
                          1e3 * torch.randn_like(v))      # values at masked keys replaced
    torch.testing.assert_close(naive_attention(q, k, garbage, keys), naive_attention(q, k, v, keys))
    assert (naive_attention(q, k, garbage) - naive_attention(q, k, v)).abs().max() > 1
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        naive_attention(q, k, v, mask.float())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_attention_sdpa_matches_naive_with_and_without_masks(seed):
    torch.manual_seed(seed)
    attn = CrossAttention(64, 48, head_channels=16)
    assert attn.heads == 4 and attn.to_k.in_features == 48 and attn.to_q.bias is None
    x, context = torch.randn(3, 20, 64), torch.randn(3, 7, 48)
    mask = _random_mask(3, 7, seed=seed)
    assert not mask.all()
    for m in (None, mask):
        out = attn(x, context, m)
        assert out.shape == (3, 20, 64)
        torch.testing.assert_close(out, attn(x, context, m, naive=True), atol=1e-5, rtol=1e-5)
    assert (attn(x, context, mask) - attn(x, context)).abs().max() > 1e-3      # the mask does something
    self_attn = CrossAttention(64, 64, 16)                                     # context=None: self-attention
    torch.testing.assert_close(self_attn(x), self_attn(x, x))


def test_cross_attention_checks_its_mask():
    attn = CrossAttention(32, 16, head_channels=16)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 3, 16)
    with pytest.raises(TypeError, match="bool tensor"):
        attn(x, context, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\) = \(2, 3\); got \(2, 4\)"):
        attn(x, context, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query_dim \(40\) must be divisible by head_channels \(16\)"):
        CrossAttention(40, 16, head_channels=16)


def test_feed_forward_is_geglu():
    torch.manual_seed(0)
    ff = FeedForward(8, mult=4)
    x = torch.randn(3, 8)
    a, gate = (x @ ff.proj.weight.T + ff.proj.bias).split(32, dim=-1)
    torch.testing.assert_close(ff(x), (a * torch.nn.functional.gelu(gate)) @ ff.out.weight.T + ff.out.bias)


# diffusers 0.42 warns about its own deprecated output class when Transformer2DModel returns (not ours)
@pytest.mark.filterwarnings("ignore:`Transformer2DModelOutput` is deprecated:FutureWarning")
def test_transformer_block_and_spatial_transformer_match_diffusers():
    from diffusers import Transformer2DModel
    from diffusers.models.attention import BasicTransformerBlock

    def diffusers_names(state):        # ours -> diffusers: to_out is to_out.0, the GEGLU is ff.net.0 / ff.net.2
        rename = [(".to_out.", ".to_out.0."), ("ff.proj.", "ff.net.0.proj."), ("ff.out.", "ff.net.2."),
                  ("blocks.", "transformer_blocks.")]
        out = {}
        for k, v in state.items():
            for ours_name, theirs_name in rename:
                k = k.replace(ours_name, theirs_name)
            out[k] = v
        return out

    torch.manual_seed(0)
    ours = TransformerBlock(64, 48, head_channels=32)
    theirs = BasicTransformerBlock(64, 2, 32, cross_attention_dim=48, activation_fn="geglu", attention_bias=False)
    theirs.load_state_dict(diffusers_names(ours.state_dict()))
    x, context = torch.randn(2, 16, 64), torch.randn(2, 5, 48)
    torch.testing.assert_close(ours(x, context), theirs(x, encoder_hidden_states=context), atol=1e-5, rtol=1e-5)

    ours = SpatialTransformer(64, 48, head_channels=32, depth=2, norm_groups=8)
    torch.nn.init.normal_(ours.proj_out.weight, std=0.1)          # not zero, so the blocks show in the output
    theirs = Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=64, num_layers=2,
                                cross_attention_dim=48, norm_num_groups=8, use_linear_projection=False)
    theirs.load_state_dict(diffusers_names(ours.state_dict()))
    x, (context, mask) = torch.randn(2, 64, 4, 4), _context(2, 5, 48)
    assert not mask.all()
    # diffusers turns encoder_attention_mask into a bias of -10000 at padding; ours uses -inf: the same weights
    theirs_out = theirs(x, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample
    torch.testing.assert_close(ours(x, context, mask), theirs_out, atol=1e-5, rtol=1e-5)


def test_spatial_transformer_starts_as_the_identity():
    st = SpatialTransformer(32, 16, head_channels=16, depth=2)
    assert len(st.blocks) == 2
    assert st.proj_out.weight.abs().max() == 0 and st.proj_out.bias.abs().max() == 0
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(st(x, torch.randn(2, 3, 16)), x, atol=0, rtol=0)


@pytest.mark.parametrize("context, mask, error, message", [
    ([[0.0] * 8] * 3, None, TypeError, r"context must be a float tensor of shape \(2, L, 8\); got list"),
    (torch.zeros(2, 3, 8, dtype=torch.long), None, TypeError, "got torch.int64"),
    (torch.zeros(2, 3, 4), None, ValueError, r"context must have shape \(B, L, context_dim\) = \(2, L, 8\)"),
    (torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.long), TypeError, "context_mask must be a bool tensor"),
    (torch.zeros(2, 3, 8), torch.ones(3, 2, dtype=torch.bool), ValueError, r"= \(2, 3\).*got \(3, 2\)"),
    (torch.zeros(2, 3, 8), torch.tensor([[True, False, False], [False] * 3]), ValueError, "at least one True"),
])
def test_check_context_names_what_is_wrong(context, mask, error, message):
    with pytest.raises(error, match=message):
        check_context(context, mask, 2, 8)


def test_check_context_accepts_states_with_and_without_a_mask():
    context, mask = _context(2, 5, 8)
    check_context(context, mask, 2, 8)
    check_context(context, None, 2, 8)


# --- attention in slices ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 3, 8, 100])
def test_sliced_attention_gives_the_same_numbers_with_and_without_a_mask(size):
    from course_lib.attention import attend, sliced_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (16, 5, 5))
    mask = torch.rand(2, 1, 1, 5, generator=g) > 0.3
    mask[:, ..., 0] = True                                   # every query sees at least one key
    for m in (None, mask):
        whole = attend(q, k, v, m)
        with sliced_attention(size):
            sliced = attend(q, k, v, m)
        torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    layer = CrossAttention(32, 16, head_channels=8)
    x, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 5, 16, generator=g)
    with sliced_attention(size):
        torch.testing.assert_close(layer(x, c, mask[:, 0, 0]), layer(x, c, mask[:, 0, 0], naive=True), rtol=1e-5,
                                   atol=1e-6)


def test_sliced_attention_holds_fewer_scores_with_the_math_kernel_and_restores_itself():
    from course_lib import attention, memory
    with memory.accounting("T4", attention="math"):
        layer = SelfAttention(64, head_channels=8)            # 8 heads over 32 x 32 = 1,024 tokens
        x = torch.randn(2, 64, 32, 32)
        whole = memory.measure_peak(lambda: layer(x), what="all heads at once")
        with attention.sliced_attention(2):
            sliced = memory.measure_peak(lambda: layer(x), what="2 (image, head) pairs at a time")
    scores = 2 * 8 * 1024 * 1024 * 4                          # B x heads x N x N float32
    assert whole.peak_bytes - sliced.peak_bytes > 0.5 * scores
    assert attention._slice_size is None
    with pytest.raises(ValueError, match="the attention slice size must be an int >= 1"):
        with attention.sliced_attention(0):
            pass
