"""CLIP's byte-level BPE tokenizer without torch, for the fast `grape search` path.

open_clip's `SimpleTokenizer` is pure Python, but its module imports torch (seconds on a
cold start). This is an independent implementation of the same algorithm: the same text
cleaning (ftfy, HTML unescaping, whitespace, lower case), the same pre-tokenising
pattern, GPT-2's byte-to-unicode table, greedy lowest-rank BPE merges with a `</w>`
end-of-word marker, and `<start_of_text>` ... `<end_of_text>` truncated to the context
length with the end token kept. It reads the merges file open_clip ships
(`bpe_simple_vocab_16e6.txt.gz`), copied into the index at export time, and
`check_same_ids` proves the ids equal open_clip's on probe texts before any index uses it.

Imports only the standard library and numpy; ftfy and `regex` are imported the first
time a text is not plain printable ASCII (for such text they change nothing, and they
cost about 0.1 s to import).
"""

from __future__ import annotations

import gzip
import html
import re
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

SOT, EOT = "<start_of_text>", "<end_of_text>"
N_MERGES = 49152 - 256 - 2  # open_clip uses the first 48,894 merges of the file
END_OF_WORD = "</w>"

# What open_clip's pattern matches. For ASCII text, \p{L} is [a-z] (the text is lower
# cased first) and \p{N} is [0-9], so the standard library's `re` does; anything else
# needs the `regex` module's Unicode classes.
_PATTERN = (
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_ASCII_PATTERN = re.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+",
    re.IGNORECASE,
)

# Probe texts: an exported tokenizer must give open_clip's ids on every one of them.
PROBES = (
    "a red star",
    "A Photo of  THE   Eiffel Tower at night!!",
    "it's a dog's life, isn't it? they'll've gone",
    "2 cats & 3 dogs &amp; 1 &lt;bird&gt; &#x2019; caf&eacute;",
    "夕阳下的猫",
    "红色的圆形在左边 蓝色背景",
    "🐶🐱 emoji party 🎉🇫🇷",
    "Ünïcödé naïve café résumé ﬂubberiﬁc ＬＯＵＤ",
    "tabs\tand\nnew lines\r\nand\u00a0nbsp",
    "<start_of_text> literal specials <end_of_text>",
    "numbers 1234567890 and ½ ² Ⅻ",
    "mojibake: Ã©tÃ© â€œquotedâ€\x9d",
    "a very long rambling description " * 30,
    "",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: the 188 printable bytes map
    to themselves, the other 68 to the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _is_plain(text: str) -> bool:
    """Printable ASCII with no HTML entity: ftfy and HTML unescaping leave it as it is."""
    return text.isascii() and text.isprintable() and "&" not in text


def clean(text: str) -> str:
    """open_clip's default ('lower') cleaning."""
    if not _is_plain(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """`tokenize(texts)` -> int64 array (n, context_length), equal to open_clip's ids."""

    def __init__(self, merges: list[str], context_length: int = 77):
        byte_chars = list(bytes_to_unicode().values())
        vocab = [*byte_chars, *(c + END_OF_WORD for c in byte_chars)]
        # Each merge's token in one C-level pass over the text, not a loop of 48,894 joins.
        vocab += "\n".join(merges).replace(" ", "").split("\n") if merges else []
        vocab += [SOT, EOT]
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))  # a repeat: the last
        self.ranks = dict(zip(merges, range(len(merges)), strict=True))  # "a b" -> priority
        self.byte_encoder = bytes_to_unicode()
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self._cache = {SOT: [SOT], EOT: [EOT]}
        self._unicode_pattern = None

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 77) -> ClipTokenizer:
        """Read a merges file in open_clip's format: one header line, then one merge
        ("first second") a line; gzipped (as shipped) or plain (as `save` writes it)."""
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").split("\n", N_MERGES + 1)[1 : N_MERGES + 1]
        return cls(lines, context_length)

    def save(self, path: str | Path) -> None:
        """Write the merges in use, uncompressed: a quarter of the shipped file's lines,
        and no gunzip, make `from_file` about 50 ms faster on a cold start."""
        merges = sorted(self.ranks, key=self.ranks.__getitem__)
        header = "#version: 0.2 (the merges open_clip uses)\n"
        Path(path).write_text(header + "\n".join(merges) + "\n", encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _pattern(self, text: str):
        if text.isascii():
            return _ASCII_PATTERN
        if self._unicode_pattern is None:
            import regex

            self._unicode_pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        return self._unicode_pattern

    def bpe(self, word: str) -> list[str]:
        """The BPE symbols of one pre-token (already mapped through the byte table)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = {f"{a} {b}" for a, b in pairwise(symbols)}
            best = min(pairs, key=lambda p: self.ranks.get(p, N_MERGES))
            if best not in self.ranks:
                break
            first, second = best.split(" ")
            merged, i = [], 0
            while i < len(symbols):  # every occurrence, left to right, not overlapping
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start/end tokens or truncation."""
        text = clean(text)
        ids: list[int] = []
        for piece in self._pattern(text).findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids

    def count_tokens(self, text: str) -> int:
        """Tokens the text encoder would see before truncation, start and end included."""
        return len(self.encode(text)) + 2

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """int64 (len(texts), context_length), as open_clip's tokenizer returns them."""
        return self.pack([self.encode(text) for text in texts])

    def pack(self, encoded: list[list[int]]) -> np.ndarray:
        """`encode` results framed by the start and end tokens, truncated, zero-padded."""
        import numpy as np

        out = np.zeros((len(encoded), self.context_length), dtype=np.int64)
        for row, ids in enumerate(encoded):
            ids = [self.sot, *ids, self.eot][: self.context_length]
            ids[-1] = self.eot  # a truncated text still ends with the end token
            out[row, : len(ids)] = ids
        return out


def plain_open_clip_tokenizer(tokenizer) -> bool:
    """Whether an open_clip tokenizer is the plain CLIP BPE this module reimplements:
    `SimpleTokenizer` with the default cleaning, no extra special tokens, truncation."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:
        return False
    return (
        type(tokenizer) is SimpleTokenizer
        and tokenizer.clean_fn is _clean_lower
        and tokenizer.reduction_fn is None
        and tokenizer.vocab_size == N_MERGES + 512 + 2
    )


def open_clip_vocab_file() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def check_same_ids(ours: ClipTokenizer, theirs, texts=PROBES) -> bool:
    """True when `ours` gives exactly open_clip's token ids on every text."""
    expected = theirs(list(texts)).numpy()
    return bool((ours.tokenize(list(texts)) == expected).all())
