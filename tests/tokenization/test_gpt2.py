"""tokenization/gpt2.py: OpenAI's released GPT-2 tokenizer files give exactly tiktoken's ids."""

from __future__ import annotations

import pytest
from helpers.texts import STRESS_TEXT
from transformers import PreTrainedTokenizerFast


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "the-verdict.txt", "stress"])
def test_gpt2_tokenizer_matches_tiktoken(gpt2_pair, shared_data, name):
    tokenizer, tiktoken_gpt2 = gpt2_pair
    text = STRESS_TEXT if name == "stress" else (shared_data / name).read_text(encoding="utf-8")
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    if name == "the-verdict.txt":
        assert len(ids) == 5145  # the book's number for this story


def test_gpt2_tokenizer_basics(gpt2_pair):
    tokenizer, _ = gpt2_pair
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
    assert tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tokenizer.decode(tokenizer.encode(STRESS_TEXT)) == STRESS_TEXT
