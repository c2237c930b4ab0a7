"""GPT-2 byte-level pre-tokenization in plain Python, and the special-token split.

The `tokenizers` library does the real work; this module is the readable twin the reference
trainer, the merge trace and the tiktoken bridge share, so "the same pre-tokenization" means
one piece of code. `tests/tokenization/test_pretokenize.py` checks it against the library on real text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence

import regex

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Declared once: the trainer, the HF wrapper and the atomicity check all read this tuple.
# `<|endoftext|>` separates documents and doubles as eos and bos (as in GPT-2).
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)

# GPT-2's split pattern (openai/gpt-2 encoder.py), the one tokenizers' ByteLevel(use_regex=True)
# uses: contractions, letter runs, digit runs, punctuation runs, each with at most one leading
# space; whitespace runs leave their last space to the following word.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, so every byte is a visible vocabulary symbol.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) are shifted
    to code points 256+ in byte order. Space becomes 'Ġ' (U+0120) and newline 'Ċ' (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def byte_chars(text: str) -> str:
    """`text` as UTF-8 bytes, each written as its byte-level character."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def token_bytes(token: str) -> bytes:
    """Inverse of `byte_chars` for one vocabulary entry (may be a partial UTF-8 sequence)."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in token)


def pretokenize(text: str) -> list[str]:
    """Split `text` the way GPT-2 does and write each piece in byte-level characters."""
    return [byte_chars(piece) for piece in _GPT2_SPLIT.findall(text)]


@functools.cache
def _special_split_regex(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so a special token that contains another one wins (leftmost-longest, as
    # tokenizers' added-vocabulary matcher does).
    alternatives = sorted(special_tokens, key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in alternatives))


def segment_special_tokens(text: str, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> list[tuple[str, bool]]:
    """`text` cut into (piece, is_special) segments, in order, dropping empty pieces."""
    if not special_tokens:
        return [(text, False)] if text else []
    segments: list[tuple[str, bool]] = []
    position = 0
    for match in _special_split_regex(tuple(special_tokens)).finditer(text):
        if match.start() > position:
            segments.append((text[position : match.start()], False))
        segments.append((match.group(), True))
        position = match.end()
    if position < len(text):
        segments.append((text[position:], False))
    return segments


def split_on_special_tokens(text: str, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> list[str]:
    """The non-empty stretches of `text` between special tokens.

    Encoding cuts special tokens out before pre-tokenization, but tokenizers' trainer does not:
    fed raw text, it learns merges such as '<|' and 'endoftext'. Training therefore sees what
    encoding sees, the text between the special tokens.
    """
    return [piece for piece, special in segment_special_tokens(text, special_tokens) if not special]


# The longest run without whitespace the BPE trainer sees as one word. Each merge rescans the words
# holding its pair, so one word of a text without spaces (2 MB of it took 240 s with no output)
# costs its length per merge; real words are far shorter, so ordinary text is never cut.
MAX_WORD_CHARS = 1000
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


def iter_training_pieces(
    texts: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS, long_words: list[int] | None = None
) -> Iterator[str]:
    """Every stretch of training text the BPE trainer counts, in corpus order; runs of more than
    `MAX_WORD_CHARS` characters without whitespace are cut into pieces of that length, each
    counted in `long_words` (appended to, if given) so that the caller can warn."""
    for text in texts:
        for piece in split_on_special_tokens(text, special_tokens):
            if _LONG_WORD.search(piece) is None:
                yield piece
                continue
            start = 0
            for match in _LONG_WORD.finditer(piece):
                yield piece[start : match.start()]
                run = match.group()
                yield from (run[i : i + MAX_WORD_CHARS] for i in range(0, len(run), MAX_WORD_CHARS))
                if long_words is not None:
                    long_words.append(len(run))
                start = match.end()
            yield piece[start:]


def readable(token: str) -> str:
    """A byte-level token as a person reads it: '␣' for space, '↵' for newline, '⇥' for tab,
    and <XX> for bytes that are not a whole UTF-8 character on their own."""
    text = _decode_showing_partial_bytes(token_bytes(token))
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def _decode_showing_partial_bytes(data: bytes) -> str:
    parts = []
    while data:
        try:
            parts.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            parts.append(data[: error.start].decode("utf-8"))
            parts.append("".join(f"<{b:02X}>" for b in data[error.start : error.end]))
            data = data[error.end :]
    return "".join(parts)
