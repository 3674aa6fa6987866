r"""The course's BPE tokenizer: captions to token ids (notebook 08, section 1).

    caption --normalize--> "waving hand sign: dark skin tone" --pretokenize--> words, each a tuple of symbols
            --BPE merges--> pieces ['▁waving', '▁hand', '▁sign', ':', '▁dark', ...] --ids--> [BOS, ..., EOS, PAD...]

Byte-pair encoding [1]: start from single characters; repeatedly merge the most frequent adjacent pair of
symbols in the training captions into a new symbol, until the vocabulary has `vocab_size` entries. Encoding
a new text replays the merges in the order they were learned. Merges happen only inside a word.

Word boundaries: a word that follows a space starts with the marker "▁" (SentencePiece's convention [2];
GPT-2 writes it "Ġ"), so decoding is "join the pieces, turn ▁ into a space" and decode(encode(s)) == s
exactly. CLIP [3] instead appends "</w>" to a word's last piece and splits punctuation off as its own word,
which loses whether there was a space before the punctuation ("tuxedo: light" and "tuxedo :light" encode
alike; course_lib.clip_tokenizer reads CLIP's real files). Here punctuation is a word of its own too, so
"hand" is the same token in "hand sign" and "hand: dark skin tone".

Special tokens, fixed ids: PAD 0 (fills a batch to max_length), BOS 1 and EOS 2 (around every text),
UNK 3 (a character outside ALPHABET). The text encoder that reads these ids is course_lib.text.

References:
  [1] Sennrich, Haddow & Birch 2016, Neural Machine Translation of Rare Words with Subword Units,
      https://arxiv.org/abs/1508.07909
  [2] Kudo & Richardson 2018, SentencePiece: A simple and language independent subword tokenizer,
      https://arxiv.org/abs/1808.06226
  [3] Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision (CLIP),
      https://arxiv.org/abs/2103.00020
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from typing import Iterable

import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
MARKER = "▁"                                   # U+2581: "a space came before this word"
WORD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789ãåçéíôü"
PUNCTUATION = "&(),*-.:’"
ALPHABET = WORD_CHARS + PUNCTUATION            # plus the space, which becomes MARKER
UNKNOWN_TEXT = "?"                             # how decode shows an unknown character
FORMAT = "course_lib.tokenizer/1"
_PRETOKEN = re.compile(f" ?[{re.escape(WORD_CHARS)}]+| ?[^ ]")


def normalize(text: str) -> str:
    """Lower case, runs of whitespace turned into one space, no space at either end (as CLIP does).
    Every emoji caption is already normal, so for captions decode(encode(s)) == s."""
    return " ".join(text.lower().split())


def pretokenize(text: str) -> list[tuple[str, ...]]:
    """Text -> words, each a tuple of starting symbols: a run of letters/digits or one other character,
    with MARKER in front when a space preceded it. The text gets one leading space (SentencePiece's
    "dummy prefix"), so the first word is spelled like any other. Unknown characters become "<unk>"."""
    words = []
    for match in _PRETOKEN.finditer(" " + normalize(text)):
        word = match.group()
        symbols = [MARKER] if word[0] == " " else []
        symbols += [c if c in ALPHABET else SPECIALS[UNK] for c in word.lstrip(" ")]
        words.append(tuple(symbols))
    return words


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by the joined symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class Tokenizer:
    """Byte-pair encoding over characters within words ([1], Algorithm 1), with fixed special tokens.

    ids:  0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then ▁ and the alphabet's characters, then one new symbol
    per merge, in the order the merges were learned.
    >>> tok = Tokenizer.train(captions, vocab_size=512)
    >>> tok.tokens("waving hand sign: dark skin tone")      # e.g. ['▁waving', '▁hand', '▁sign', ':', ...]
    >>> ids, mask = tok(["grinning face", "red heart"])    # (2, 32) long, (2, 32) bool
    """

    def __init__(self, merges: Iterable[tuple[str, str]], max_length: int = 32, added: Iterable[str] = ()):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for BOS and EOS); got {max_length}")
        self.max_length = int(max_length)
        self.merges = [tuple(m) for m in merges]
        self.vocab: list[str] = list(SPECIALS) + [MARKER] + list(ALPHABET)
        known = set(self.vocab)
        for a, b in self.merges:
            if a not in known or b not in known:
                raise ValueError(f"merge {(a, b)} uses a symbol that no earlier merge made")
            if a + b not in known:                 # two merges can spell the same string; one id for both
                self.vocab.append(a + b)
                known.add(a + b)
        self.added: list[str] = []             # whole words given their own token after training (DreamBooth)
        self.ids = {piece: i for i, piece in enumerate(self.vocab)}
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self._cache: dict[tuple[str, ...], list[str]] = {}
        for word in added:
            self.add_word(word)

    def add_word(self, word: str) -> int:
        """Give `word` (letters and digits) one new token at the end of the vocabulary; returns its id.
        Wherever the word stands alone in a text it becomes that token instead of its BPE pieces.
        The text encoder needs a matching new embedding row (course_lib.dreambooth.add_identifier)."""
        if not isinstance(word, str) or not word or any(c not in WORD_CHARS for c in word):
            raise ValueError(f"an added word must be non-empty and use only {WORD_CHARS!r}; got {word!r}")
        piece = MARKER + word
        if piece in self.ids:
            raise ValueError(f"{word!r} is already one token (id {self.ids[piece]}); choose a word the "
                             f"tokenizer splits into pieces, so its token is new")
        self.vocab.append(piece)
        self.ids[piece] = len(self.vocab) - 1
        self.added.append(word)
        self._cache[(MARKER, *word)] = [piece]
        return self.ids[piece]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, max_length={self.max_length})"

    @classmethod
    def train(cls, captions: list[str], vocab_size: int = 512, max_length: int = 32) -> "Tokenizer":
        """Learn merges from `captions` until the vocabulary has vocab_size entries (or no pair occurs twice).

        Each step merges the most frequent adjacent pair, counted over all words of all captions; ties go
        to the pair that sorts first, so the result does not depend on the order of the captions. A pair
        seen only once is not merged: it would spend a token on memorising one word."""
        base = len(SPECIALS) + 1 + len(ALPHABET)
        if vocab_size < base:
            raise ValueError(f"vocab_size must be at least {base} (4 special tokens, ▁ and {len(ALPHABET)} "
                             f"characters); got {vocab_size}")
        counts = Counter(word for caption in captions for word in pretokenize(caption))
        words = [(list(word), n) for word, n in sorted(counts.items())]
        merges: list[tuple[str, str]] = []
        vocab = set(SPECIALS) | {MARKER} | set(ALPHABET)
        while len(vocab) < vocab_size:
            pairs: Counter = Counter()
            for symbols, n in words:
                for pair in zip(symbols, symbols[1:]):
                    pairs[pair] += n
            candidates = [(-n, pair) for pair, n in pairs.items() if n >= 2 and SPECIALS[UNK] not in pair]
            if not candidates:
                break
            _, best = min(candidates)                  # most frequent, then first in sort order
            merges.append(best)
            vocab.add(best[0] + best[1])
            words = [(merge_pair(symbols, best) if len(symbols) > 1 else symbols, n) for symbols, n in words]
        return cls(merges, max_length)

    def _bpe(self, word: tuple[str, ...]) -> list[str]:
        """One word's pieces: apply the learned merges in the order they were learned ([1], Section 3.2)."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(symbols, symbols[1:]))
            if rank == math.inf:
                break
            symbols = merge_pair(symbols, pair)
        self._cache[word] = symbols
        return symbols

    def tokens(self, text: str) -> list[str]:
        """The pieces of `text` (no BOS/EOS), e.g. ['▁grinning', '▁face']; unknown characters show as '<unk>'."""
        return [piece for word in pretokenize(text) for piece in self._bpe(word)]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """[BOS, ids..., EOS] without padding. Longer than max_length: truncated to keep BOS ... EOS, with a warning."""
        limit = self.max_length if max_length is None else max_length
        if limit < 2:
            raise ValueError(f"max_length must be at least 2 (room for BOS and EOS); got {limit}")
        ids = [BOS] + [self.ids[piece] for piece in self.tokens(text)] + [EOS]
        if len(ids) > limit:
            warnings.warn(f"prompt is {len(ids)} tokens long (with BOS and EOS); the limit is {limit}, so it was "
                          f"truncated to {limit} tokens: {text[:60]!r}", stacklevel=2)
            ids = ids[:limit - 1] + [EOS]
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids -> text. PAD, BOS and EOS are skipped; an unknown character (UNK) shows as '?'."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i == UNK:
                pieces.append(UNKNOWN_TEXT)
            elif i not in (PAD, BOS, EOS):
                pieces.append(self.vocab[i])
        text = "".join(pieces).replace(MARKER, " ")
        return text[1:] if text.startswith(" ") else text        # the dummy prefix space

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long padded with PAD, mask (B, L) bool True at real tokens), L = max_length for every batch."""
        if isinstance(texts, str):
            texts = [texts]
        L = self.max_length if max_length is None else max_length
        ids = torch.full((len(texts), L), PAD, dtype=torch.long)
        for b, text in enumerate(texts):
            row = self.encode(text, L)
            ids[b, :len(row)] = torch.tensor(row)
        return ids, ids != PAD

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "alphabet": ALPHABET, "marker": MARKER,
                           "max_length": self.max_length, "merges": [list(m) for m in self.merges],
                           "added": list(self.added)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a course_lib tokenizer (format {data.get('format')!r}; expected {FORMAT!r})")
        if data["alphabet"] != ALPHABET or data["marker"] != MARKER:
            raise ValueError("this tokenizer was trained with a different alphabet than course_lib.tokenizer.ALPHABET")
        return cls([tuple(m) for m in data["merges"]], data["max_length"], data.get("added", ()))


__all__ = ["PAD", "BOS", "EOS", "UNK", "SPECIALS", "MARKER", "WORD_CHARS", "PUNCTUATION", "ALPHABET",
           "normalize", "pretokenize", "merge_pair", "Tokenizer"]
