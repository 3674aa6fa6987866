"""LoRA: exact at initialisation, merge = unmerged, only adapters train, files, scale, and peft's numbers."""

import copy

import pytest
import torch
from torch import nn

from course_lib import lora
from course_lib.finetune import fine_tune
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
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
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
        fine_tune(pipe, data.images, data.captions[:3], lora.lora_parameters(pipe.unet))


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


# --- merged layers: exact unmerge, a fixed scale ------------------------------------------------------------

def test_unmerge_restores_the_base_weights_bit_for_bit(unet):
    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    lora.inject_lora(unet, targets=("*.proj_in", "*.conv1", "*.to_q"), rank=3, alpha=6.0)
    _randomise_B(unet)
    lora.merge_lora(unet)
    lora.unmerge_lora(unet)
    lora.remove_lora(unet)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, base_weights[k]), k         # W + D - D would be off in the last bits


def test_merging_inside_a_temporary_scale_is_refused_and_unmerge_stays_exact(unet):
    x, t, ctx = _inputs(unet)
    lora.inject_lora(unet, rank=4)
    _randomise_B(unet)
    adapted = unet(x, t, ctx)
    base = {n: layer.base.weight.clone() for n, layer in lora.lora_layers(unet).items()}
    with pytest.raises(ValueError, match=r"merged inside `with lora_scale\(model, 0.5\)`.*unmerge_lora\(model\)"):
        with lora.lora_scale(unet, 0.5):
            lora.merge_lora(unet)
    assert all(layer.merged and layer.scale == 0.5 for layer in lora.lora_layers(unet).values())
    lora.unmerge_lora(unet)                                  # the base weights exactly, whatever the scale
    for n, layer in lora.lora_layers(unet).items():
        assert torch.equal(layer.base.weight, base[n]), n
    lora.set_lora_scale(unet, 1.0)
    assert torch.equal(unet(x, t, ctx), adapted)
    # merged and unmerged again inside the block: allowed, and the scale goes back
    with lora.lora_scale(unet, 0.5):
        lora.merge_lora(unet)
        lora.unmerge_lora(unet)
    assert torch.equal(unet(x, t, ctx), adapted)


def test_the_scale_of_a_merged_layer_cannot_change_on_any_path(unet):
    lora.inject_lora(unet, rank=2)
    lora.merge_lora(unet)
    layer = next(iter(lora.lora_layers(unet).values()))
    with pytest.raises(ValueError, match="merged into its base weight at scale 1; unmerge it first"):
        layer.scale = 0.5
    with pytest.raises(ValueError, match="merged into the base weights at another scale; unmerge_lora"):
        lora.set_lora_scale(unet, 0.5)
    with pytest.raises(ValueError, match="unmerge_lora"):
        with lora.lora_scale(unet, 0.0):
            pass
    assert all(layer.scale == 1.0 for layer in lora.lora_layers(unet).values())   # nothing changed
    lora.set_lora_scale(unet, 1.0)                           # the scale it has: no change, allowed
    with pytest.raises(ValueError, match="scale must be a finite number"):
        layer.scale = float("nan")
    lora.unmerge_lora(unet)
    layer.scale = 0.5
    assert layer.scale == 0.5


def test_loading_an_adapter_into_merged_layers_is_refused(unet, tmp_path):
    lora.inject_lora(unet, rank=2)
    path = lora.save_lora(tmp_path / "a.safetensors", unet)
    lora.merge_lora(unet)
    with pytest.raises(ValueError, match="merged; unmerge_lora"):
        lora.load_lora(path, unet)


# --- ranks, replacing modules ----------------------------------------------------------------------------

def test_a_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"Linear 12 -> 10\): the largest valid rank is 10"):
        lora.LoRALayer(nn.Linear(12, 10), rank=11)
    assert lora.LoRALayer(nn.Linear(12, 10), rank=10).rank == 10          # full rank is allowed
    # a conv's update is an out x (in k k) matrix: Conv2d(3, 5, 3) allows 5, Conv2d(2, 40, 3) allows 2*9 = 18
    with pytest.raises(ValueError, match=r"Conv2d 3 -> 5, kernel 3x3, in\*k\*k = 27\): the largest valid rank is 5"):
        lora.LoRALayer(nn.Conv2d(3, 5, 3), rank=6)
    with pytest.raises(ValueError, match="largest valid rank is 18"):
        lora.LoRALayer(nn.Conv2d(2, 40, 3), rank=19)
    assert lora.max_rank(nn.Conv2d(2, 40, 3)) == 18 and lora.max_rank(nn.Linear(4, 9)) == 4
    model = _Tiny()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"rank 6 is too large for layer 'conv' \(Conv2d 3 -> 5.*largest valid "
                                         r"rank there is 5.*1 of the 2 matched layers.*valid for all is 5"):
        lora.inject_lora(model, targets=("to_q", "conv"), rank=6)
    assert not lora.lora_layers(model)                                      # refused before anything changed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_replace_module_swaps_a_named_submodule(unet):
    name = lora.matching_layers(unet)[0]
    old = unet.get_submodule(name)
    new = nn.Linear(old.in_features, old.out_features)
    assert lora.replace_module(unet, name, new) is old and unet.get_submodule(name) is new
    assert lora.replace_module(unet, name, old) is new and unet.get_submodule(name) is old
    with pytest.raises(AttributeError, match="no attribute"):
        lora.replace_module(unet, name + "_missing", new)


# --- fine-tuning through the one loop: checkpoints, exact resume, a clean stop ----------------------------

def _fresh(tiny_pipe):
    import copy as _copy
    pipe = _copy.copy(tiny_pipe)
    pipe.unet = _copy.deepcopy(tiny_pipe.unet)
    return pipe


def _stop_at(step, error=KeyboardInterrupt):
    def callback(run):
        if run.step == step:
            raise error(f"stopped at step {step}")
    return callback


@pytest.fixture(scope="module")
def eight(tiny_pipe):
    from course_lib.data import load_emoji
    return load_emoji(size=tiny_pipe.vae.config.image_size, split="train", style="twemoji", limit=8)


def test_an_interrupted_fine_tune_resumes_bit_identically(tiny_pipe, eight, tmp_path):
    options = dict(rank=2, steps=6, batch_size=4, lr=1e-2, ema=0.9)
    whole = _fresh(tiny_pipe)
    log = lora.fit_lora(whole, eight.images, eight.captions, **options)
    path = tmp_path / "ft.safetensors"
    with pytest.raises(KeyboardInterrupt):
        lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, checkpoint_path=path, checkpoint_every=2,
                      callback=_stop_at(3), **options)
    resumed = _fresh(tiny_pipe)                 # a new session: the same call finds the step-2 checkpoint
    again = lora.fit_lora(resumed, eight.images, eight.captions, checkpoint_path=path, checkpoint_every=2, **options)
    assert again.losses == log.losses and again.steps == 6
    for a, b in zip(lora.lora_parameters(resumed.unet), lora.lora_parameters(whole.unet)):
        assert torch.equal(a, b)
    # resume=False starts afresh (the earlier file kept under a new name); the numbers are the same again
    fresh = lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, checkpoint_path=path, resume=False,
                          **options)
    assert fresh.losses == log.losses and path.with_name(f"{path.stem}.v1{path.suffix}").exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_fine_tune_leaves_eval_mode_and_the_ema(tiny_pipe, eight, error):
    three = _fresh(tiny_pipe)
    lora.fit_lora(three, eight.images, eight.captions, rank=2, steps=3, batch_size=4, lr=1e-2, ema=0.9)
    stopped = _fresh(tiny_pipe)
    with pytest.raises(error, match="stopped at step 3"):
        lora.fit_lora(stopped, eight.images, eight.captions, rank=2, steps=6, batch_size=4, lr=1e-2, ema=0.9,
                      callback=_stop_at(3, error))
    assert not any(m.training for m in stopped.unet.modules())
    for a, b in zip(lora.lora_parameters(stopped.unet), lora.lora_parameters(three.unet)):
        assert torch.equal(a, b) and a.grad is None          # the EMA after 3 steps, as a 3-step run leaves it


def test_resuming_another_run_is_refused_naming_what_differs(tiny_pipe, eight, tmp_path):
    path = tmp_path / "ft.safetensors"
    options = dict(rank=2, steps=2, batch_size=4, checkpoint_path=path)
    lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, lr=1e-2, **options)
    with pytest.raises(ValueError, match=r"different run.*lr: checkpoint 0.01, now 0.02; seed"):  # lr alone may
        lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, lr=2e-2, seed=2, **options)   # change
    with pytest.raises(ValueError, match=r"different run.*trained on 8 images, now 4"):
        lora.fit_lora(_fresh(tiny_pipe), eight.images[:4], eight.captions[:4], lr=1e-2, **options)
    with pytest.raises(ValueError, match=r"different run.*seed: checkpoint 0, now 1"):
        lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, lr=1e-2, seed=1, **options)
    with pytest.raises(ValueError, match=r"lora: checkpoint \[\[2, 2.0, 1.0\]\], now \[\[2, 4.0, 1.0\]\]"):
        lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, lr=1e-2, alpha=4.0, **options)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1"):
        lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, lr=1e-2, checkpoint_every=0,
                      **{**options, "checkpoint_path": tmp_path / "other.safetensors"})


def test_fine_tune_takes_another_optimizer_and_resumes_only_with_it(tiny_pipe, eight, tmp_path):
    """8-bit AdamW on a LoRA: every adapter tensor here is under 4,096 numbers, so bitsandbytes' rule keeps its
    moments in float32 (the same bytes as AdamW); forced to 8 bits, each tensor pads to a 2,048-number block."""
    from course_lib.quantize import AdamW8bit
    options = dict(rank=2, steps=4, batch_size=4, lr=1e-2)
    plain = lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, **options)
    ruled = lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions,
                          optimizer=lambda params, lr: AdamW8bit(params, lr=lr, weight_decay=0.0), **options)
    forced = lambda params, lr: AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=0)
    padded = lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, optimizer=forced, **options)
    n = plain.trainable
    assert plain.state_bytes == ruled.state_bytes == 12 * n          # gradients + two float32 moments
    assert padded.state_bytes > plain.state_bytes                      # 2 x 2,048 bytes a tensor, whatever its size
    for log in (ruled, padded):
        assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(log.losses, plain.losses))
    path = tmp_path / "ft.safetensors"
    lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, optimizer=forced, checkpoint_path=path,
                  **{**options, "steps": 2})
    with pytest.raises(ValueError, match=r"different run.*optimizer"):
        lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, checkpoint_path=path, **options)
    again = lora.fit_lora(_fresh(tiny_pipe), eight.images, eight.captions, optimizer=forced, checkpoint_path=path,
                          **options)
    assert again.losses == padded.losses


def test_removing_with_merge_inside_a_temporary_scale_bakes_that_scale_in(unet):
    x, t, ctx = _inputs(unet)
    lora.inject_lora(unet, rank=4)
    _randomise_B(unet)
    with lora.lora_scale(unet, 0.5):
        half = unet(x, t, ctx)
        lora.remove_lora(unet, merge=True)                  # the layers leave the model: nothing to restore
    assert not lora.lora_layers(unet)
    torch.testing.assert_close(unet(x, t, ctx), half, rtol=1e-5, atol=1e-5)


def test_a_damaged_adapter_file_is_refused_by_name(unet, tmp_path):
    from course_lib.checkpoint import CorruptCheckpoint
    lora.inject_lora(unet, rank=2)
    _randomise_B(unet)
    data = lora.save_lora(tmp_path / "a.safetensors", unet).read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    with pytest.raises(CorruptCheckpoint, match="flipped.safetensors does not match its checksum"):
        lora.read_lora(flipped)
    for name, content in (("truncated", data[:50]), ("empty", b"")):
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(CorruptCheckpoint, match=f"{name}.safetensors is not a readable safetensors file"):
            lora.read_lora(tmp_path / f"{name}.safetensors")


def test_nan_images_are_refused_before_fine_tuning_naming_them(tiny_pipe):
    from course_lib.data import load_emoji
    images = load_emoji(size=tiny_pipe.vae.config.image_size, limit=4).images.clone()
    images[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"images holds 1 NaN .* in image\(s\) 2;"):
        lora.fit_lora(tiny_pipe, images, ["a"] * 4, rank=2, steps=2)
    with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
        lora.fit_lora(tiny_pipe, images.nan_to_num(0) * 127.5 + 127.5, ["a"] * 4, rank=2, steps=2)
