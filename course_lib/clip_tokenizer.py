r"""CLIP's tokenizer, as Stable Diffusion 1.5 uses it: byte-level BPE that reads the standard vocab.json and merges.txt.

    "A Photo of  a cat" --clean--> "a photo of a cat" --regex--> ["a", "photo", "of", "a", "cat"]
        --bytes, BPE per word--> ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
        --vocab--> [49406, 320, 1125, 539, 320, 2368, 49407, 49407, ..., 49407]    (77 ids, SD 1.5's files)
                    BOS    the five words of the text      EOS    padding

Byte-pair encoding [1] starts from single symbols and replays a list of merges ("t" + "h" -> "th",
then "th" + "e</w>" -> "the</w>", ...), learned from a corpus by repeatedly joining its most frequent
adjacent pair. merges.txt holds that list in the order it was learned; the line number is the merge's
rank. Encoding a word applies, again and again, the lowest-ranked merge that occurs anywhere in it,
until no listed pair is left; the resulting pieces are looked up in vocab.json (piece -> id).

Byte-level [2]: the starting symbols are the word's UTF-8 bytes, not its characters. 256 symbols then
spell every text in every script (an emoji is four bytes), so no character is ever unknown. The files
are text, and a merge line is "left right" split on a space, so each byte is written as one printable
character (`bytes_to_unicode`): the 188 bytes that are printable Latin-1 characters stand for
themselves ("a" is "a"), and the other 68 (controls, space, DEL, no-break space, soft hyphen) get
chr(256), chr(257), ... in order. So the space byte is "Ġ" and a newline "Ċ"; "é" (bytes C3 A9) is
spelled "Ã©". The map is a bijection, so decoding reverses it exactly.

Word ends, CLIP's way: CLIP [3] appends "</w>" to the last symbol of every word, Sennrich's original
convention [1], so "low</w>" (the whole word "low") and "low" (the start of "lower") are different
tokens. GPT-2 [2] instead keeps the space in front of a word as its first byte ("Ġlow"). CLIP drops
all whitespace before BPE, so decoding, which turns each "</w>" into a space, puts a space after every
word: "a cat, sitting 42" comes back as "a cat , sitting 4 2".

Cleaning and pre-tokenising. OpenAI's CLIP cleans a text with ftfy.fix_text, html.unescape (twice),
collapses runs of whitespace into one space, strips and lower-cases it. ftfy is not a dependency here:
we keep its Unicode NFC normalisation (composed accents, as ftfy and transformers both do) and skip
its other repairs (mojibake, curly quotes to straight, ligatures, full-width letters), so for example
"don’t" splits as don / ’ / t where OpenAI's would give don / 't. A case-insensitive regex then
cuts the text into words, each encoded on its own:
    <|startoftext|>|<|endoftext|>     the special tokens, kept whole
    's|'t|'re|'ve|'m|'ll|'d           English contractions:  "it's" -> "it", "'s"
    [\p{L}]+                          a run of letters, any script
    [\p{N}]                           ONE digit:             "2024" -> "2", "0", "2", "4"
    [^\s\p{L}\p{N}]+                  a run of anything else but whitespace: "!!!", "...", "&"
(`regex` is needed for \p{L} and \p{N}; Python's `re` has no Unicode categories.)

Special tokens and length. The CLIP text encoder has 77 positions ([3] Section 2.4): a prompt becomes
[<|startoftext|>] + at most 75 ids + [<|endoftext|>], padded to 77 with the pad token. SD 1.5 pads with
<|endoftext|> itself (id 49407, the same as EOS), so padding cannot be found by its id; use the mask
this tokenizer returns (True at BOS, the text and EOS). SD 2 pads with "!" (id 0); `from_directory`
reads the pad token from the tokenizer's config files. SD 1.5's vocab has 49408 entries: 256 bytes, the
same 256 with "</w>", 48894 merges and the two specials.

Unknown pieces: a piece missing from vocab.json becomes <|endoftext|>, the unknown token that
transformers' CLIPTokenizer uses too. With CLIP's own files this never happens, since every byte (with
and without "</w>") is in the vocab and every merge's result is checked to be.

References:
  [1] Sennrich, Haddow & Birch 2016, Neural Machine Translation of Rare Words with Subword Units,
      https://arxiv.org/abs/1508.07909
  [2] Radford et al. 2019, Language Models are Unsupervised Multitask Learners (GPT-2, Section 2.2),
      https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf
  [3] Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision (CLIP),
      https://arxiv.org/abs/2103.00020
"""

from __future__ import annotations

import html
import json
import math
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable

import regex
import torch

from .checks import check_int
from .tokenizer import merge_pair     # one BPE merge step, the same as the course's own tokenizer's

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = EOS_TOKEN                  # what a piece missing from the vocab becomes (as in transformers)
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77                    # the CLIP text encoder's positions, BOS and EOS included
PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                        regex.IGNORECASE)
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")    # read in this order; later wins
_NO_LIMIT = 10**6                      # transformers writes int(1e30) as model_max_length for "no limit"
_CACHE_SIZE = 100_000                  # words whose pieces are remembered
_WHERE_FROM = ("These files are not part of the course: take them from the tokenizer/ folder of the Stable "
               "Diffusion 1.5 download (or any CLIP tokenizer).")


def bytes_to_unicode() -> dict[int, str]:
    """The reversible map of the 256 byte values to printable characters (GPT-2's byte-level BPE [2])."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in table]                  # 68 bytes: controls, space, ...
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return dict(sorted(table.items()))


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning without ftfy: NFC, html.unescape twice, whitespace runs to one space, strip, lower."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def pretokenize(text: str) -> list[str]:
    """Clean `text` and cut it into the words that BPE encodes one by one (CLIP's regex, above)."""
    return PATTERN.findall(clean_text(text))


def _check_text(text: object, where: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str; got {type(text).__name__}")
    return text


def _check_vocab(vocab: dict[str, int]) -> None:
    for special in (BOS_TOKEN, EOS_TOKEN):
        if special not in vocab:
            raise ValueError(f"the vocab has no {special!r}; a CLIP vocab.json holds both {BOS_TOKEN!r} and "
                             f"{EOS_TOKEN!r} (ids 49406 and 49407 in SD 1.5's)")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"the vocab's ids must be 0..{len(vocab) - 1}, each used once")


def _check_merges(merges: list[tuple[str, str]], vocab: dict[str, int]) -> None:
    for n, merge in enumerate(merges):
        if len(merge) != 2 or not all(isinstance(s, str) for s in merge):
            raise ValueError(f"merge {n} must be a pair of strings like ('t', 'h'); got {merge!r}")
        for piece in (*merge, merge[0] + merge[1]):
            if piece not in vocab:
                raise ValueError(f"merge {n} {merge!r} uses or makes {piece!r}, which is not in the vocab; "
                                 f"vocab.json and merges.txt must come from the same tokenizer")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. A CLIP tokenizer needs {VOCAB_FILE} (piece -> id) and "
                                f"{MERGES_FILE} (the BPE merges, one pair a line). {_WHERE_FROM}")
    return path


def read_vocab(path: str | Path) -> dict[str, int]:
    """vocab.json: one JSON object, piece -> id."""
    path = _existing(path)
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected an object of piece -> id") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path} must hold a JSON object of piece -> integer id")
    return vocab


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """merges.txt: an optional '#version' first line, then one 'left right' pair a line in rank order."""
    path = _existing(path)
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        symbols = line.split()
        if len(symbols) != 2:
            raise ValueError(f"{path}, line {number}: a merge is two symbols separated by a space, "
                             f"like 't h'; got {line!r}")
        merges.append((symbols[0], symbols[1]))
    return merges


def read_tokenizer_json(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tokenizer.json (the `tokenizers` library's one-file format, which newer downloads and transformers 5's
    save_pretrained write instead of vocab.json + merges.txt): the same vocab and merges, under "model"."""
    path = Path(path)
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a tokenizers JSON file with model.vocab and model.merges ({err})") from None
    if model.get("type", "BPE") != "BPE" or model.get("end_of_word_suffix") not in (None, END_OF_WORD):
        raise ValueError(f"{path} holds a {model.get('type')} model with end_of_word_suffix "
                         f"{model.get('end_of_word_suffix')!r}; CLIP's is BPE with {END_OF_WORD!r}")
    pairs = []
    for number, merge in enumerate(merges, start=1):      # "a b" strings (older files) or ["a", "b"] lists
        symbols = merge.split(" ") if isinstance(merge, str) else merge
        if len(symbols) != 2:
            raise ValueError(f"{path}: merge {number} is not two symbols; got {merge!r}")
        pairs.append((symbols[0], symbols[1]))
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    vocab = dict(vocab) | {t["content"]: t["id"] for t in added if "content" in t and "id" in t}
    return vocab, pairs


def _tokenizer_folder(path: Path) -> Path:
    """`path` itself if it holds vocab.json (or tokenizer.json), else its tokenizer/ subfolder (a diffusers
    model folder)."""
    for folder in (path, path / "tokenizer"):
        if (folder / VOCAB_FILE).is_file() or (folder / TOKENIZER_JSON).is_file():
            return folder
    raise FileNotFoundError(f"no {VOCAB_FILE} (or {TOKENIZER_JSON}) in {path} or in {path / 'tokenizer'}. Pass a "
                            f"folder holding {VOCAB_FILE} and {MERGES_FILE}, or a diffusers model folder with a "
                            f"tokenizer/ subfolder. {_WHERE_FROM}")


def _read_config(folder: Path) -> dict:
    """pad_token and model_max_length from tokenizer_config.json / special_tokens_map.json, where present."""
    config = {}
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        pad = data.get("pad_token")
        if isinstance(pad, dict):                      # {"content": "!", "lstrip": false, ...}
            pad = pad.get("content")
        if pad is not None and not isinstance(pad, str):
            raise ValueError(f"{path}: pad_token must be a string or an object with 'content'; got {pad!r}")
        if pad is not None:
            config["pad_token"] = pad
        length = data.get("model_max_length")
        if isinstance(length, int) and length < _NO_LIMIT:
            config["model_max_length"] = length
    return config


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer [3], built from a vocab (piece -> id) and a ranked list of merges.

    >>> tok = CLIPTokenizer.from_directory("stable-diffusion-v1-5")     # the folder with tokenizer/ in it
    >>> tok.tokens("a photo of a cat")          # ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'cat</w>']
    >>> ids, mask = tok(["a photo of a cat", "a dog"])     # (2, 77) long, (2, 77) bool
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = CONTEXT_LENGTH,
                 pad_token: str = EOS_TOKEN):
        _check_vocab(vocab)
        merges = [tuple(m) for m in merges]
        _check_merges(merges, vocab)
        max_length = check_int("max_length", max_length, 2, hint=" (room for BOS and EOS)")
        if pad_token not in vocab:
            raise ValueError(f"pad_token {pad_token!r} is not in the vocab; SD 1.5 pads with {EOS_TOKEN!r}, "
                             f"SD 2 with '!'")
        self.vocab = dict(vocab)
        self.pieces = {i: piece for piece, i in vocab.items()}        # id -> piece
        self.merges = merges
        self.ranks = {pair: rank for rank, pair in reversed(list(enumerate(merges)))}    # first listing wins
        self.max_length = max_length
        self.pad_token = pad_token
        self._cache: dict[str, list[str]] = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path, max_length: int = CONTEXT_LENGTH,
                   pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """Read vocab.json and merges.txt (the files in SD 1.5's tokenizer/ folder)."""
        return cls(read_vocab(vocab_path), read_merges(merges_path), max_length, pad_token)

    @classmethod
    def from_directory(cls, path: str | Path, max_length: int | None = None,
                       pad_token: str | None = None) -> "CLIPTokenizer":
        """Read a tokenizer folder, or a diffusers model folder's tokenizer/. pad_token and model_max_length
        come from its tokenizer_config.json / special_tokens_map.json where present; arguments given here win."""
        folder = _tokenizer_folder(Path(path))
        config = _read_config(folder)
        if max_length is None:
            max_length = config.get("model_max_length", CONTEXT_LENGTH)
        if pad_token is None:
            pad_token = config.get("pad_token", EOS_TOKEN)
        if not (folder / VOCAB_FILE).is_file():
            return cls(*read_tokenizer_json(folder / TOKENIZER_JSON), max_length, pad_token)
        return cls.from_files(folder / VOCAB_FILE, folder / MERGES_FILE, max_length, pad_token)

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def unk_id(self) -> int:
        return self.vocab[UNK_TOKEN]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"max_length={self.max_length}, pad_token={self.pad_token!r})")

    def bpe(self, word: str) -> list[str]:
        """One byte-mapped word -> its pieces: apply the lowest-ranked merge until none applies ([1] Section 3.2)."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]                # the last symbol carries the word end
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            symbols = merge_pair(symbols, pair)
        if len(self._cache) < _CACHE_SIZE:
            self._cache[word] = symbols
        return symbols

    def tokens(self, text: str) -> list[str]:
        """The BPE pieces of `text`, without BOS/EOS, e.g. ['a</w>', 'photo</w>'] (bytes shown as their characters)."""
        words = pretokenize(_check_text(text))
        return [piece for word in words
                for piece in self.bpe("".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8")))]

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without BOS/EOS and not truncated; a piece missing from the vocab becomes UNK."""
        return [self.vocab.get(piece, self.unk_id) for piece in self.tokens(text)]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids -> text: BOS, EOS and pad ids dropped, "</w>" turned into a space, bytes back to UTF-8, stripped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence of ids (a 1-D tensor); got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        skip = {self.bos_id, self.eos_id, self.pad_id}
        pieces = []
        for i in ids:
            if int(i) not in self.pieces:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if int(i) not in skip:
                pieces.append(self.pieces[int(i)])
        data = bytes(CHAR_TO_BYTE[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, max_length) long, mask (B, max_length) bool): [BOS] + ids + [EOS], padded with pad_id;
        mask is True at BOS, the text and EOS. A text longer than max_length - 2 pieces is cut, with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str; got {type(texts).__name__}")
        B, L = len(texts), self.max_length            # batch, positions
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.bool)
        for row, text in enumerate(texts):
            body = self.encode(_check_text(text, f"texts[{row}]"))
            if len(body) > L - 2:
                warnings.warn(f"prompt is {len(body)} tokens long; the limit is {L - 2} (plus BOS and EOS), so "
                              f"{len(body) - (L - 2)} were cut: {text[:60]!r}", stacklevel=2)
            seq = [self.bos_id, *body[:L - 2], self.eos_id]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = True
        return ids, mask
