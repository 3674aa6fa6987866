"""The mini CLIP (course_lib.clip): configs, the CLIP loss and retrieval against hand computations, fit_clip
(loss falls, the loop's cosine schedule, exact resume after an interruption, deterministic, a different run
refused naming what differs), files, similarity, scores and prompt encoding."""

import math

import pytest
import torch

from course_lib import checkpoint as ckpt
from course_lib.clip import (CLIPConfig, CLIPFit, ImageEncoderConfig, MiniCLIP, clip_config, clip_loss, clip_score,
                             encode_prompts, fit_clip, load_clip, retrieval_accuracy, save_clip, similarity)
from course_lib.data import load_emoji
from course_lib.loop import lr_factor
from course_lib.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(load_emoji(size=8, split="train").captions, vocab_size=512)


@pytest.fixture(scope="module")
def data():
    emoji = load_emoji(size=32, split="train", limit=32)
    return emoji.images, emoji.captions


def tiny_clip(tokenizer, seed=0) -> MiniCLIP:
    torch.manual_seed(seed)
    return MiniCLIP(clip_config("tiny", tokenizer.vocab_size))


# --- configs --------------------------------------------------------------------------------------------

def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match=r"unknown CLIP preset 'huge'; choose from \['tiny', 'small'"):
        clip_config("huge", 512)
    with pytest.raises(ValueError, match="multiple of 8"):
        ImageEncoderConfig(channels=(12,))
    config = clip_config("small", 512)
    assert CLIPConfig.from_json(config.to_json()) == config


# --- loss and retrieval ---------------------------------------------------------------------------------

def test_clip_loss_against_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.0, 3.0, 1.0]])
    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))
    rows, cols = logits.tolist(), logits.T.tolist()
    by_hand = (sum(ce(rows[i], i) for i in range(3)) / 3 + sum(ce(cols[i], i) for i in range(3)) / 3) / 2
    assert clip_loss(logits).item() == pytest.approx(by_hand, rel=1e-6)
    # items 0 and 2 share a caption: each row's target is split evenly over both columns
    soft = (sum(ce(rows[i], 0) + ce(rows[i], 2) for i in (0, 2)) / 2 + ce(rows[1], 1)
            + sum(ce(cols[i], 0) + ce(cols[i], 2) for i in (0, 2)) / 2 + ce(cols[1], 1)) / 6
    assert clip_loss(logits, torch.tensor([0, 1, 0])).item() == pytest.approx(soft, rel=1e-6)


def test_retrieval_accuracy_on_a_constructed_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],     # target 0 ranks 1st
                        [0.8, 0.5, 0.9, 0.0],     # target 1 ranks 3rd
                        [0.3, 0.2, 0.1, 0.0],     # target 2 ranks 3rd
                        [0.1, 0.1, 0.1, 0.4]])    # target 3 ranks 1st
    assert retrieval_accuracy(sim, ks=(1, 2, 3)) == {1: 0.5, 2: 0.5, 3: 1.0}
    assert retrieval_accuracy(sim, torch.tensor([0, 2, 0, 3]), ks=(1,)) == {1: 1.0}
    assert retrieval_accuracy(torch.zeros(4, 4), ks=(1, 4)) == {1: 0.0, 4: 1.0}   # ties count against


# --- training -------------------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss(tokenizer, data):
    images, captions = data
    clip = tiny_clip(tokenizer)
    history = fit_clip(clip, tokenizer, images[:16], captions[:16], steps=30, batch_size=16, lr=3e-3, progress=False)
    assert len(history["loss"]) == history["steps"] == 30 and history["seconds"] > 0
    assert sum(history["loss"][-5:]) / 5 < 0.7 * sum(history["loss"][:5]) / 5


def test_resume_equals_uninterrupted_and_training_is_deterministic(tokenizer, data, tmp_path):
    images, captions = data
    kw = dict(steps=6, batch_size=8, lr=2e-3, augment_shift=1, progress=False)
    straight = tiny_clip(tokenizer)
    expected = fit_clip(straight, tokenizer, images, captions, **kw)
    again = fit_clip(tiny_clip(tokenizer), tokenizer, images, captions, **kw)
    assert again["loss"] == expected["loss"]

    def interrupt(history):
        if history["steps"] == 4:
            raise KeyboardInterrupt                       # e.g. the notebook's stop button after step 4
    path = tmp_path / "clip_run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit_clip(tiny_clip(tokenizer), tokenizer, images, captions, checkpoint_path=path, checkpoint_every=2,
                 callback=interrupt, callback_every=1, **kw)
    resumed = tiny_clip(tokenizer, seed=5)                # other initial weights: the checkpoint replaces them
    history = fit_clip(resumed, tokenizer, images, captions, checkpoint_path=path, **kw)
    assert history["loss"] == expected["loss"] and history["steps"] == 6
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"different run.*To start afresh, pass resume=False \(the earlier file is then kept"):
        fit_clip(tiny_clip(tokenizer), tokenizer, images[:16], captions[:16], checkpoint_path=path, **kw)


def test_the_schedule_is_the_loops_warm_up_and_cosine(tokenizer, data):
    images, captions = data
    history = fit_clip(tiny_clip(tokenizer), tokenizer, images, captions, steps=8, batch_size=8, lr=2e-3, warmup=2,
                       progress=False)
    assert history["lr"] == pytest.approx([2e-3 * lr_factor(s, 8, 2, "cosine") for s in range(8)], rel=1e-12)


def test_a_resume_with_other_settings_or_data_is_refused_naming_what_differs(tokenizer, data, tmp_path):
    images, captions = data
    kw = dict(steps=4, batch_size=8, lr=2e-3, progress=False)
    path = tmp_path / "clip_run.safetensors"
    clip = tiny_clip(tokenizer)

    def stop(history):
        raise KeyboardInterrupt                           # the notebook's stop button, after step 2's checkpoint
    with pytest.raises(KeyboardInterrupt):
        fit_clip(clip, tokenizer, images, captions, checkpoint_path=path, checkpoint_every=2, callback=stop,
                 callback_every=2, **kw)
    assert not clip.training                              # left in eval mode, interrupted or not
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.002, now 0.001; seed"):   # lr alone may change
        fit_clip(tiny_clip(tokenizer), tokenizer, images, captions, checkpoint_path=path, **(kw | {"lr": 1e-3, "seed": 3}))
    with pytest.raises(ValueError, match=r"steps: checkpoint 4, now 6"):   # the cosine schedule depends on it
        fit_clip(tiny_clip(tokenizer), tokenizer, images, captions, checkpoint_path=path, **(kw | {"steps": 6}))
    other = captions[1:] + captions[:1]                   # the same images and number of pairs, other captions
    with pytest.raises(ValueError, match=r"data: checkpoint '[0-9a-f]+', now '[0-9a-f]+'.*resume=False"):
        fit_clip(tiny_clip(tokenizer), tokenizer, images, other, checkpoint_path=path, **kw)
    with pytest.raises(ValueError, match="trained on 32 images, now 16"):
        fit_clip(tiny_clip(tokenizer), tokenizer, images[:16], captions[:16], checkpoint_path=path, **kw)
    history = fit_clip(tiny_clip(tokenizer), tokenizer, images, other, checkpoint_path=path, resume=False, **kw)
    assert history["steps"] == 4                          # resume=False: a fresh run; the earlier file is kept
    assert path.with_name(f"{path.stem}.v1{path.suffix}").exists()


def test_clip_fit_gives_the_loop_only_its_loss_parameters_and_run(tokenizer, data):
    images, captions = data
    clip = tiny_clip(tokenizer)
    run = CLIPFit(clip, tokenizer, images, captions, steps=3, batch_size=8, lr=1e-3, weight_decay=0.1, warmup=1,
                  augment_shift=0, device=torch.device("cpu"), precision="fp32", seed=0)
    assert run.fit_config.grad_clip == 1.0 and run.fit_config.decay == "cosine"
    assert run.batches.drop_remainder and run.batches.generator is run.generator
    assert run.optimizer.defaults["betas"] == (0.9, 0.98) and run.optimizer.defaults["eps"] == 1e-6
    decay, rest = run.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0 and all(p.ndim < 2 for p in rest["params"])
    assert set(run.run_info()) >= {"clip_config", "lr", "batch_size", "seed", "steps", "data", "n_images"}
    run.fit(progress=False)
    assert run.report()["steps"] == 3 and len(run.report()["loss"]) == 3
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; choose from \['fp32', 'bf16'\]"):
        fit_clip(clip, tokenizer, images, captions, steps=1, precision="fp16", progress=False)


# --- using a trained CLIP, and files --------------------------------------------------------------------

def test_save_load_round_trip_with_tokenizer(tokenizer, data, tmp_path):
    images, captions = data
    clip = tiny_clip(tokenizer).eval()
    path = save_clip(tmp_path / "clip.safetensors", clip, tokenizer, info={"steps": 0})
    tensors, meta = ckpt.read(path)
    assert meta["format"] == "course_lib.clip/1" and tensors["logit_scale"].dtype == torch.float16
    loaded, tok, info = load_clip(path)
    assert info == {"steps": 0} and not loaded.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    assert tok.vocab == tokenizer.vocab and tok.max_length == tokenizer.max_length
    sim, sim_loaded = (similarity(m, tokenizer, images[:8], captions[:8]) for m in (clip, loaded))
    torch.testing.assert_close(sim_loaded, sim, atol=5e-3, rtol=0)
    ckpt.atomic_save({"x": torch.zeros(1)}, tmp_path / "other.safetensors", {"format": "course_lib.model/1"})
    with pytest.raises(ValueError, match="not a course_lib CLIP file"):
        load_clip(tmp_path / "other.safetensors")


def test_similarity_score_and_prompt_states(tokenizer, data):
    images, captions = data
    clip = tiny_clip(tokenizer).eval()
    sim = similarity(clip, tokenizer, images[:6], captions[:4], batch_size=4)
    assert sim.shape == (6, 4) and sim.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(clip_score(clip, tokenizer, images[:4], captions[:4]), sim[:4].diagonal())
    big = torch.nn.functional.interpolate(images[:4], scale_factor=2, mode="nearest")   # 64 px -> area back to 32
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(big), clip.encode_image(images[:4]))
    hidden, mask = encode_prompts(clip, tokenizer, ["", "grinning face"])
    assert hidden.shape == (2, 32, clip.config.text.width) and mask[0].sum() == 2 and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(clip, tokenizer, [])
