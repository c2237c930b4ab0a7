"""tokenization/reference_bpe.py: the plain-Python trainer learns tokenizers' merges, merge for merge.

Reference-trainer equality: `tokenization.reference_bpe` reproduces tokenizers' BpeTrainer
merge for merge. The library's tie-break (tokenizers/src/models/bpe/trainer.rs, `impl Ord for
Merge`): highest pair count first; among equal counts the pair with the smallest
(left id, right id), where ids are special tokens first, then the 256 byte symbols sorted by
code point, then new tokens in creation order. The tests below assert the full merge lists and
vocabularies are identical, including on a corpus built so that every choice is a tie.
"""

from __future__ import annotations

from tokenization import (
    learned_merges,
    train_bpe,
    train_reference_bpe,
)


def assert_same_training(texts, vocab_size, min_frequency=2):
    library = train_bpe(texts, vocab_size, min_frequency=min_frequency, show_progress=False)
    reference = train_reference_bpe(texts, vocab_size, min_frequency=min_frequency)
    assert reference.reused == []
    merges = learned_merges(library)
    first_difference = next((i for i, (a, b) in enumerate(zip(merges, reference.merges, strict=False)) if a != b), None)
    assert first_difference is None, (
        f"merge {first_difference}: library {merges[first_difference]} "
        f"vs reference {reference.merges[first_difference]}"
    )
    assert merges == reference.merges
    assert library.backend_tokenizer.get_vocab(with_added_tokens=False) == reference.vocab
    return reference


def test_reference_trainer_matches_library_on_python_docs(pydoc_text):
    reference = assert_same_training([pydoc_text[:60_000]], 512)
    assert len(reference.merges) == 512 - 258
    assert reference.counts == sorted(reference.counts, reverse=True)  # best count never rises


def test_reference_trainer_matches_library_on_the_verdict(shared_data):
    assert_same_training([(shared_data / "the-verdict.txt").read_text(encoding="utf-8")], 600)


def test_reference_trainer_matches_library_when_choices_are_ties():
    # 'zy' occurs 4 times, every other pair 3 times: after ('z','y') every choice is a tie.
    texts = ["ba dc zy"] * 3 + ["zy"]
    reference = assert_same_training(texts, 300)
    # Ties go to the smallest left id, then right id: 'b' < 'd' < 'Ġ' by code point, and 'zy'
    # (id 258, made first) < 'dc' (id 260), so ('Ġ','zy') beats ('Ġ','dc') although 'dc' < 'zy'
    # as strings: ids, not strings, break ties.
    assert reference.merges == [("z", "y"), ("b", "a"), ("d", "c"), ("Ġ", "zy"), ("Ġ", "dc")]
    assert reference.counts == [4, 3, 3, 3, 3]


def test_reference_trainer_matches_library_with_high_min_frequency(pydoc_text):
    reference = assert_same_training([pydoc_text[:30_000]], 2000, min_frequency=40)
    assert 0 < len(reference.merges) < 2000 - 258 and min(reference.counts) >= 40
