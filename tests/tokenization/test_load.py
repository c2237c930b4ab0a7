"""tokenization/load.py: loading a saved tokenizer, the one rule relating it to a model, its fingerprint."""

from __future__ import annotations

import pytest

from tokenization import train_bpe
from tokenization.corpus import DataError
from tokenization.load import check_tokenizer, load_tokenizer, tokenizer_fingerprint


def test_a_saved_tokenizer_loads_with_the_same_ids_and_fingerprint(tiny_tokenizer, tmp_path, text):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tiny_tokenizer)
    assert load_tokenizer(tiny_tokenizer) is tiny_tokenizer


def test_another_vocabulary_has_another_fingerprint(pydoc_text, tiny_tokenizer):
    other = train_bpe([pydoc_text[:50_000]], 400, show_progress=False)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tiny_tokenizer)


def test_missing_tokenizers_are_named(tmp_path):
    with pytest.raises(DataError, match="no tokenizer given"):
        load_tokenizer(None)
    with pytest.raises(DataError, match=r"no tokenizer at .*empty: expected a folder with tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_one_rule_exactly_the_models_vocabulary_and_the_message_says_which_way(tiny_tokenizer):
    check_tokenizer(tiny_tokenizer, 512)
    with pytest.raises(DataError, match="has 512 tokens but the model's vocabulary has only 500: ids above"):
        check_tokenizer(tiny_tokenizer, 500)
    with pytest.raises(DataError, match="has 512 tokens but the model's vocab_size is 600: train or load"):
        check_tokenizer(tiny_tokenizer, 600)
