"""The course's BPE tokenizer (course_lib.tokenizer): round trip on every caption, UNK, truncation, padding,
determinism, the merge rule, JSON files, and the one merge step that the CLIP tokenizer shares."""

import random

import pytest
import torch

from course_lib.data import load_emoji
from course_lib.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, merge_pair, pretokenize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captions():
    return load_emoji(size=8, split="all").captions


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(load_emoji(size=8, split="train").captions, vocab_size=512)


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


def test_merge_pair_joins_non_overlapping_pairs_left_to_right():
    assert merge_pair(["a", "a", "a", "b"], ("a", "a")) == ["aa", "a", "b"]
    assert merge_pair(["▁", "c", "d"], ("c", "d")) == ["▁", "cd"]
    assert merge_pair(["x"], ("x", "y")) == ["x"]


def test_bad_tokenizer_inputs_name_what_is_valid(tokenizer):
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        Tokenizer([], max_length=1)
    with pytest.raises(ValueError, match="uses a symbol that no earlier merge made"):
        Tokenizer([("zz", "q")])
    with pytest.raises(ValueError, match=r"outside the vocabulary \(0..511\)"):
        tokenizer.decode([600])
    with pytest.raises(ValueError, match="different alphabet than course_lib.tokenizer.ALPHABET"):
        Tokenizer.from_json(tokenizer.to_json().replace('"marker": "▁"', '"marker": "_"'))
