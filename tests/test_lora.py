"""LoRA: exact at initialisation, merge = unmerged, only adapters train, files, scale, and peft's numbers."""

import copy

import pytest
import torch
from torch import nn

from course_lib import lora
from course_lib.unet import UNet, count_parameters, get_preset


@pytest.fixture
def unet():
    torch.manual_seed(0)
    model = UNet(get_preset("sd_tiny"))
    for p in model.parameters():           # zero-initialised outputs (proj_out) would hide differences
        with torch.no_grad():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _inputs(model, B=2):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    ctx = torch.randn(B, 5, cfg.context_dim, generator=g)
    return x, torch.tensor([10, 500]), ctx


def _randomise_B(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))


def test_injected_model_equals_base_exactly(unet):
    x, t, ctx = _inputs(unet)
    before = unet(x, t, ctx)
    names = lora.inject_lora(unet, rank=4)
    assert names and all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "to_out") for n in names)
    assert torch.equal(unet(x, t, ctx), before)


def test_scale_zero_is_base_and_scale_changes_output(unet):
    x, t, ctx = _inputs(unet)
    base = unet(x, t, ctx)
    lora.inject_lora(unet, rank=4)
    _randomise_B(unet)
    adapted = unet(x, t, ctx)
    assert (adapted - base).abs().max() > 1e-3
    with lora.lora_scale(unet, 0.0):
        assert torch.equal(unet(x, t, ctx), base)
    with lora.lora_scale(unet, 0.5):
        half = unet(x, t, ctx)
    assert torch.equal(unet(x, t, ctx), adapted)            # the context manager restored scale 1
    assert 0 < (half - base).abs().max() < (adapted - base).abs().max()


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, ("*.proj_in", "*.proj_out", "*.conv1", "*.to_q")])
def test_merge_and_unmerge_agree_with_unmerged(unet, targets):
    x, t, ctx = _inputs(unet)
    base_weights = copy.deepcopy(unet.state_dict())
    lora.inject_lora(unet, targets=targets, rank=3, alpha=6.0)
    _randomise_B(unet)
    unmerged = unet(x, t, ctx)
    lora.merge_lora(unet)
    assert all(layer.merged for layer in lora.lora_layers(unet).values())
    torch.testing.assert_close(unet(x, t, ctx), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge_lora(unet)
    torch.testing.assert_close(unet(x, t, ctx), unmerged, rtol=1e-5, atol=1e-5)
    lora.remove_lora(unet)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, base_weights[k], rtol=0, atol=1e-6)


def test_remove_with_merge_bakes_the_update_in(unet):
    x, t, ctx = _inputs(unet)
    lora.inject_lora(unet, rank=2)
    _randomise_B(unet)
    adapted = unet(x, t, ctx)
    lora.remove_lora(unet, merge=True)
    assert not lora.lora_layers(unet)
    torch.testing.assert_close(unet(x, t, ctx), adapted, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_get_gradients(unet):
    lora.inject_lora(unet, rank=4)
    x, t, ctx = _inputs(unet)
    unet(x, t, ctx).pow(2).mean().backward()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    for n, p in unet.named_parameters():
        if n.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif not n.endswith("lora_A"):
            assert p.grad is None, n


def test_parameter_count_matches_the_formula(unet):
    layers = {n: unet.get_submodule(n) for n in lora.matching_layers(unet)}
    expected = sum(lora.lora_numbers_formula(m, 8) for m in layers.values())
    lora.inject_lora(unet, rank=8)
    assert count_parameters(unet, trainable_only=True) == expected == lora.adapter_numbers(unet)
    # e.g. a 64 -> 64 projection at rank 8: 8 * (64 + 64) = 1024 numbers instead of 4096
    assert lora.lora_numbers_formula(nn.Linear(64, 64), 8) == 1024
    assert lora.lora_numbers_formula(nn.Conv2d(4, 6, 3), 2) == 2 * (4 * 9 + 6)


def test_save_load_round_trip(unet, tmp_path):
    x, t, ctx = _inputs(unet)
    other = copy.deepcopy(unet)
    lora.inject_lora(unet, rank=4, alpha=8.0)
    _randomise_B(unet)
    path = lora.save_lora(tmp_path / "adapter.safetensors", unet, info={"note": "test"})
    tensors, meta = lora.read_lora(path)
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["info"] == {"note": "test"}
    assert meta["targets"] == list(lora.DEFAULT_TARGETS)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert path.stat().st_size < 0.2 * sum(p.numel() * 2 for p in other.parameters())
    lora.load_lora(path, other)                              # injects, then loads
    assert set(lora.lora_layers(other)) == set(lora.lora_layers(unet))
    # the file is float16, so compare against the float16-rounded adapter
    with torch.no_grad():
        for layer in lora.lora_layers(unet).values():
            layer.lora_A.copy_(layer.lora_A.half().float())
            layer.lora_B.copy_(layer.lora_B.half().float())
    torch.testing.assert_close(other(x, t, ctx), unet(x, t, ctx), rtol=1e-6, atol=1e-6)


def test_clear_errors(unet, tmp_path):
    with pytest.raises(ValueError, match="no Linear or Conv2d layer matches"):
        lora.inject_lora(unet, targets=("*.nothing",))
    with pytest.raises(ValueError, match="has no LoRA layers"):
        lora.save_lora(tmp_path / "x.safetensors", unet)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.LoRALayer(nn.Linear(3, 3), rank=0)
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        lora.LoRALayer(nn.LayerNorm(3), rank=1)
    lora.inject_lora(unet, rank=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.inject_lora(unet, rank=2)
    path = lora.save_lora(tmp_path / "r2.safetensors", unet)
    other = UNet(get_preset("sd_tiny"))
    lora.inject_lora(other, rank=3)
    with pytest.raises(ValueError, match=r"has shape .*rank 3"):
        lora.load_lora(path, other)
    lora.merge_lora(unet)
    with pytest.raises(ValueError, match="unmerge_lora"):
        lora.set_lora_scale(unet, 0.5)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(12, 10)
        self.conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)

    def forward(self, x, img):
        return self.to_q(x), self.conv(img)


def test_agrees_with_peft_on_the_same_layers_and_weights():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = _Tiny()
    theirs = copy.deepcopy(ours)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "conv"], lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, config)
    lora.inject_lora(ours, targets=("to_q", "conv"), rank=3, alpha=6)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("to_q", "conv"):
            layer = lora.lora_layers(ours)[name]
            ref = theirs.base_model.model.get_submodule(name)
            A = torch.randn(layer.lora_A.shape, generator=g)
            B = torch.randn(layer.lora_B.shape, generator=g)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            ref.lora_A["default"].weight.copy_(A)
            ref.lora_B["default"].weight.copy_(B)
    x, img = torch.randn(4, 12), torch.randn(2, 3, 9, 9)
    for a, b in zip(ours(x, img), theirs(x, img)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ours_trainable = count_parameters(ours, trainable_only=True)
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable
    theirs = theirs.merge_and_unload()
    lora.merge_lora(ours)
    torch.testing.assert_close(ours.to_q.base.weight, theirs.to_q.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.conv.base.weight, theirs.conv.weight, rtol=1e-5, atol=1e-5)


def test_fit_lora_trains_only_the_adapter_and_reports_its_state(tiny_pipe):
    import copy as _copy
    from course_lib.data import load_emoji
    pipe = _copy.copy(tiny_pipe)
    pipe.unet = _copy.deepcopy(tiny_pipe.unet)
    data = load_emoji(size=tiny_pipe.vae.config.image_size, split="train", style="twemoji", limit=16)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    log = lora.fit_lora(pipe, data.images, data.captions, rank=2, steps=12, batch_size=8, lr=1e-2)
    assert log.steps == 12 and log.trainable == lora.adapter_numbers(pipe.unet)
    # gradients + two AdamW moments, float32: 3 x 4 bytes per trained number
    assert log.state_bytes == 3 * 4 * log.trainable
    for name, value in pipe.unet.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, before[name.replace(".base.", ".")]), name
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora.lora_layers(pipe.unet).values())
    with pytest.raises(ValueError, match="one caption per image"):
        lora.fine_tune(pipe, data.images, data.captions[:3], lora.lora_parameters(pipe.unet))


def test_fine_tune_with_ema_keeps_the_average(tiny_pipe):
    import copy as _copy
    from course_lib.data import load_emoji
    data = load_emoji(size=tiny_pipe.vae.config.image_size, split="train", style="twemoji", limit=8)
    finals = []
    for ema in (None, 0.0, 0.9):
        pipe = _copy.copy(tiny_pipe)
        pipe.unet = _copy.deepcopy(tiny_pipe.unet)
        lora.fit_lora(pipe, data.images, data.captions, rank=2, steps=6, batch_size=4, lr=1e-2, ema=ema)
        finals.append(torch.cat([p.flatten() for p in lora.lora_parameters(pipe.unet)]))
    # decay 0: the "average" is the last step's weights; decay 0.9: it lags behind them
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=0)
    assert not torch.allclose(finals[2], finals[0])
