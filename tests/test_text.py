"""The text side: BPE tokenizer (round trip on every caption, UNK, truncation, padding, determinism),
the text encoder (padding never leaks into real tokens), the CLIP loss and retrieval against hand
computations, and fit_clip (loss falls, exact resume, deterministic), files and prompt encoding."""

import math
import random

import pytest
import torch

from course_lib import checkpoint as ckpt
from course_lib.data import load_emoji
from course_lib.text import (BOS, EOS, PAD, UNK, CLIPConfig, ImageEncoderConfig, MiniCLIP, TextEncoder,
                             TextEncoderConfig, Tokenizer, clip_config, clip_loss, clip_score, encode_prompts,
                             fit_clip, load_clip, pretokenize, retrieval_accuracy, save_clip, similarity)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captions():
    return load_emoji(size=8, split="all").captions


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


# --- tokenizer ------------------------------------------------------------------------------------------

def test_round_trip_on_every_caption_of_every_split(tokenizer, captions):
    assert len(captions) == 3786
    for caption in captions:
        ids = tokenizer.encode(caption)                   # also: no caption needs truncation at 32 tokens
        assert ids[0] == BOS and ids[-1] == EOS and UNK not in ids
        assert tokenizer.decode(ids) == caption
        assert "".join(tokenizer.tokens(caption)).replace("▁", " ")[1:] == caption


def test_pieces_are_words_and_subwords(tokenizer):
    assert tokenizer.vocab_size == 512
    assert tokenizer.tokens("man in tuxedo: dark skin tone")[-3:] == ["▁dark", "▁skin", "▁tone"]
    assert tokenizer.tokens("hand sign")[0] == tokenizer.tokens("hand: dark")[0] == "▁hand"   # punctuation split off
    assert pretokenize("a-b c") == [("▁", "a"), ("-",), ("b",), ("▁", "c")]


def test_unknown_characters_become_unk_and_decode_as_question_marks(tokenizer):
    ids = tokenizer.encode("Cat ñ!")                      # upper case is lowered; ñ and ! are not in the alphabet
    assert ids.count(UNK) == 2
    assert tokenizer.tokens("Cat ñ!")[-2:] == ["<unk>", "<unk>"]
    assert tokenizer.decode(ids) == "cat ??"
    assert tokenizer.decode(tokenizer.encode("  grinning   FACE ")) == "grinning face"   # whitespace normalised


def test_over_long_prompt_is_truncated_with_a_warning_and_keeps_eos(tokenizer):
    prompt = " ".join(["grinning face"] * 20)
    n = len(tokenizer.tokens(prompt)) + 2
    with pytest.warns(UserWarning, match=rf"{n} tokens long .* limit is 32"):
        ids = tokenizer.encode(prompt)
    assert len(ids) == 32 and ids[0] == BOS and ids[-1] == EOS
    with pytest.warns(UserWarning, match="limit is 8"):
        batch, mask = tokenizer([prompt, "red heart"], max_length=8)
    assert batch[0, -1] == EOS and mask[0].all()


def test_padding_and_mask_shapes(tokenizer):
    ids, mask = tokenizer(["grinning face", "waving hand sign: dark skin tone", ""])
    assert ids.shape == mask.shape == (3, 32) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, text in zip(range(3), ["grinning face", "waving hand sign: dark skin tone", ""]):
        n = len(tokenizer.encode(text))
        assert mask[row].sum() == n and mask[row, :n].all()
        assert (ids[row, n:] == PAD).all() and ids[row, n - 1] == EOS
    assert ids[2, :2].tolist() == [BOS, EOS]              # the empty prompt
    assert tokenizer("red heart")[0].shape == (1, 32)
    assert tokenizer(["red heart"], max_length=12)[1].shape == (1, 12)


def test_training_is_deterministic_and_ignores_caption_order(captions):
    subset = captions[::8]
    shuffled = subset[:]
    random.Random(1).shuffle(shuffled)
    a, b = Tokenizer.train(subset, vocab_size=150), Tokenizer.train(shuffled, vocab_size=150)
    assert a.merges == b.merges and a.vocab == b.vocab and a.vocab_size == 150


def test_merges_follow_counts_then_a_fixed_tie_rule():
    tok = Tokenizer.train(["ab ab cd cd cd"], vocab_size=59)  # 57 base symbols + 2 merges
    # (c, d) and (▁, c) occur 3 times; the tie goes to the pair that sorts first: "c" < "▁" (U+2581)
    assert tok.merges == [("c", "d"), ("▁", "cd")]
    assert tok.tokens("cd ab") == ["▁cd", "▁", "a", "b"]
    with pytest.raises(ValueError, match="vocab_size must be at least 57"):
        Tokenizer.train(["ab"], vocab_size=20)


def test_tokenizer_json_round_trip(tokenizer):
    again = Tokenizer.from_json(tokenizer.to_json())
    assert again.vocab == tokenizer.vocab and again.max_length == tokenizer.max_length
    text = "flag: côte d’ivoire"
    assert again.encode(text) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="not a course_lib tokenizer"):
        Tokenizer.from_json('{"format": "something else"}')


# --- text encoder ---------------------------------------------------------------------------------------

def test_padding_never_changes_real_tokens(tokenizer):
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, width=32, layers=2, heads=4)).eval()
    ids, mask = tokenizer(["grinning face", "man in tuxedo: medium-light skin tone"])
    scrambled = torch.where(mask, ids, torch.randint(4, tokenizer.vocab_size, ids.shape))
    with torch.no_grad():
        out, out2 = encoder(ids, mask), encoder(scrambled, mask)
        n = int(mask[0].sum())
        alone = encoder(ids[:1, :n], mask[:1, :n])        # the first prompt without any padding at all
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out[:1, :n], alone)
    assert (out[~mask] == 0).all() and out.shape == (2, 32, 32)
    pooled = TextEncoder.pool(out, mask)
    torch.testing.assert_close(pooled[0], out[0, :n].mean(0))


def test_bad_inputs_and_configs_are_rejected():
    encoder = TextEncoder(TextEncoderConfig(vocab_size=10, max_length=4, width=8, heads=2, layers=1))
    ids = torch.tensor([[1, 5, 2, 0]])
    with pytest.raises(ValueError, match="token ids must be in 0..9"):
        encoder(torch.tensor([[1, 12, 2, 0]]), ids != 0)
    with pytest.raises(ValueError, match="at least one True"):
        encoder(ids, torch.zeros_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        encoder(ids, (ids != 0).long())
    with pytest.raises(ValueError, match=r"width \(30\) must be divisible by heads \(4\)"):
        TextEncoderConfig(vocab_size=10, width=30, heads=4)
    with pytest.raises(ValueError, match="unknown CLIP preset 'huge'; valid are tiny, small"):
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
    with pytest.raises(ValueError, match="another model or dataset"):
        fit_clip(tiny_clip(tokenizer), tokenizer, images[:16], captions[:16], checkpoint_path=path, **kw)


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
