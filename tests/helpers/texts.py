"""Texts that stress tokenizers, and the reference encoding of documents."""

from __future__ import annotations

import numpy as np

from tokenization import (
    EOS_TOKEN,
    PAD_TOKEN,
)

# Everything byte-level BPE must survive: emoji (with ZWJ), CJK, combining marks, tabs, runs of
# spaces and newlines, CRLF, NBSP, zero-width space, unusual Unicode whitespace, specials.
STRESS_TEXT = (
    "Tabs\t\tand  double  spaces   \n\n\n  \r\n emoji 🌍🎉👩‍👩‍👧 café naïve e\u0301 日本語 Ελληνικά "
    "‘quotes’ — x\u00a0y\u200bz it's I'LL we'd 123456 3.14 \x1c\u2028\u3000 ½ ٣ "
    f"{EOS_TOKEN}after{PAD_TOKEN}  trailing   \n"
)


# Multi-byte characters of every UTF-8 length, so byte and character counts differ.
UNICODE_TEXT = "Naïve café — 日本語のテキスト, emoji 🙂🚀, math ∑√π, and plain ASCII.\n\tTabs  and  spaces."


def encode_reference(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Each non-blank document encoded alone by the Rust backend, with <|endoftext|> appended."""
    return [
        np.array(tokenizer.backend_tokenizer.encode(d, add_special_tokens=False).ids + [tokenizer.eos_token_id])
        for d in docs
        if d.strip()
    ]
