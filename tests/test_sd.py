"""Stable Diffusion 1.5 in course_lib (course_lib.sd): parity with diffusers and transformers, offline.

diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel are built with small random
configs (as diffusers' own tests do); their state dicts are converted into course_lib's modules and the outputs
compared in float32. The sampler loop is compared against diffusers' StableDiffusionPipeline with the same
components, scheduler settings and starting latents. The original single-file names are checked against
diffusers' own converter from that layout. Test-only dependencies: diffusers, transformers (via peft).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from course_lib import sd, sd_convert
from course_lib.clip_tokenizer import CLIPTokenizer
from course_lib.text import TextEncoder
from course_lib.unet import UNet
from course_lib.vae import VAE

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# The small diffusers / transformers networks and the pipeline are built by scripts/sd_parity.py (which prints the
# measured differences); loaded from there so the script and the tests compare the same things.
_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sd_parity.py"
_spec = importlib.util.spec_from_file_location("sd_parity", _SCRIPT)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)
TOL = parity.TOL            # the bound on the max absolute difference in float32
small_unet, small_vae, small_text_encoder = parity.small_unet, parity.small_vae, parity.small_text_encoder
convert, max_diff, diffusers_pipeline = parity.convert, parity.max_diff, parity.diffusers_pipeline


def test_parity_script_rows_are_all_within_the_bound():
    rows = parity.measure()
    assert len(rows) == 6
    for what, diff, scale in rows:
        assert diff <= TOL, what
        assert scale > 0.01, what             # real outputs, not zeros on both sides


# --- the text encoder, the tokenizer files and the whole pipeline ------------------------------------------

def test_causal_encoder_ignores_later_tokens():
    cfg = sd.TINY.text
    enc = TextEncoder(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = enc(ids, None), enc(changed, None)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_sampler_loop_matches_diffusers_pipeline(tmp_path):
    pipe, folder = diffusers_pipeline(tmp_path)
    ours = sd.StableDiffusion.from_diffusers_modules(pipe.unet, pipe.vae, pipe.text_encoder,
                                                     CLIPTokenizer.from_directory(folder))
    prompts = ["a red fox", "cat"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe(prompts, height=16, width=16, num_inference_steps=6, guidance_scale=7.5,
                        latents=latents.clone(), output_type="latent").images
    got = ours(prompts, height=16, width=16, steps=6, guidance_scale=7.5, latents=latents, return_latents=True)
    assert max_diff(expected, latents) > 0.1                         # the sampler moved
    assert max_diff(got, expected) <= TOL
    # the prompt matters: another prompt lands elsewhere
    other = ours(["cat", "a red fox"], height=16, width=16, steps=6, latents=latents, return_latents=True)
    assert max_diff(other, got) > 1e-3


def test_from_pretrained_reads_a_diffusers_folder(tmp_path):
    pipe, _ = diffusers_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "model")
    ours = sd.StableDiffusion.from_pretrained(tmp_path / "model")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = pipe.unet(x, 500, encoder_hidden_states=torch.ones(1, 77, 32)).sample
        got = ours.unet(x, 500, torch.ones(1, 77, 32))
    assert max_diff(got, expected) <= TOL
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(ours.tokenizer("a red fox")[0], ids)
    assert ours.scale_factor == pipe.vae.config.scaling_factor


def original_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original release's names, from diffusers' components through
    course_lib's key map (its correctness against diffusers' own converter is the next test)."""
    out = {}
    parts = [("model.diffusion_model.", pipe.unet, UNet, sd_convert.unet_config_from_diffusers(dict(pipe.unet.config))),
             ("first_stage_model.", pipe.vae, VAE, sd_convert.vae_config_from_diffusers(dict(pipe.vae.config))),
             ("cond_stage_model.transformer.", pipe.text_encoder, TextEncoder,
              sd_convert.text_config_from_transformers(pipe.text_encoder.config.to_dict()))]
    for prefix, theirs, kind, cfg in parts:
        ours = convert(kind, theirs, cfg)
        state = ours.state_dict()
        for key, names in sd_convert.key_map(ours, "original").items():
            chunks = state[key].chunk(len(names)) if len(names) > 1 else [state[key]]
            for name, chunk in zip(names, chunks):
                out[prefix + name] = chunk.contiguous().clone()
    # the original VAE keeps its attention projections as 1x1 convolutions
    for k, v in list(out.items()):
        if k.startswith("first_stage_model.") and ".attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            out[k] = v[:, :, None, None]
    return out


def test_original_names_agree_with_diffusers_own_converter(tmp_path):
    from diffusers.loaders import single_file_utils as su
    pipe, _ = diffusers_pipeline(tmp_path)
    original = original_checkpoint(pipe)
    unet_keys = su.convert_ldm_unet_checkpoint(original, dict(pipe.unet.config))
    assert set(unet_keys) == set(pipe.unet.state_dict())
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(unet_keys[k], v, rtol=0, atol=0, msg=k)
    vae_keys = su.convert_ldm_vae_checkpoint(original, dict(pipe.vae.config))
    expected = pipe.vae.state_dict()
    assert set(vae_keys) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(vae_keys[k].reshape(v.shape), v, rtol=0, atol=0, msg=k)


def test_from_pretrained_reads_an_original_single_file(tmp_path):
    pipe, folder = diffusers_pipeline(tmp_path)
    file = tmp_path / "v1-5-tiny.safetensors"
    save_file(original_checkpoint(pipe), str(file))
    config = sd.SDConfig(unet=sd_convert.unet_config_from_diffusers(dict(pipe.unet.config)),
                         vae=sd_convert.vae_config_from_diffusers(dict(pipe.vae.config)),
                         text=sd_convert.text_config_from_transformers(pipe.text_encoder.config.to_dict()))
    with pytest.raises(ValueError, match="holds no tokenizer"):
        sd.StableDiffusion.from_pretrained(file, config=config)
    ours = sd.StableDiffusion.from_pretrained(file, tokenizer=folder, config=config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe("a red fox", height=16, width=16, num_inference_steps=3, latents=latents.clone(),
                        output_type="latent").images
    got = ours("a red fox", height=16, width=16, steps=3, latents=latents, return_latents=True)
    assert max_diff(got, expected) <= TOL
    # a .ckpt goes through torch.load(weights_only=True)
    ckpt = tmp_path / "v1-5-tiny.ckpt"
    torch.save({"state_dict": original_checkpoint(pipe)}, ckpt)
    assert sd_convert.read_state_dict(ckpt).keys() == original_checkpoint(pipe).keys()


# --- what goes wrong -------------------------------------------------------------------------------------

def test_a_missing_key_is_named():
    theirs = small_unet()
    state = dict(theirs.state_dict())
    del state["down_blocks.0.resnets.1.time_emb_proj.weight"]
    with pytest.raises(sd_convert.CheckpointMismatch,
                       match=r"missing keys.*down_blocks\.0\.resnets\.1\.time_emb_proj\.weight"):
        sd_convert.load_weights(UNet(sd_convert.unet_config_from_diffusers(dict(theirs.config))), state, "diffusers")


def test_a_renamed_key_is_named_twice():
    theirs = small_vae()
    state = dict(theirs.state_dict())
    state["encoder.mid_block.attentions.0.query.weight"] = state.pop("encoder.mid_block.attentions.0.to_q.weight")
    with pytest.raises(sd_convert.CheckpointMismatch) as err:
        sd_convert.load_weights(VAE(sd_convert.vae_config_from_diffusers(dict(theirs.config))), state, "diffusers")
    assert err.value.missing == ["encoder.mid_block.attentions.0.to_q.weight"]
    assert err.value.unexpected == ["encoder.mid_block.attentions.0.query.weight"]
    assert "unexpected keys" in str(err.value)


def test_a_wrong_shape_and_a_wrong_source_are_named():
    theirs = small_text_encoder()
    cfg = sd_convert.text_config_from_transformers(theirs.config.to_dict())
    state = dict(theirs.state_dict())
    state["text_model.final_layer_norm.weight"] = torch.ones(7)
    with pytest.raises(sd_convert.CheckpointMismatch, match="wrong shapes: text_model.final_layer_norm.weight"):
        sd_convert.load_weights(TextEncoder(cfg), state, "diffusers")
    with pytest.raises(ValueError, match=r"choose from \['diffusers', 'original'\]"):
        sd_convert.load_weights(TextEncoder(cfg), state, "hub")
    with pytest.raises(sd_convert.CheckpointMismatch, match="missing keys"):
        sd_convert.load_weights(UNet(sd.TINY.unet), small_unet().state_dict(), "original")


def test_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers folder"):
        sd.StableDiffusion.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        sd.StableDiffusion.from_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=".safetensors, .ckpt"):
        bad = tmp_path / "weights.txt"
        bad.write_text("x")
        sd_convert.read_state_dict(bad)


# --- SD 1.5's sizes and the tiny stand-in -------------------------------------------------------------------

def test_sd15_sizes_match_diffusers_and_transformers():
    """The full-size networks, built on the meta device (no memory), have exactly the parameter counts of
    diffusers' and transformers' SD 1.5 configurations, built the same way."""
    with torch.device("meta"):
        ours = {"unet": UNet(sd.SD15.unet), "vae": VAE(sd.SD15.vae), "text": TextEncoder(sd.SD15.text)}
        theirs = {
            "unet": diffusers.UNet2DConditionModel(
                sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
            "vae": diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 4,
                                           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                           sample_size=512),
            "text": transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")),
        }
    for name in ours:
        count = lambda m: sum(p.numel() for p in m.parameters())          # noqa: E731
        assert count(ours[name]) == count(theirs[name]), name
        key_map = sd_convert.key_map(ours[name], "diffusers", set(theirs[name].state_dict()))
        used = {k for names in key_map.values() for k in names}
        assert used == {k for k in theirs[name].state_dict() if not k.endswith("position_ids")}, name
    assert 859e6 < sum(p.numel() for p in ours["unet"].parameters()) < 860e6


def test_tiny_random_model_generates_and_follows_the_prompt():
    model = sd.StableDiffusion.random("tiny")
    a = model(["a red fox", "a red fox"], steps=4, seed=0)
    assert a.shape == (2, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a[0], a[1])                     # seeds seed + k differ
    b = model("a red fox", steps=4, seed=1)
    torch.testing.assert_close(b[0], a[1])                 # ... and image k does not depend on the batch
    c = model("a blue fox", steps=4, seed=0)
    assert max_diff(c[0], a[0]) > 1e-4
    with pytest.raises(ValueError, match="multiple of 16"):
        model("x", height=60)


def test_lora_step_trains_only_the_adapters():
    model = sd.StableDiffusion.random("tiny")
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    params = model.add_lora(rank=2)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    latents = model.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    context = model.encode(["a red fox", "cat"])
    g = torch.Generator().manual_seed(0)
    loss = model.lora_loss(latents, context, g)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    state = model.unet.state_dict()
    for k, v in before.items():
        base = k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        torch.testing.assert_close(state.get(k, state.get(base)), v)    # every base weight unchanged
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_fine_tune_lora_lowers_the_loss_on_its_images():
    from course_lib.data import load_emoji
    model = sd.StableDiffusion.random("tiny")
    emoji = load_emoji(size=64, limit=4)
    run = sd.fine_tune_lora(model, emoji.images, ["an emoji"] * 4, steps=40, rank=4, lr=3e-3, batch_size=4,
                            progress=False)
    assert len(run.losses) == 40 and run.trainable > 0
    first, last = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    assert last < first
    with pytest.raises(ValueError, match="one caption per image"):
        sd.fine_tune_lora(model, emoji.images, ["x"], steps=1)


def test_training_only_keys_of_an_original_file_are_ignored():
    """Some original files carry the autoencoder's training losses (first_stage_model.loss.*) and position ids;
    nothing uses them, so they are neither loaded nor reported as unexpected."""
    theirs = small_vae()
    ours = VAE(sd_convert.vae_config_from_diffusers(dict(theirs.config))).eval()
    converted = sd_convert.convert_state_dict(theirs.state_dict(), ours, "diffusers")
    state = {"first_stage_model." + k: v for k, v in converted.items()}
    original = {}
    for key, names in sd_convert.key_map(ours, "original").items():
        tensor = state["first_stage_model." + key]
        chunks = tensor.chunk(len(names)) if len(names) > 1 else [tensor]
        original.update({"first_stage_model." + n: c for n, c in zip(names, chunks)})
    original["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(3)
    sd_convert.load_weights(ours, original, "original", prefix="first_stage_model.")
    original["first_stage_model.encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(sd_convert.CheckpointMismatch, match="unexpected keys.*first_stage_model.encoder.extra.weight"):
        sd_convert.load_weights(ours, original, "original", prefix="first_stage_model.")


# --- presets, the one generation path, the one objective, the one loop --------------------------------------

def test_presets_and_the_latent_scale():
    assert sd.sd_preset("sd15") is sd.SD15 and sd.sd_preset("tiny") is sd.TINY
    with pytest.raises(ValueError, match=r"unknown Stable Diffusion preset 'xl'; choose from \['sd15', 'tiny'\]"):
        sd.sd_preset("xl")
    assert not hasattr(sd, "get_preset")                   # one name per thing: unet's and vae's presets differ
    assert sd.SD15.scale_factor == sd.SD_LATENT_SCALE == 0.18215
    assert sd.StableDiffusion.random("tiny").scale_factor == sd.SD_LATENT_SCALE
    assert sd.SD15_SAMPLER.options() == dict(sampler="ddim", steps=50, eta=0.0, spacing="leading", offset=1,
                                             final_t=0)
    assert sd.SD15_SAMPLER.guidance_scale == 7.5


def test_sd_generation_shares_the_tiny_pipelines_checks_and_batching():
    model = sd.StableDiffusion.random("tiny")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model([], steps=2)
    with pytest.raises(TypeError, match="every prompt must be a string"):
        model(["a fox", 3], steps=2)
    with pytest.raises(ValueError, match=r"steps must be an int from 1 to 1000 \(the schedule's length T\)"):
        model("a fox", steps=1001)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 8, 8\)"):
        model(["a", "b"], steps=2, latents=torch.zeros(1, 4, 8, 8))
    two = model("a red fox", steps=3, seed=4, images_per_prompt=2, return_latents=True)
    alone = model("a red fox", steps=3, seed=5, return_latents=True)
    torch.testing.assert_close(two[1:], alone, atol=1e-4, rtol=0)     # image k from seed + k
    prompts = ["a red fox", "cat", "a blue fox"]
    torch.testing.assert_close(model.generate(prompts, batch_size=2, steps=3, seed=1, return_latents=True),
                               model(prompts, steps=3, seed=1, return_latents=True), atol=1e-4, rtol=0)


def test_lora_loss_is_the_one_objective_drawing_t_then_noise():
    model = sd.StableDiffusion.random("tiny")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = model.encode(["a red fox", "cat"])
    loss = model.lora_loss(latents, context, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, model.schedule.T, (2,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    abar = model.schedule.alphas_cumprod[t].float()[:, None, None, None]
    with torch.no_grad():
        out = model.unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, context)
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(out, noise), atol=1e-6, rtol=1e-5)


def test_fine_tune_lora_checkpoints_and_resumes_exactly(tmp_path):
    from course_lib.data import load_emoji
    from course_lib.lora import lora_parameters
    emoji = load_emoji(size=64, limit=3)
    captions = ["an emoji"] * 3
    options = dict(rank=2, lr=3e-3, batch_size=2, progress=False)
    straight = sd.StableDiffusion.random("tiny")
    whole = sd.fine_tune_lora(straight, emoji.images, captions, steps=4, **options)
    path = tmp_path / "sd_lora.safetensors"
    first = sd.StableDiffusion.random("tiny")
    sd.fine_tune_lora(first, emoji.images, captions, steps=2, checkpoint_path=path, **options)
    assert path.is_file()
    resumed_model = sd.StableDiffusion.random("tiny")             # a fresh process, as after an interruption
    resumed = sd.fine_tune_lora(resumed_model, emoji.images, captions, steps=4, checkpoint_path=path, **options)
    assert resumed.losses == whole.losses                            # the same steps, bit for bit
    for a, b in zip(lora_parameters(resumed_model.unet), lora_parameters(straight.unet)):
        assert torch.equal(a, b)
    assert not resumed_model.unet.training and all(p.grad is None for p in lora_parameters(resumed_model.unet))
    other = sd.StableDiffusion.random("tiny")
    with pytest.raises(ValueError, match="different run"):
        sd.fine_tune_lora(other, emoji.images, captions, steps=4, checkpoint_path=path, **{**options, "batch_size": 3})
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        sd.fine_tune_lora(other, emoji.images, captions, steps=1, batch_size=0)


def test_a_corrupt_weights_file_is_named_with_what_to_do(tmp_path):
    bad = tmp_path / "v1-5-pruned-emaonly.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"v1-5-pruned-emaonly\.safetensors could not be read.*Download it again"):
        sd_convert.read_state_dict(bad)
    truncated = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"model\.ckpt could not be read.*truncated, corrupt"):
        sd_convert.read_state_dict(truncated)


def test_attention_slicing_changes_no_number_and_tiled_decoding_stays_close():
    model = sd.StableDiffusion.random("tiny")
    whole = model("a red heart", steps=2, seed=1, return_latents=True)
    sliced = model("a red heart", steps=2, seed=1, return_latents=True, attention_slice=1)
    torch.testing.assert_close(sliced, whole, rtol=1e-4, atol=1e-5)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))   # 128 px from the tiny VAE
    full, tiled = model.decode(latents), model.decode(latents, tile=8)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()    # random weights: how close is measured on
    torch.testing.assert_close(model.decode(latents, tile=16), full)    # the trained VAE (the budget notebook)
