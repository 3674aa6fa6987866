"""The CLIP tokenizer on a tiny vocab written here: ids worked out by hand, BOS/EOS/padding to 77 and the mask,
truncation, decode round trip, the regex's splits, config files (SD 2's "!" pad), diffusers folders, every error,
and agreement with transformers.CLIPTokenizer on varied texts.

The tiny vocab, in byte order so ids can be worked out by hand:
    id b        the byte b's character (bytes_to_unicode()[b]), b = 0..255
    id 256 + b  the same with "</w>" (the byte ends a word)
    id 512 + r  the result of merge r of MERGES
    then <|startoftext|> (521) and <|endoftext|> (522).
"""

import json
import re
import warnings

import pytest
import torch

from course_lib.clip_tokenizer import (BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, bytes_to_unicode, clean_text, read_tokenizer_json,
                                       pretokenize, read_merges)

pytestmark = pytest.mark.usefixtures("one_thread")

MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("t", "h"), ("th", "e</w>"),     # 512..516
          ("lo", "w"), ("low", "er</w>"), ("a", "n"), ("an", "d</w>")]                  # 517..520
LO, LOW_W, ER_W, TH, THE_W, LOW, LOWER_W, AN, AND_W = range(512, 521)
BOS, EOS = 521, 522


def byte_id(char: str, end: bool = False) -> int:
    """The tiny vocab's id of an ASCII character as a symbol, with '</w>' if end."""
    return ord(char) + 256 * end


def tiny_vocab(merges=MERGES, drop=()) -> dict[str, int]:
    chars = [bytes_to_unicode()[b] for b in range(256)]
    pieces = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    pieces = [p for p in pieces if p not in drop]
    return {piece: i for i, piece in enumerate(pieces)}


def write_files(folder, vocab=None, merges=MERGES, config=None, special_map=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocab() if vocab is None else vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(files):
    return CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt")


# --- Pieces and ids -----------------------------------------------------------------------------------

def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[0xE9] == "é"   # printable: themselves
    assert table[0] == "Ā" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"  # moved to chr(256 + n)


def test_ids_worked_out_by_hand(tok):
    # lower: l o w e r</w> -> lo w e r</w> (rank 0) -> lo w er</w> (2) -> low er</w> (5) -> lower</w> (6)
    assert tok.tokens("lower") == ["lower</w>"]
    assert tok.encode("the lower and low") == [THE_W, LOWER_W, AND_W, LOW_W]
    # lowest: lo w e s t</w> -> low e s t</w>; no merge for (low, e), (e, s), (s, t</w>)
    assert tok.encode("lowest") == [LOW, byte_id("e"), byte_id("s"), byte_id("t", end=True)]
    # hello: (l, o) never meets: the o is "o</w>"
    assert tok.encode("hello") == [byte_id("h"), byte_id("e"), byte_id("l"), byte_id("l"), byte_id("o", end=True)]
    # café: c a f, then é as its two UTF-8 bytes C3 A9, the last one ending the word
    assert tok.encode("café") == [byte_id("c"), byte_id("a"), byte_id("f"), 0xC3, 256 + 0xA9]
    assert tok.tokens("café") == ["c", "a", "f", "Ã", "©</w>"]


def test_cleaning_case_whitespace_html_and_nfc(tok):
    assert clean_text("  The\tLOWER\n\n and  ") == "the lower and"
    assert tok.encode("THE  Lower") == tok.encode("the lower")
    assert clean_text("fish &amp;amp; chips") == "fish & chips"            # unescaped twice, as OpenAI does
    assert tok.encode("fish &amp; chips") == tok.encode("fish & chips")
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")                # NFC: e + combining acute = é


def test_regex_splits_punctuation_numbers_and_contractions():
    assert pretokenize("It's 2024, they'll say: wow!!! ok...") == [
        "it", "'s", "2", "0", "2", "4", ",", "they", "'ll", "say", ":", "wow", "!!!", "ok", "..."]
    assert pretokenize("I'M WE'VE you'd DON'T") == ["i", "'m", "we", "'ve", "you", "'d", "don", "'t"]
    assert pretokenize("3.14 x²") == ["3", ".", "1", "4", "x", "²"]         # ² is a number (\p{N})
    assert pretokenize("東京タワー") == ["東京タワー"]                          # letters of any script
    assert pretokenize("a<|endoftext|>b") == ["a", EOS_TOKEN, "b"]


def test_special_tokens_in_the_text_stay_whole(tok):
    assert tok.encode(f"and {EOS_TOKEN} and") == [AND_W, EOS, AND_W]
    assert tok.tokens(BOS_TOKEN) == [BOS_TOKEN]


def test_unknown_piece_becomes_endoftext():
    vocab = tiny_vocab(drop={"z</w>"})
    tok = CLIPTokenizer(vocab, MERGES)
    assert tok.encode("z") == [tok.eos_id]
    assert tok.encode("and z") == [tok.vocab["and</w>"], tok.eos_id]


# --- Batches: BOS, EOS, padding, mask, truncation -------------------------------------------------------

def test_bos_eos_padding_and_mask(tok):
    ids, mask = tok(["the lower", ""])
    assert ids.shape == mask.shape == (2, 77) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0].tolist() == [BOS, THE_W, LOWER_W, EOS] + [EOS] * 73             # SD 1.5 pads with EOS
    assert mask[0].tolist() == [True] * 4 + [False] * 73
    assert ids[1].tolist() == [BOS, EOS] + [EOS] * 75 and mask[1].sum() == 2
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS, EOS, EOS, 523)
    single, _ = tok("the lower")
    assert torch.equal(single, ids[:1])


def test_long_text_is_truncated_with_eos_last(tok):
    with pytest.warns(UserWarning, match="100 tokens long; the limit is 75"):
        ids, mask = tok("a " * 100)
    assert ids[0].tolist() == [BOS] + [byte_id("a", end=True)] * 75 + [EOS]
    assert mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("a " * 75)                                                       # exactly fits: no warning


def test_decode_round_trip(tok):
    for text in ["the lower and lowest", "a quick brown fox jumps over the lazy dog", "hello world"]:
        assert tok.decode(tok.encode(text)) == text
    ids, _ = tok("the lower")
    assert tok.decode(ids[0]) == "the lower"                                 # BOS, EOS, padding dropped
    # What CLIP loses: case, and where spaces were (one after every word; digits are words of their own)
    assert tok.decode(tok.encode("Café, naïve! 42")) == "café , naïve ! 4 2"


def test_max_length_and_repr(files):
    tok = CLIPTokenizer.from_files(files / "vocab.json", files / "merges.txt", max_length=5)
    ids, mask = tok("and")
    assert ids.tolist() == [[BOS, AND_W, EOS, EOS, EOS]] and mask.tolist() == [[True] * 3 + [False] * 2]
    assert repr(tok) == "CLIPTokenizer(vocab_size=523, merges=9, max_length=5, pad_token='<|endoftext|>')"


# --- Files and folders --------------------------------------------------------------------------------

def test_sd2_pad_token_from_tokenizer_config(tmp_path):
    folder = write_files(tmp_path / "sd2", config={"pad_token": "!", "model_max_length": 77})
    tok = CLIPTokenizer.from_directory(folder)
    assert tok.pad_id == byte_id("!") and tok.max_length == 77
    ids, mask = tok("the")
    assert ids[0, :5].tolist() == [BOS, THE_W, EOS, byte_id("!"), byte_id("!")]
    assert mask[0].sum() == 3
    assert tok.decode(ids[0]) == "the"


def test_pad_token_as_dict_in_special_tokens_map_wins(tmp_path):
    folder = write_files(tmp_path / "t", config={"pad_token": EOS_TOKEN, "model_max_length": 16},
                         special_map={"pad_token": {"content": "!", "lstrip": False}})
    tok = CLIPTokenizer.from_directory(folder)
    assert (tok.pad_token, tok.max_length) == ("!", 16)
    assert CLIPTokenizer.from_directory(folder, max_length=8, pad_token=EOS_TOKEN).pad_id == EOS    # arguments win


def test_no_limit_model_max_length_falls_back_to_77(tmp_path):
    folder = write_files(tmp_path / "t", config={"model_max_length": int(1e30)})
    assert CLIPTokenizer.from_directory(folder).max_length == 77


def test_from_directory_on_a_diffusers_folder(tmp_path):
    model = tmp_path / "stable-diffusion-v1-5"
    write_files(model / "tokenizer", config={"pad_token": EOS_TOKEN, "model_max_length": 77})
    (model / "model_index.json").write_text("{}")
    tok = CLIPTokenizer.from_directory(model)
    assert tok.encode("the lower") == [THE_W, LOWER_W] and tok.pad_id == EOS


def test_merges_file_header_and_blank_lines(tmp_path):
    path = tmp_path / "merges.txt"
    path.write_text("#version: 0.2\nl o\n\nlo w</w>\n   \n", encoding="utf-8")
    assert read_merges(path) == [("l", "o"), ("lo", "w</w>")]


# --- Errors -------------------------------------------------------------------------------------------

def test_missing_files_say_what_is_expected(tmp_path, files):
    with pytest.raises(FileNotFoundError, match=r"nope\.json not found.*vocab\.json.*merges\.txt.*tokenizer/"):
        CLIPTokenizer.from_files(tmp_path / "nope.json", files / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt not found"):
        CLIPTokenizer.from_files(files / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"no vocab\.json \(or tokenizer\.json\) in .* or in .*tokenizer.*diffusers"):
        CLIPTokenizer.from_directory(tmp_path)


def test_bad_merges_line_names_its_number(tmp_path):
    path = tmp_path / "merges.txt"
    path.write_text("#version: 0.2\nl o\nlo w </w>\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: a merge is two symbols"):
        read_merges(path)


def test_bad_vocab_and_merges():
    vocab = tiny_vocab()
    for special in (BOS_TOKEN, EOS_TOKEN):
        with pytest.raises(ValueError, match=f"no '{re.escape(special)}'"):
            CLIPTokenizer(tiny_vocab(drop={special}), MERGES)
    with pytest.raises(ValueError, match="ids must be 0..522"):
        CLIPTokenizer({**vocab, EOS_TOKEN: 600}, MERGES)
    with pytest.raises(ValueError, match="not in the vocab; vocab.json and merges.txt must come from the same"):
        CLIPTokenizer(vocab, MERGES + [("low", "est</w>")])
    with pytest.raises(ValueError, match="must be a pair of strings"):
        CLIPTokenizer(vocab, [("l", "o", "w")])


def test_bad_options_and_inputs(tok):
    vocab = tiny_vocab()
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"max_length must be an int >= 2 \(room for BOS and EOS\)"):
            CLIPTokenizer(vocab, MERGES, max_length=bad)
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in the vocab.*'!'"):
        CLIPTokenizer(vocab, MERGES, pad_token="<pad>")
    with pytest.raises(TypeError, match="text must be a str; got int"):
        tok.encode(3)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str; got NoneType"):
        tok(["the", None])
    with pytest.raises(TypeError, match="texts must be a str or a list of str; got dict"):
        tok({"the": 1})
    with pytest.raises(ValueError, match=r"token id 9999 is outside the vocabulary \(0..522\)"):
        tok.decode([BOS, 9999])
    with pytest.raises(ValueError, match="1-D tensor"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


# --- Against transformers -----------------------------------------------------------------------------

# Left out on purpose: "fish &amp; chips" (we html-unescape as OpenAI's CLIP does, transformers does not) and
# "<|ENDOFTEXT|>" in capitals (we lower-case it into the special token as OpenAI does; transformers matches
# special tokens before lower-casing, so it BPE-encodes the capitals' letters), and a word-final capital sigma
# ("ΟΔΟΣ": Python's str.lower gives the final form ς, as in OpenAI's CLIP; the tokenizers library gives σ).
AGREEMENT_TEXTS = [
    "a photograph of an astronaut riding a horse",
    "The LOWER and the Lowest!",
    "it's, they're, we've, I'm, you'll, he'd, DON'T",
    "2024 was 3.14159 times better than 1999",
    "café naïve résumé",
    "cafe\u0301 decomposed",
    "emoji 🤵\u200d♂️ and 東京 tower",
    "   spaces\t\tand\nnewlines   ",
    "punctuation!!! ... ?!? (brackets) [x] {y} hello_world-foo+bar=baz",
    "don’t curly quotes",                     # neither side has ftfy: both keep the curly quote
    "a <|endoftext|> b",
    "",
    "the lower and lowest " * 30,              # truncated to 77
]


def test_agrees_with_transformers(tok, files):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                       # the truncation warning
        ids, mask = tok(AGREEMENT_TEXTS)
    expected = reference(AGREEMENT_TEXTS, padding="max_length", max_length=77, truncation=True)
    for row, text in enumerate(AGREEMENT_TEXTS):
        assert ids[row].tolist() == expected["input_ids"][row], text
        assert mask[row].long().tolist() == expected["attention_mask"][row], text
        assert tok.decode(ids[row]) == reference.decode(expected["input_ids"][row], skip_special_tokens=True), text


def test_reads_tokenizer_json_as_transformers_saves_it(tok, files, tmp_path):
    """transformers 5 saves a tokenizer as one tokenizer.json (no vocab.json / merges.txt); the same vocab,
    merges and special tokens come back from it."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"),
                                           model_max_length=77)
    reference.save_pretrained(tmp_path / "saved")
    if (tmp_path / "saved" / "vocab.json").exists():
        (tmp_path / "saved" / "vocab.json").unlink()                     # force the one-file path
    loaded = CLIPTokenizer.from_directory(tmp_path / "saved")
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    texts = AGREEMENT_TEXTS[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(loaded(texts)[0], tok(texts)[0])
    (tmp_path / "bad.json").write_text('{"model": {"type": "Unigram", "vocab": [], "merges": []}}')
    with pytest.raises(ValueError, match="CLIP's is BPE"):
        read_tokenizer_json(tmp_path / "bad.json")
