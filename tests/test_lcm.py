"""Latent consistency distillation of the tiny SD through the one loop: exact resume, LCM-LoRA (only the adapters
train, the teacher is the base model, merge and unmerge exact), and two LoRAs at once, checked against peft."""

import copy

import pytest
import torch

from course_lib import lora
from course_lib.lcm import AdaptersOff, LCMConfig, distill_lcm, distill_lcm_lora

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LCMConfig(distilled_steps=10, guidance=(2.0, 4.0))


@pytest.fixture(scope="module")
def eight(tiny_pipe):
    from course_lib.data import load_emoji
    return load_emoji(size=tiny_pipe.vae.config.image_size, split="train", style="twemoji", limit=8)


def _fresh(tiny_pipe):
    pipe = copy.copy(tiny_pipe)
    pipe.unet = copy.deepcopy(tiny_pipe.unet)
    return pipe


def _stop_at(step):
    def callback(run):
        if run.step == step:
            raise KeyboardInterrupt(f"stopped at step {step}")
    return callback


def _inputs(pipe, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, *pipe.latent_shape, generator=g)
    c, m = pipe.encode(["red heart", "blue car"][:B])
    return x, torch.tensor([999, 259][:B]), c, m


def test_an_interrupted_distillation_resumes_bit_identically(tiny_pipe, eight, tmp_path):
    options = dict(config=CONFIG, steps=6, batch_size=4, lr=1e-3)
    teacher = copy.deepcopy(tiny_pipe.unet.state_dict())
    whole, log = distill_lcm(tiny_pipe, eight.images, eight.captions, **options)
    assert all(torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in teacher.items())    # the teacher untouched
    assert log.steps == 6 and all(map(torch.isfinite, torch.tensor(log.losses)))
    path = tmp_path / "lcm.safetensors"
    with pytest.raises(KeyboardInterrupt):
        distill_lcm(tiny_pipe, eight.images, eight.captions, checkpoint_path=path, checkpoint_every=2,
                    callback=_stop_at(3), **options)
    again, log2 = distill_lcm(tiny_pipe, eight.images, eight.captions, checkpoint_path=path, checkpoint_every=2,
                              **options)                     # a new session finds the step-2 checkpoint, EMA target too
    assert log2.losses == log.losses and log2.steps == 6
    for a, b in zip(again.unet.parameters(), whole.unet.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"different run.*lcm.distilled_steps: checkpoint 10, now 20"):
        distill_lcm(tiny_pipe, eight.images, eight.captions, checkpoint_path=path,
                    **{**options, "config": CONFIG.replace(distilled_steps=20)})
    with pytest.raises(ValueError, match=r"different run.*lr_decay"):              # the learning rate's decay too
        distill_lcm(tiny_pipe, eight.images, eight.captions, checkpoint_path=path, lr_decay="cosine", **options)
    # the student samples few-step through the pipeline's one path
    images = whole(["red heart"], seed=0)
    assert whole.sampler_settings.sampler == "lcm" and images.shape == (1, 3, *eight.images.shape[2:])


def test_lcm_lora_trains_only_the_adapters_against_the_base_model(tiny_pipe, eight, tmp_path):
    pipe = _fresh(tiny_pipe)
    x, t, c, m = _inputs(pipe)
    base = pipe.unet(x, t, c, m)
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    options = dict(rank=2, config=CONFIG.replace(target_ema=None), steps=6, batch_size=4, lr=1e-2)
    log = distill_lcm_lora(pipe, eight.images, eight.captions, **options)
    assert log.trainable == sum(p.numel() for p in lora.lora_parameters(pipe.unet))
    for name, layer in lora.lora_layers(pipe.unet).items():          # the base weights did not move
        assert torch.equal(layer.base.weight, frozen[f"{name}.weight"])
    assert torch.equal(AdaptersOff(pipe.unet)(x, t, c, m), base)     # the teacher is the base model, exactly
    adapted = pipe.unet(x, t, c, m)
    assert (adapted - base).abs().max() > 1e-4
    # LCM-LoRA merges and unmerges exactly (course_lib.lora's merge keeps W)
    lora.merge_lora(pipe.unet)
    torch.testing.assert_close(pipe.unet(x, t, c, m), adapted, rtol=0, atol=1e-5)
    lora.unmerge_lora(pipe.unet)
    for name, layer in lora.lora_layers(pipe.unet).items():
        assert torch.equal(layer.base.weight, frozen[f"{name}.weight"])
    assert torch.equal(pipe.unet(x, t, c, m), adapted)
    # exact resume without an EMA target (LCM-LoRA's choice)
    path = tmp_path / "lcm_lora.safetensors"
    with pytest.raises(KeyboardInterrupt):
        distill_lcm_lora(_fresh(tiny_pipe), eight.images, eight.captions, checkpoint_path=path, checkpoint_every=2,
                         callback=_stop_at(3), **options)
    resumed = _fresh(tiny_pipe)
    again = distill_lcm_lora(resumed, eight.images, eight.captions, checkpoint_path=path, checkpoint_every=2,
                             **options)
    assert again.losses == log.losses
    for a, b in zip(lora.lora_parameters(resumed.unet), lora.lora_parameters(pipe.unet)):
        assert torch.equal(a, b)
    z = pipe(["red heart"], settings=options["config"].sampler(steps=2), return_latents=True)
    assert z.shape == (1, *pipe.latent_shape) and torch.isfinite(z).all()


def _randomised_lora(model, seed, rank=2):
    lora.inject_lora(model, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def test_two_loras_combine_as_their_weighted_sum_and_agree_with_peft(tiny_pipe, tmp_path):
    """stack_lora: a style LoRA merged at 0.7, the LCM-LoRA on top at 1.0: W + 0.7 B1 A1 + 1.0 B2 A2, as peft's model
    with both adapters active at those scales; the top adapter still merges, unmerges and rescales on its own."""
    peft = pytest.importorskip("peft")
    pipe = _fresh(tiny_pipe)
    x, t, c, m = _inputs(pipe)
    deltas, files = [], []
    for seed, name in ((1, "style"), (2, "lcm")):
        model = copy.deepcopy(tiny_pipe.unet)
        _randomised_lora(model, seed)
        deltas.append({n: layer.delta_weight() for n, layer in lora.lora_layers(model).items()})
        files.append(lora.save_lora(tmp_path / f"{name}.safetensors", model))
    lora.load_lora(files[0], pipe.unet)
    lora.set_lora_scale(pipe.unet, 0.7)
    meta = lora.stack_lora(files[1], pipe.unet, scale=1.0)
    assert meta["rank"] == 2 and all(layer.scale == 1.0 for layer in lora.lora_layers(pipe.unet).values())
    combined = pipe.unet(x, t, c, m)

    by_hand = copy.deepcopy(tiny_pipe.unet)                  # float16 files: the deltas of what was saved
    style, lcm = ({n: layer.delta_weight() for n, layer in lora.lora_layers(_loaded(tiny_pipe, f)).items()}
                  for f in files)
    with torch.no_grad():
        for n in style:
            by_hand.get_submodule(n).weight += 0.7 * style[n] + lcm[n]
    torch.testing.assert_close(combined, by_hand(x, t, c, m), rtol=0, atol=1e-5)

    theirs = copy.deepcopy(tiny_pipe.unet)
    targets = sorted(lora.lora_layers(pipe.unet))
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, config, adapter_name="style")
    theirs.add_adapter("lcm", config)
    with torch.no_grad():
        for f, adapter in zip(files, ("style", "lcm")):
            tensors, _ = lora.read_lora(f)
            for n in targets:
                layer = theirs.base_model.model.get_submodule(n)
                layer.lora_A[adapter].weight.copy_(tensors[f"{n}.lora_A"].float())
                layer.lora_B[adapter].weight.copy_(tensors[f"{n}.lora_B"].float())
    theirs.base_model.set_adapter(["style", "lcm"])
    for n in targets:
        theirs.base_model.model.get_submodule(n).set_scale("style", 0.7)
    difference = (theirs(x, t, c, m) - combined).abs().max().item()
    print(f"\ntwo LoRAs (style at 0.7, LCM at 1.0) against peft: max |difference| {difference:.2e}")
    assert difference < 1e-5

    lora.merge_lora(pipe.unet)                                 # the top adapter alone merges and unmerges
    torch.testing.assert_close(pipe.unet(x, t, c, m), combined, rtol=0, atol=1e-5)
    lora.unmerge_lora(pipe.unet)
    assert torch.equal(pipe.unet(x, t, c, m), combined)
    with lora.lora_scale(pipe.unet, 0.0):                      # the style alone stays, baked into the base
        only_style = copy.deepcopy(tiny_pipe.unet)
        with torch.no_grad():
            for n in style:
                only_style.get_submodule(n).weight += 0.7 * style[n]
        torch.testing.assert_close(pipe.unet(x, t, c, m), only_style(x, t, c, m), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        lora.stack_lora(files[1], pipe.unet, scale=float("nan"))


def _loaded(tiny_pipe, path):
    model = copy.deepcopy(tiny_pipe.unet)
    lora.load_lora(path, model)
    return model


def test_distillation_lowers_its_loss(tiny_pipe, eight):
    pipe = _fresh(tiny_pipe)
    log = distill_lcm_lora(pipe, eight.images, eight.captions, rank=4, config=CONFIG.replace(target_ema=None,
                           guidance=3.0, loss="l2"), steps=40, batch_size=8, lr=3e-2)
    first, last = sum(log.losses[:8]) / 8, sum(log.losses[-8:]) / 8
    assert last < first, (first, last)
