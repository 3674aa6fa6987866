"""course_lib.quantize against its definitions: the codes, the round trip's error bounds, unbiased stochastic
rounding, 8-bit AdamW's trajectory against torch's AdamW, and the bytes each form holds."""

import pytest
import torch

from course_lib import quantize as qz

# QLoRA's NF4 table as the paper's code prints it (Dettmers et al. 2023, Appendix E), to 4 decimals
NF4_PUBLISHED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_codes_are_256_sorted_values_dense_near_zero(signed):
    codes = qz.dynamic_codes(signed)
    assert codes.numel() == 256 and bool((codes[1:] > codes[:-1]).all())
    assert codes.max() == 1 and (codes == 0).any() and (codes.min() == -1 if signed else codes.min() == 0)
    positive = codes[codes > 0]
    assert positive.min() < 1e-5                          # reaches down several decades
    assert (positive < 0.1).sum() > (positive > 0.5).sum() / 2   # and spends codes there


def test_nf4_codes_are_the_published_normal_quantiles():
    assert torch.allclose(qz.nf4_codes(), torch.tensor(NF4_PUBLISHED), atol=1e-4)


def test_blockwise_round_trip_is_within_half_a_code_gap_of_each_block():
    torch.manual_seed(0)
    x = torch.randn(3, 5000) * torch.logspace(-4, 0, 3)[:, None]      # rows of very different scales
    codes = qz.dynamic_codes(True)
    q = qz.quantize_blockwise(x, codes, block=500)
    y = qz.dequantize_blockwise(q, codes)
    gap = (codes[1:] - codes[:-1]).max()
    bound = q.absmax.repeat_interleave(500)[:x.numel()].view_as(x) * gap / 2
    assert y.shape == x.shape and bool(((y - x).abs() <= bound + 1e-12).all())
    assert q.index.dtype == torch.uint8 and q.nbytes == x.numel() + 4 * q.absmax.numel()


def test_an_outlier_spoils_only_its_own_block():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 0.01
    x[10] = 100.0
    codes = qz.dynamic_codes(True)
    y = qz.dequantize_blockwise(qz.quantize_blockwise(x, codes, 2048), codes)
    first, second = (y - x)[:2048].abs().mean(), (y - x)[2048:].abs().mean()
    assert second < first / 10
    whole = qz.dequantize_blockwise(qz.quantize_blockwise(x, codes, 4096), codes)
    assert (whole - x)[2048:].abs().mean() > 10 * second   # one block for all: the outlier sets every scale


def test_nf4_with_double_quantisation_holds_about_half_a_byte_a_weight():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    single, double = qz.nf4_quantize(w, double=False), qz.nf4_quantize(w)
    assert single.nbytes == w.numel() // 2 + 4 * w.numel() // 64               # 0.5625 bytes a weight
    assert double.nbytes < single.nbytes and double.nbytes / w.numel() < 0.52    # QLoRA: ~0.516
    for q in (single, double):
        y = qz.nf4_dequantize(q)
        assert y.shape == w.shape
        rel = ((y - w).norm() / w.norm()).item()
        assert rel < 0.12, rel                           # 16 levels: about 10% error on normal weights
    absmax_error = (qz._absmax(double) - single.absmax).abs().max() / single.absmax.max()
    assert absmax_error < 0.01


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2 ** -10)            # a quarter of the way between bf16's 1 and 1 + 2^-7
    y = qz.stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    share_up = (y > 1).float().mean().item()
    assert abs(share_up - 0.125) < 4 * (0.125 * 0.875 / y.numel()) ** 0.5
    assert x.bfloat16().float().unique().tolist() == [1.0]   # round to nearest: always down, the step lost
    neg = qz.stochastic_round_bf16(-x, torch.Generator().manual_seed(0)).float()
    assert torch.equal(neg, -y)                          # sign and magnitude: symmetric


def regression(dtype=torch.float32, steps=200, optimizer="adamw8bit", lr=3e-3):
    gen = torch.Generator().manual_seed(3)
    X, w_true = torch.randn(256, 64, generator=gen), torch.randn(64, 1, generator=gen)
    y = X @ w_true
    w = torch.nn.Parameter(torch.zeros(64, 1, dtype=dtype))
    opt = (qz.AdamW8bit([w], lr=lr, weight_decay=0.0, min_8bit_size=0) if optimizer == "adamw8bit"
           else torch.optim.AdamW([w], lr=lr, weight_decay=0.0))
    losses = []
    for _ in range(steps):
        loss = ((X @ w.float() - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w.detach().float(), losses, opt


def test_8bit_adamw_follows_float32_adamw():
    w8, losses8, opt = regression(lr=1e-2)
    w32, losses32, _ = regression(optimizer="adamw", lr=1e-2)
    assert losses8[-1] < losses8[0] / 20
    assert abs(losses8[-1] - losses32[-1]) < 0.1 * losses32[-1]     # 200 steps: 2.27 against 2.14 (70 at start)
    assert ((w8 - w32).norm() / w32.norm()).item() < 0.05
    state = opt.state[next(iter(opt.state))]
    assert state["m_index"].dtype == torch.uint8 and state["v_index"].dtype == torch.uint8


def test_8bit_adamw_state_is_about_two_bytes_a_weight():
    p = torch.nn.Parameter(torch.randn(4096, 64))
    opt = qz.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    nbytes = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert nbytes == 2 * p.numel() + 2 * 4 * (p.numel() // 2048)


def test_small_tensors_keep_float32_moments_that_follow_adamw_exactly():
    """Below min_8bit_size (4,096, bitsandbytes' default) a block-padded 8-bit state would be larger than float32's."""
    small, large = torch.nn.Parameter(torch.randn(8, 64)), torch.nn.Parameter(torch.randn(4096, 2))
    twin = torch.nn.Parameter(small.detach().clone())
    opt, ref = qz.AdamW8bit([small, large], lr=1e-2), torch.optim.AdamW([twin], lr=1e-2)
    for _ in range(3):
        for p in (small, large, twin):
            p.grad = torch.ones_like(p) * torch.arange(p.shape[-1])
        opt.step(), ref.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "m_index" not in opt.state[small]
    assert opt.state[large]["m_index"].dtype == torch.uint8
    torch.testing.assert_close(small, twin)                   # the float32 path is AdamW's update
    with pytest.raises(ValueError, match="min_8bit_size"):
        qz.AdamW8bit([small], min_8bit_size=-1)


def test_pure_bf16_training_moves_with_stochastic_rounding():
    """A bf16 weight near 1 with updates far below half its step (2^-8): round to nearest would stall."""
    p = torch.nn.Parameter(torch.ones(10_000, dtype=torch.bfloat16))
    opt = qz.AdamW8bit([p], lr=1e-4, weight_decay=0.0)
    for _ in range(50):
        p.grad = torch.ones_like(p)                       # Adam's step: about lr a step, downwards
        opt.step()
    moved = 1 - p.float().mean().item()
    assert abs(moved - 50 * 1e-4) < 0.2 * 50 * 1e-4      # on average, the 50 small steps all happened


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr > 0"):
        qz.AdamW8bit([torch.nn.Parameter(torch.zeros(1))], lr=0)
    with pytest.raises(ValueError, match=r"block must be an int >= 1 \(values per block\)"):
        qz.quantize_blockwise(torch.zeros(4), qz.dynamic_codes(), block=0)


def test_an_nf4_linear_computes_close_to_the_original_in_under_a_seventh_of_its_bytes():
    torch.manual_seed(4)
    linear = torch.nn.Linear(512, 256)
    nf4 = qz.NF4Linear(linear)
    x = torch.randn(8, 512)
    rel = ((nf4(x) - linear(x)).norm() / linear(x).norm()).item()
    assert rel < 0.12, rel
    held = sum(b.numel() * b.element_size() for b in nf4.buffers())
    assert held < linear.weight.numel() * 4 / 7           # under 4/7 of a byte a weight (float32: 4; NF4: ~0.52)
    assert not any(p.requires_grad for p in nf4.parameters())


def test_lora_trains_on_an_nf4_base_qlora():
    from course_lib.lora import inject_lora, lora_parameters
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    assert qz.nf4_linears(model) == 2 and isinstance(model[0], qz.NF4Linear)
    inject_lora(model, rank=4, targets=["0"])
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = torch.randn(64, 128), torch.randn(64, 4)
    first = None
    for _ in range(50):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first and all(p.grad is not None for p in params)
    assert model[0].base.index.dtype == torch.uint8        # the base stayed 4-bit


# --- weights in 8 bits on disk ---------------------------------------------------------------------------------

def test_save_8bit_round_trip_is_within_half_a_code_step_and_about_a_byte_a_weight(tmp_path):
    from course_lib.quantize import linear_codes, read_8bit, save_8bit
    codes = linear_codes()
    assert len(codes) == 255 and codes[127] == 0 and codes[0] == -1 and codes[-1] == 1
    g = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(64, 130, generator=g) * 0.05, "small": torch.randn(10, generator=g),
             "steps": torch.tensor([3], dtype=torch.int64)}
    path = save_8bit(tmp_path / "w.safetensors", state, info={"what": "test"}, block=64)
    back, info = read_8bit(path)
    assert info == {"what": "test"} and set(back) == set(state) and back["steps"].dtype == torch.int64
    assert torch.equal(back["steps"], state["steps"])
    torch.testing.assert_close(back["small"], state["small"].half().float())        # small: float16
    blocks = torch.nn.functional.pad(state["big"].reshape(-1), (0, -state["big"].numel() % 64)).view(-1, 64)
    step = (blocks.abs().amax(1) / 127)[:, None]                                      # one code step per block
    err = torch.nn.functional.pad((back["big"] - state["big"]).reshape(-1), (0, -state["big"].numel() % 64))
    assert (err.view(-1, 64).abs() <= step / 2 * 1.0001).all() and back["big"].shape == (64, 130)
    assert path.stat().st_size < 64 * 130 * 1.2 + 4000                              # ~1 byte a weight (+ header)


def test_read_8bit_refuses_other_files(tmp_path):
    from course_lib.checkpoint import atomic_save
    from course_lib.quantize import read_8bit
    other = atomic_save({"w": torch.zeros(3)}, tmp_path / "o.safetensors", {"format": "course_lib.model/1"})
    with pytest.raises(ValueError, match="not a course_lib 8-bit weights file"):
        read_8bit(other)
