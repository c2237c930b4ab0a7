"""tokenization/pretokenize.py: the readable twin of GPT-2's pre-tokenizer splits exactly like the library."""

from __future__ import annotations

from helpers.texts import STRESS_TEXT

from tokenization.pretokenize import pretokenize


def test_python_pre_tokenizer_matches_the_library(pydoc_text, tiny_tokenizer):
    pre_tokenizer = tiny_tokenizer.backend_tokenizer.pre_tokenizer
    for text in (pydoc_text[:100_000], STRESS_TEXT):
        assert pretokenize(text) == [word for word, _ in pre_tokenizer.pre_tokenize_str(text)]
