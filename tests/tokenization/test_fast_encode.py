"""tokenization/fast_encode.py: the data pipeline's encoder gives the tokenizer's own ids."""

from __future__ import annotations

from helpers.texts import STRESS_TEXT

import tokenization
from tokenization import (
    EOS_TOKEN,
    encode_batch_fast,
    train_bpe,
)


def test_encode_batch_fast_gives_the_tokenizers_ids(gpt2_pair, shared_data, tiny_tokenizer):
    tokenizer, _ = gpt2_pair
    paragraphs = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000].split("\n\n")
    expected = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(paragraphs, add_special_tokens=False)]
    assert encode_batch_fast(tokenizer, paragraphs, num_threads=2) == expected
    assert encode_batch_fast(tokenizer, paragraphs, engine="tokenizers") == expected
    texts = [STRESS_TEXT, "", EOS_TOKEN, "plain words"]
    assert encode_batch_fast(tiny_tokenizer, texts, engine="tiktoken") == [tiny_tokenizer.encode(t) for t in texts]


def test_tiktoken_twin_of_a_trained_tokenizer_matches_on_whole_corpus(shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    tokenizer = train_bpe([text], 1000, show_progress=False)
    twin = tokenization.tiktoken_encoding(tokenizer)
    for sample in (text, STRESS_TEXT):
        assert twin.encode(sample, allowed_special="all") == tokenizer.encode(sample)
